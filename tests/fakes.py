"""Small real data the tests write themselves (no network, no mocks)."""
import gzip
import pathlib
import struct

import numpy as np


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
  from byol_jax.data import prepare
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
