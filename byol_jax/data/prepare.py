"""Preparing local data as tfds data sets: Fashion-MNIST idx files, folders of images.

`prepare_fashion_mnist` and `prepare_image_folder` write an ordinary TFDS data set
(tfrecord files + dataset_info.json) under `data_dir`, so `tfds.builder(name,
data_dir=...)`, `tfds.load` and data.py read them like any other. Both are idempotent:
a prepared data set is left as it is; tfds writes into a temporary folder and renames it
when complete, so an interrupted preparation leaves nothing half-written behind.

Apart from sources.py, which opens prepared splits for training and evaluation: preparing
runs once per data set (`byol-jax prepare-data`), before any pipeline reads it.
"""
import dataclasses
import gzip
import logging
import pathlib
import re
import struct
import sys
from typing import Iterable, Mapping
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.utils import tqdm_utils
from tensorflow_datasets.core.dataset_builders import adhoc_builder

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC = 2051, 2049
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_SPLITS = ("train", "validation", "test")


class _Builder(adhoc_builder.AdhocBuilder, skip_registration=True):
  """tfds's ad-hoc builder without the code-path lookup.

  tfds 4.9.10 locates a builder's source file (for download checksums) through
  `importlib_resources`, which its requirements do not install on Python >= 3.9; these
  data sets download nothing, so there is no code path to find.
  """

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    return None


def store_dataset(name: str, version: str, features: tfds.features.FeaturesDict,
                  splits: Mapping[str, Iterable], data_dir: str | None,
                  description: str = "", disable_shuffling: bool = False) -> str:
  """Writes (key, example) iterables as the TFDS data set `name:version`.

  Args:
    name: tfds data set name (snake_case).
    version: 'x.y.z'.
    features: the tfds features of one example.
    splits: split name -> iterable of (unique key, example dict).
    data_dir: tfds data directory (None: tfds's default).
    description: shown by tfds.
    disable_shuffling: keep the given order (otherwise tfds shuffles by key hash).

  Returns:
    The data_dir root to pass to `tfds.builder(name, data_dir=...)`.
  """
  builder = _Builder(name=name, version=version, features=features, split_datasets=splits,
                     data_dir=data_dir, description=description or name,
                     disable_shuffling=disable_shuffling)
  shown = getattr(tqdm_utils, "_active", True)
  # tqdm redraws and finally clears its bars with carriage returns, never a newline: on a
  # terminal the next line overwrites them, but in a pipe or log file the next line
  # (tfds's "Dataset ... prepared", then the command's summary) continues the bars' line.
  # Off a terminal the bars are only noise, so they are off while preparing.
  tfds.display_progress_bar(shown and sys.stderr.isatty())
  try:
    builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(shown)
  return str(pathlib.Path(builder.data_dir).parents[1])



