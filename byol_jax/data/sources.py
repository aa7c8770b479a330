"""Where examples come from: one process's slice of a split of a prepared tfds data set.

`open_split` gives data.py one process's slice of a split as encoded examples.
Splits: any tfds split string ('train', 'validation', 'train[10000:]', ...) or
  'train_minus_val': dataset.train_split without its first dataset.validation_examples
                     examples (pretraining / linear training during hyperparameter search);
  'val_from_train':  those first dataset.validation_examples examples (the held-out
                     validation split, as in the authors' release).
A data set that is not on disk raises DatasetNotPreparedError saying how to make it
(local data is made into tfds data sets by prepare.py).

`resolve_dataset` runs at every job's start, before any step, feature or file: it fills
what the data set's metadata knows (dataset.num_train_examples, dataset.num_classes: 0 means
"from the data") and checks every split the job will read, naming the field and a fix.
"""
import copy
import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax.data import prepare

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
            f"(byol_jax.data.prepare.prepare_fashion_mnist; the files come with "
            f"`apt-get install dataset-fashion-mnist`, in {prepare.FASHION_MNIST_DIR}); pass the "
            "same data_dir to it and to --config.dataset.data_dir.")
  try:
    builder_cls = tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return (f"{head} No tfds builder has that name either: for a folder of class "
            "subfolders run byol_jax.data.prepare.prepare_image_folder(root, name, data_dir), "
            "or check config.dataset.name and config.dataset.data_dir.")
  text = (f"{head} Prepare it with `tfds build {name} --data_dir=DIR` or "
          f"tfds.builder({name!r}, data_dir=DIR).download_and_prepare().")
  manual = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    text += (f" {name} needs a manual download: put the files in "
             f"DIR/downloads/manual first. tfds says: {' '.join(manual.split())}")
  return text


# ------------------------------------------------------------ resolving the config

# What a job reads besides dataset.train_split: 'eval' (dataset.eval_split), 'holdout' (the
# linear protocol's dataset.validation_examples carve-out of train), 'knn' (the kNN bank,
# knn.train_examples of train).
READS = ("eval", "holdout", "knn")


def _set_flag(field: str, value) -> str:
  return f"--config.{field}={value!r}" if isinstance(value, str) else f"--config.{field}={value}"


def split_examples(builder, split: str, field: str) -> int:
  """Examples in the tfds split string of config.`field` (slices and '+' too), from metadata.

  Args:
    builder: the prepared data set's tfds builder.
    split: a tfds split string, the value of config.`field`.
    field: the config field it came from, for the message.

  Raises:
    ValueError: unknown split, bad syntax, an out-of-range or empty slice; the message
      names the field, the data set's splits and one that would work.
  """
  name, known = builder.info.name, sorted(builder.info.splits)
  preferred = ("test", "validation") if field == "dataset.eval_split" else ("train",)
  example = next((k for k in preferred if k in known), known[0] if known else "train")
  fix = (f"set {_set_flag(field, example)} (its splits: {known}; slices such as "
         f"'{example}[:50%]' work too)")
  try:
    count = int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError) as e:
    raise ValueError(f"config.{field}={split!r} is not a split of {name!r} "
                     f"({' '.join(str(e).split())}); {fix}.") from None
  if count <= 0:
    raise ValueError(f"config.{field}={split!r} selects no examples of {name!r} ({count}); "
                     f"{fix}.")
  return count


def label_classes(builder) -> int | None:
  """The class count the data set's label feature records, or None when it records none."""
  return getattr(builder.info.features["label"], "num_classes", None) or None


def _resolved(field: str, value: int, found: int, what: str) -> int:
  """`found` when the config leaves `value` at 0, else `value` if it agrees with the data."""
  if value and value != found:
    raise ValueError(f"config.{field}={value} contradicts the data: {what} has {found}; "
                     f"set --config.{field}=0 to take it from the data (a deliberate subset of "
                     "the examples is a split slice, e.g. --config.dataset.train_split="
                     "'train[:50%]').")
  return found


