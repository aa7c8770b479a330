"""Test set-up: 4 fake CPU devices and a shared XLA compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here, at the top of
the first module pytest imports.
"""
import os
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_TEST_DEVICES = 4

# The two optimisation flags cut CPU compile time of the update step by about half
# (88 s -> 38 s measured on this project's tiny test network); tests run tiny networks,
# so the slower generated code costs far less than it saves.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// in tests is a fake GCS server (tests/fake_gcs.py), reached through the client that
# byol_jax/store/files.py picks for every user; nothing here steers that choice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_compilation_cache_dir", str(_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:  # tf.data must not grab the accelerator or all host threads in tests.
  import tensorflow as tf  # noqa: E402
  tf.config.set_visible_devices([], "GPU")
except ImportError:
  pass


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The small fake Fashion-MNIST tfds data set (fakes.fashion_mnist_tfds: 64 train, 12 test).
  test_learning and test_collapse override it with the real data."""
  import fakes
  return fakes.fashion_mnist_tfds(tmp_path_factory.mktemp("fmnist"))