# ------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: pathlib.Path, magic: int, dims: int) -> np.ndarray:
  """Reads an idx file (optionally .gz), checking its magic number and length."""
  data = path.read_bytes()
  if path.suffix == ".gz":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise ValueError(f"{path}: not a readable gzip file ({e}); re-download it.") from e
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: idx magic number {found} is not {magic}; this is not the "
                     f"expected {'image' if dims == 3 else 'label'} file.")
  header = 4 + 4 * dims
  if len(data) < header:
    raise ValueError(f"{path}: {len(data)} bytes is shorter than an idx header.")
  shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
  expected = header + int(np.prod(shape))
  if len(data) != expected:
    raise ValueError(f"{path}: {len(data)} bytes, but its header {shape} needs {expected}; "
                     "the file is truncated or corrupt.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find(source_dir: pathlib.Path, stem: str) -> pathlib.Path:
  for candidate in (source_dir / stem, source_dir / f"{stem}.gz"):
    if candidate.exists():
      return candidate
  raise FileNotFoundError(f"{source_dir} has neither {stem} nor {stem}.gz; install the "
                          "files with `apt-get install dataset-fashion-mnist` or pass "
                          "their folder as source_dir.")


def read_fashion_mnist(source_dir: str = FASHION_MNIST_DIR) -> dict[str, tuple]:
  """Loads and validates the four Fashion-MNIST idx files.

  Returns:
    split ('train', 'test') -> (images [N, 28, 28] uint8, labels [N] uint8).
  """
  root = pathlib.Path(source_dir)
  out = {}
  for split, (image_stem, label_stem) in _FASHION_MNIST_FILES.items():
    image_path, label_path = _find(root, image_stem), _find(root, label_stem)
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
      raise ValueError(f"{image_path}: images are {images.shape[1:]}, not 28x28.")
    if len(images) != len(labels):
      raise ValueError(f"{image_path} has {len(images)} images but {label_path} has "
                       f"{len(labels)} labels.")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
      raise ValueError(f"{label_path}: label {labels.max()} is not in [0, 10).")
    out[split] = (images, labels)
  return out


def encode_png_gray(image: np.ndarray) -> bytes:
  """Losslessly encodes a [H, W] uint8 array as a grayscale PNG (no filter, zlib level 6).

  Plain zlib is ~5x faster here than 70k calls of tf.io.encode_png through tf.data.
  """
  h, w = image.shape
  raw = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1).tobytes()

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data +
            struct.pack(">I", zlib.crc32(tag + data)))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _png_examples(images: np.ndarray, labels: np.ndarray):
  for i, (image, label) in enumerate(zip(images, labels)):
    yield i, {"image": encode_png_gray(image), "label": int(label)}


def prepare_fashion_mnist(source_dir: str = FASHION_MNIST_DIR,
                          data_dir: str | None = None) -> str:
  """Builds the tfds data set 'fashion_mnist' from the original idx files.

  tfds's own builder downloads the files and rejects Debian's copies on checksum
  (Debian recompressed them); this one reads them from `source_dir` instead and writes
  the same features (image (28, 28, 1) uint8 PNG, label ClassLabel of 10) and version,
  so `tfds.builder('fashion_mnist', data_dir=data_dir)` loads it. Like tfds's, the
  examples are stored shuffled (by key hash).

  Args:
    source_dir: folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
    data_dir: tfds data directory (None: tfds's default).

  Returns:
    The data_dir root holding fashion_mnist/<version>/.

  Raises:
    FileNotFoundError: a file is missing. ValueError: a file is malformed.
  """
  existing = tfds.builder("fashion_mnist", data_dir=data_dir)
  root = str(pathlib.Path(existing.data_dir).parents[1])
  if existing.is_prepared():
    logging.info("fashion_mnist already prepared in %s", root)
    return root
  arrays = read_fashion_mnist(source_dir)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
  })
  return store_dataset(
      "fashion_mnist", str(tfds.builder_cls("fashion_mnist").VERSION), features,
      {split: _png_examples(*arrays[split]) for split in arrays}, data_dir,
      description=f"Fashion-MNIST from the idx files in {source_dir}.")


# ------------------------------------------------------------------- image folders


@dataclasses.dataclass
class FolderReport:
  """What `prepare_image_folder` wrote.

  Attributes:
    data_dir: the tfds data_dir root holding the data set.
    name: its tfds name.
    class_names: label i is class_names[i] (sorted folder names).
    split_sizes: split -> number of images written.
    skipped: (path, reason) for every file left out (unreadable, not an image).
  """
  data_dir: str
  name: str
  class_names: list[str]
  split_sizes: dict[str, int]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _split_dirs(root: pathlib.Path) -> dict[str, pathlib.Path]:
  named = {s: root / s for s in FOLDER_SPLITS if (root / s).is_dir()}
  if named and "train" not in named:
    raise ValueError(f"{root} has {sorted(named)} but no train/ folder.")
  return named or {"train": root}