def _check_holdout(c, builder, train: int) -> None:
  """The linear protocol's carve-out: dataset.validation_examples of train, and a rest."""
  held = int(c.dataset.validation_examples)
  where = f"split {c.dataset.train_split!r} of {builder.info.name!r}"
  if "[" in c.dataset.train_split or "+" in c.dataset.train_split:
    raise ValueError(f"config.dataset.train_split={c.dataset.train_split!r} is a slice, which "
                     "the linear protocol cannot carve its validation examples from; set "
                     "--config.dataset.train_split to a whole split such as 'train'.")
  fix = (f"set --config.dataset.validation_examples={max(1, train // 10)} (10%) or another "
         f"number in [1, {train - 1}]")
  if held <= 0:
    raise ValueError(f"config.dataset.validation_examples={held} must be > 0: the linear "
                     f"protocol picks its learning rate on that many examples held out of "
                     f"{where}; {fix}.")
  if held >= train:
    verb = "exceeds" if held > train else "leaves nothing to train on of"
    raise ValueError(f"config.dataset.validation_examples={held} {verb} the {train} examples "
                     f"of {where}; {fix}.")


def _check_knn(c, train: int, name: str) -> None:
  bank = int(c.knn.train_examples)
  if bank > train:
    raise ValueError(f"config.knn.train_examples={bank} exceeds the {train} examples of split "
                     f"{c.dataset.train_split!r} of {name!r}; set --config.knn.train_examples="
                     f"{train} or fewer (0: all of them).")


def resolve_dataset(config, reads=("eval",)):
  """The config with what the data knows filled in, every split a job reads checked.

  Call once at a job's start, before anything is computed or written. Fills
  dataset.num_train_examples (the size of dataset.train_split, slices included) and
  dataset.num_classes (the label feature's class count) where they are 0; a non-zero
  value must equal the data's. Needs the data set prepared; reads only its metadata.

  Args:
    config: a validated config (not modified).
    reads: which of READS the job reads besides the train split.

  Returns:
    A copy of `config` (locked if it was) with both fields set.

  Raises:
    DatasetNotPreparedError: the data set is not on disk (says how to make it).
    ValueError: one line naming the field, the data's value and the fix: an unknown or
      empty split, a size or class count that contradicts the data, a carve-out larger
      than the split, or a data set without a class count and num_classes=0.
  """
  unknown = sorted(set(reads) - set(READS))
  if unknown:
    raise ValueError(f"reads={unknown} are not in {list(READS)}.")
  d = config.dataset
  builder = _builder(d.name, d.data_dir or None)
  if not builder.info.splits:  # A folder without dataset_info: tfds has not prepared it.
    raise DatasetNotPreparedError(how_to_prepare(d.name, d.data_dir or None))
  train = split_examples(builder, d.train_split, "dataset.train_split")
  if "eval" in reads:
    split_examples(builder, d.eval_split, "dataset.eval_split")
  if "holdout" in reads:
    _check_holdout(config, builder, train)
  if "knn" in reads:
    _check_knn(config, train, builder.info.name)
  out = copy.deepcopy(config)
  out.dataset.num_train_examples = _resolved(
      "dataset.num_train_examples", int(d.num_train_examples), train,
      f"split {d.train_split!r} of {builder.info.name!r}")
  classes = label_classes(builder)
  if classes is None and not d.num_classes:
    raise ValueError(f"data set {builder.info.name!r} does not record its class count (its "
                     "label feature is not a ClassLabel); set --config.dataset.num_classes to "
                     "it (labels must lie in [0, num_classes)).")
  if classes is not None:
    out.dataset.num_classes = _resolved("dataset.num_classes", int(d.num_classes), classes,
                                        f"the label feature of {builder.info.name!r}")
  return out


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
    num_classes: labels must lie in [0, num_classes): dataset.num_classes, else the
      label feature's class count; 0 when neither is known.
  """
  ds: tf.data.Dataset
  split: str
  num_examples: int
  total_examples: int
  channels: int
  small: bool
  num_classes: int = 0


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
                     num_bytes <= config.dataset.get("cache_max_bytes", DEFAULT_CACHE_MAX_BYTES),
                     int(config.dataset.num_classes or label_classes(builder) or 0))

