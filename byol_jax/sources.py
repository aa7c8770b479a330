"""Where examples come from: one process's slice of a split of a prepared tfds data set.

`open_split` gives data.py one process's slice of a split as encoded examples.
Splits: any tfds split string ('train', 'validation', 'train[10000:]', ...) or
  'train_minus_val': dataset.train_split without its first dataset.validation_examples
                     examples (pretraining / linear training during hyperparameter search);
  'val_from_train':  those first dataset.validation_examples examples (the held-out
                     validation split, as in the authors' release).
A data set that is not on disk raises DatasetNotPreparedError saying how to make it
(local data is made into tfds data sets by prepare.py).
"""
import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import prepare

SPLIT_ALIASES = ("train_minus_val", "val_from_train")
DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3


class DatasetNotPreparedError(FileNotFoundError):
  """The data set is not on disk; the message says how to prepare it."""


def how_to_prepare(name: str, data_dir: str | None) -> str:
  """The message for a data set tfds cannot find: what is missing and how to make it."""
  where = data_dir or "the tfds default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  head = f"data set {name!r} is not prepared in {where}."
  if name == "fashion_mnist":
    return (f"{head} Build it from the idx files: `byol-jax prepare-data fashion_mnist` "
            f"(byol_jax.prepare.prepare_fashion_mnist; the files come with "
            f"`apt-get install dataset-fashion-mnist`, in {prepare.FASHION_MNIST_DIR}); pass the "
            "same data_dir to it and to --config.dataset.data_dir.")
  try:
    builder_cls = tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return (f"{head} No tfds builder has that name either: for a folder of class "
            "subfolders run byol_jax.prepare.prepare_image_folder(root, name, data_dir), "
            "or check config.dataset.name and config.dataset.data_dir.")
  text = (f"{head} Prepare it with `tfds build {name} --data_dir=DIR` or "
          f"tfds.builder({name!r}, data_dir=DIR).download_and_prepare().")
  manual = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    text += (f" {name} needs a manual download: put the files in "
             f"DIR/downloads/manual first. tfds says: {' '.join(manual.split())}")
  return text


# ------------------------------------------------------------------ reading splits


def resolve_split(config, split: str | None) -> str:
  """Maps None (dataset.train_split) and the SPLIT_ALIASES to tfds split strings."""
  split = split or config.dataset.train_split
  held_out, base = int(config.dataset.validation_examples), config.dataset.train_split
  if split == "train_minus_val":
    return f"{base}[{held_out}:]"
  if split == "val_from_train":
    return f"{base}[:{held_out}]"
  return split


def _builder(name: str, data_dir: str | None):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(how_to_prepare(name, data_dir)) from e
  missing = [k for k in ("image", "label") if k not in builder.info.features]
  if missing:
    raise ValueError(f"data set {name!r} has no {missing} feature(s) (it has "
                     f"{sorted(builder.info.features)}); byol_jax needs 'image' and 'label'.")
  return builder


def _channels(config, builder) -> int:
  return int(config.dataset.get("channels", 0) or builder.info.features["image"].shape[-1]
             or 3)


def image_channels(config) -> int:
  """Channels C of decoded images: dataset.channels, else the data set's image feature
  (fashion_mnist 1, ImageNet 3), 3 when the feature leaves it open."""
  return _channels(config, _builder(config.dataset.name, config.dataset.data_dir or None))


@dataclasses.dataclass
class SplitSource:
  """One process's slice of a split.

  Attributes:
    ds: encoded examples {'image': scalar string (file bytes), 'label': int64}.
    split: the tfds split string.
    num_examples: examples in this process's slice.
    total_examples: examples in the whole split (all processes).
    channels: image channels to decode to (dataset.channels, else the feature's).
    small: the slice fits under dataset.cache_max_bytes, so data.py caches it.
  """
  ds: tf.data.Dataset
  split: str
  num_examples: int
  total_examples: int
  channels: int
  small: bool


def open_split(config, split: str | None, process_index: int = 0, process_count: int = 1,
               deterministic: bool = True) -> SplitSource:
  """Opens config.dataset's split (or alias) and keeps this process's even slice.

  Files are read in stored order when `deterministic`, else shuffled; either way
  interleaved 16 at a time, except in data sets stored in order (tfds forbids both).

  Raises:
    DatasetNotPreparedError: the data set is not in dataset.data_dir (says how to make it).
    ValueError: unknown split, an empty slice, or missing 'image'/'label' features.
  """
  name, data_dir = config.dataset.name, config.dataset.data_dir or None
  builder = _builder(name, data_dir)
  split = resolve_split(config, split)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  sub = tfds.even_splits(split, n=process_count)[process_index] if process_count > 1 else split
  ordered = bool(builder.info.disable_shuffling)
  read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=config.seed,
                                interleave_cycle_length=1 if ordered else 16,
                                interleave_block_length=1)
  decoders = tfds.decode.PartialDecoding(
      {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()})
  try:
    ds = builder.as_dataset(split=sub, decoders=decoders, read_config=read_config,
                            shuffle_files=not (deterministic or ordered))
    total = int(builder.as_dataset(split=split, decoders=decoders).cardinality())
  except AssertionError as e:  # tfds's way of saying "not prepared".
    raise DatasetNotPreparedError(how_to_prepare(name, data_dir)) from e
  except ValueError as e:  # Unknown split names, slices out of range.
    raise ValueError(f"split {split!r} of {name!r}: {e} (valid: {list(builder.info.splits)} "
                     f"and their slices, or {list(SPLIT_ALIASES)})") from e
  count = int(ds.cardinality())
  if count <= 0:
    raise ValueError(f"split {split!r} of {name!r} gives process {process_index} of "
                     f"{process_count} no examples (cardinality {count}).")
  try:
    num_bytes = int(builder.info.splits[sub].num_bytes)
  except (KeyError, ValueError, AssertionError, TypeError):
    num_bytes = 0  # Unknown (mocked data): small.
  return SplitSource(ds, split, count, total, _channels(config, builder),
                     num_bytes <= config.dataset.get("cache_max_bytes", DEFAULT_CACHE_MAX_BYTES))