def _class_dirs(split_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _readable_only(files, class_names, folder):
  """Drops files that do not decode as images; -> files, [(path, decoder message)].

  Raises ValueError for a train class or a split left without images.
  """
  paths = [p for items in files.values() for p, _ in items]
  def check(i, path):
    return i, tf.shape(tf.io.decode_image(tf.io.read_file(path), expand_animations=False))
  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), [str(p) for p in paths]))
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  good = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
  bad = {}
  for i in sorted(set(range(len(paths))) - good):  # Few: decode again for the message.
    try:
      tf.io.decode_image(tf.io.read_file(str(paths[i])), expand_animations=False)
      bad[paths[i]] = "unreadable"
    except tf.errors.OpError as e:
      bad[paths[i]] = e.message.splitlines()[0]
  kept = {split: [(p, l) for p, l in items if p not in bad] for split, items in files.items()}
  counts = np.bincount([l for _, l in kept["train"]], minlength=len(class_names))
  empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
  if empty:
    raise ValueError(f"class folder(s) {empty} in {folder} have no readable images; "
                     "add images or remove the folder(s).")
  for split, items in kept.items():
    if not items:
      raise ValueError(f"the {split} split of {folder} has no readable images.")
  return kept, [(str(p), reason) for p, reason in bad.items()]


def _scan_folder(root: pathlib.Path):
  """-> class names, {split: [(path, label)]}, skipped [(path, reason)]."""
  splits = _split_dirs(root)
  class_names = [p.name for p in _class_dirs(splits["train"])]
  if not class_names:
    raise ValueError(f"{splits['train']} has no class subfolders; expected "
                     "<root>/<class>/<image> or <root>/train/<class>/<image>.")
  files, skipped = {}, []
  for split, split_dir in splits.items():
    files[split] = []
    for class_dir in _class_dirs(split_dir):
      if class_dir.name not in class_names:
        raise ValueError(f"{class_dir}: class {class_dir.name!r} is not in train/ "
                         f"({class_names}).")
      for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
          files[split].append((path, class_names.index(class_dir.name)))
        elif not path.name.startswith("."):
          skipped.append((str(path), f"not a {'/'.join(IMAGE_EXTENSIONS)} file"))
  return class_names, files, skipped


def prepare_image_folder(root: str, name: str, data_dir: str | None,
                         channels: int = 3) -> FolderReport:
  """Writes a folder of class subfolders of JPEG/PNG images as the tfds data set `name`.

  Layout: root/<class>/<images> gives a 'train' split; or root/train/<class>/...,
  with optional root/validation/ and root/test/ (same class names) for more splits.
  Labels index the sorted class folder names of train. Image bytes are stored as they
  are (JPEGs stay JPEG, so data.py crops them while decoding); the format is read from
  the bytes, not the file name.

  Bad input: unreadable or truncated images and files without an image extension are
  skipped and listed in the report (and logged); an empty class folder (after
  skipping) raises ValueError, since it would silently change the class count.

  Args:
    root: the folder.
    name: tfds name (lower snake_case, not a tfds catalogue name).
    data_dir: tfds data directory (None: tfds's default).
    channels: channel count recorded in the image feature.

  Returns:
    A FolderReport. A second call with the data set already prepared writes nothing
    and reports its split sizes.
  """
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"name {name!r} must be lower snake_case, e.g. 'my_images'.")
  if name in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"name {name!r} is a tfds catalogue data set; choose another name.")
  folder = pathlib.Path(root)
  if not folder.is_dir():
    raise FileNotFoundError(f"image folder {folder} does not exist.")
  try:
    existing = tfds.builder(name, data_dir=data_dir)
    if existing.is_prepared():
      return FolderReport(str(pathlib.Path(existing.data_dir).parents[1]), name,
                          list(existing.info.features["label"].names),
                          {s: v.num_examples for s, v in existing.info.splits.items()})
  except tfds.core.registered.DatasetNotFoundError:
    pass
  class_names, files, skipped = _scan_folder(folder)
  files, unreadable = _readable_only(files, class_names, folder)
  for path, reason in skipped + unreadable:
    logging.warning("prepare_image_folder: skipped %s (%s)", path, reason)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, channels)),
      "label": tfds.features.ClassLabel(names=class_names),
  })
  examples = {split: [(str(p.relative_to(folder)), {"image": str(p), "label": label})
                      for p, label in items] for split, items in files.items()}
  out = store_dataset(name, "1.0.0", features, examples, data_dir,
                      description=f"Images from {folder}.")
  return FolderReport(out, name, class_names, {s: len(v) for s, v in files.items()},
                      skipped + unreadable)
