"""Small real data the tests write themselves (no network, no mocks)."""
import gzip
import importlib.util
import pathlib
import socket
import struct

import numpy as np

from byol_jax import config as config_lib
from byol_jax.data import prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_idx(path, array, compress):
  """The idx format: magic (0x08 = uint8, then the rank), big-endian dims, raw bytes."""
  magic = 0x800 + array.ndim
  raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  raw += array.astype(np.uint8).tobytes()
  path = pathlib.Path(f"{path}.gz" if compress else path)
  path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fashion_mnist(folder, n_train=12, n_test=5, seed=0):
  """Fashion-MNIST-format idx files (train gzipped, test raw) of random images.

  Returns:
    {'train': (images [n, 28, 28] uint8, labels [n]), 'test': ...}.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, prefix, n, compress in (("train", "train", n_train, True),
                                     ("test", "t10k", n_test, False)):
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = (np.arange(n) * 3 + seed) % 10
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    arrays[split] = (images, labels)
  return arrays


def fashion_mnist_tfds(root, n_train=64, n_test=12) -> str:
  """Writes fake Fashion-MNIST idx files under root/idx and builds them as a tfds data set
  under root/tfds (with byol_jax's own `prepare_fashion_mnist`); returns that data_dir."""
  root = pathlib.Path(root)
  write_fashion_mnist(root / "idx", n_train=n_train, n_test=n_test)
  prepare.prepare_fashion_mnist(str(root / "idx"), str(root / "tfds"))
  return str(root / "tfds")


def set_fields(c, overrides):
  """Sets dotted config fields, {'optim.base_lr': 0.5, ...}, on an unlocked ConfigDict."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def _load(path):
  """Loads a Python file as a module, under its file stem, with no sys.path change."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def recipe_module(name: str):
  """The module configs/<name>.py (e.g. 'byol_fashion_mnist')."""
  return _load(ROOT / "configs" / f"{name}.py")


def recipe(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg)."""
  return recipe_module(name).get_config(arg)


def script(name: str):
  """The module scripts/<name>.py (e.g. 'learning_curve')."""
  return _load(ROOT / "scripts" / f"{name}.py")


def smoke_config(data_dir, **overrides):
  """The Fashion-MNIST smoke recipe on the fake data set (fashion_mnist_tfds: 64 training
  examples), dotted-field overrides applied, validated."""
  c = recipe("byol_fashion_mnist", "smoke")
  c.unlock()
  c.dataset.data_dir = data_dir
  c.dataset.num_train_examples = 64
  return config_lib.validate(set_fields(c, overrides))


def free_port() -> int:
  """A TCP port on 127.0.0.1 free at the time of asking."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]
