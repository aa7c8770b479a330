"""Host input pipelines (tf.data): pretrain, linear-train, fine-tune (a subset) and eval batches.

Each pipeline takes this process's slice of a split from sources.open_split (tfds data
sets with 'image' and 'label'; split names and aliases are documented there), decodes
and crops on the host (decoding.py, crops.py) and yields NumPy batches shaped
[local_devices, per_device_batch, ...] with uint8 images (normalised on the device: 4x
fewer bytes to send than float32).
Flips for pretraining, colour, blur and solarize happen on the device (augment.py).
Fine-tuning reads a subset of a split chosen by example index, counted in tfds's stored
order (example i is what `split[i:i+1]` gives); `split_labels` gives the labels to choose by.

Corrupt images (truncated or unreadable files) are skipped, never fatal; the iterator's
`skipped_images` counts them so the training loop can log it.

Deterministic mode (dataset.deterministic): example order and crops are stateless
functions of (seed, process, epoch, position in the epoch), so a run restarted with
`start_step=k` yields exactly the batches an uninterrupted run yields from step k
(exact when no image was skipped before step k; each skipped image shifts the stream
by one example). Each epoch is a seeded buffer shuffle of the split in its stored order
(tfds shuffles examples when it writes a data set); small cached splits are shuffled
whole.
"""
import collections
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax.data import decoding
from byol_jax import parallel
from byol_jax.data import sources

_MAX_EPOCHS = 1 << 40


class InputIterator:
  """Iterates NumPy batch dicts; `skipped_images` counts corrupt images dropped so far.

  Attributes:
    dataset: the underlying tf.data.Dataset (batches still carry the skip count).
    num_batches: batches in one pass (eval) or None (infinite).
    skipped_images: images this process dropped as unreadable since the iterator began.
  """

  def __init__(self, dataset: tf.data.Dataset, num_batches: int | None = None):
    self.dataset = dataset
    self.num_batches = num_batches
    self.skipped_images = 0
    self._iterator = iter(tfds.as_numpy(dataset))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._iterator)
    except tf.errors.InvalidArgumentError as e:
      if decoding.LABEL_ERROR not in e.message:
        raise
      raise ValueError(decoding.label_message(e.message)) from None
    self.skipped_images = max(self.skipped_images, int(batch.pop(decoding.SKIPPED)))
    return batch

  def close(self) -> None:
    """Releases the tf.data iterator (its threads and buffers); `next` then stops."""
    self._iterator.close()


def tf_data_options(config, deterministic: bool) -> tf.data.Options:
  """Private thread pool (dataset.num_threads, default all cores), one thread per op."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = int(
      config.dataset.get("num_threads", 0) or len(os.sched_getaffinity(0)))
  # One thread per op: parallelism comes from many examples in flight.
  options.threading.max_intra_op_parallelism = 1
  options.deterministic = deterministic
  return options


def num_channels(config) -> int:
  """C, the channel count of the images the pipelines yield for config.dataset."""
  return sources.image_channels(config)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _per_process_batch(batch_size: int, process_count: int, local_device_count: int) -> int:
  devices = process_count * local_device_count
  return parallel.per_device_batch(batch_size, devices) * local_device_count


def _to_devices(ds, per_process: int, local_device_count: int):
  def reshape(batch):
    out = {k: tf.reshape(v, [local_device_count, per_process // local_device_count] +
                         v.shape[1:].as_list())
           for k, v in batch.items() if k != decoding.SKIPPED}
    out[decoding.SKIPPED] = tf.reduce_max(batch[decoding.SKIPPED])
    return out
  return ds.batch(per_process, drop_remainder=True).map(reshape).prefetch(tf.data.AUTOTUNE)


def _train_iterator(config, mode, split, process_index, process_count, local_device_count,
                    start_step, batch_size):
  deterministic = bool(config.dataset.deterministic)
  src = sources.open_split(config, split, process_index, process_count, deterministic)
  base = src.ds.cache() if src.small else src.ds
  return _stream(config, mode, base, src.num_examples, src.small, src.channels, src.num_classes,
                 process_index, process_count, local_device_count, start_step, batch_size)


def _stream(config, mode, base, num_examples, small, channels, num_classes, process_index,
            process_count, local_device_count, start_step, batch_size) -> InputIterator:
  """Infinite shuffled, decoded, batched stream over `base` (this process's examples)."""
  deterministic = bool(config.dataset.deterministic)
  per_process = _per_process_batch(batch_size or config.batch_size, process_count,
                                   local_device_count)
  buffer = int(config.dataset.get("shuffle_buffer", 0) or
               (num_examples if small else max(1000, 10 * per_process)))
  buffer = min(buffer, num_examples)
  if deterministic:
    n = num_examples
    first = start_step * per_process
    base_key = tf.constant([config.seed, process_index], tf.int64)

    def epoch(e):
      key = tf.random.experimental.stateless_fold_in(base_key, e)
      seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
      shuffled = base.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
      return shuffled.enumerate().map(lambda i, ex: {**ex, "_epoch": e, "_pos": i})
    ds = tf.data.Dataset.range(first // n, _MAX_EPOCHS).flat_map(epoch).skip(first % n)
  else:
    # Shuffling after repeat never drains the buffer at epoch ends (no refill stall).
    seed = hash((config.seed, process_index, start_step)) % (2**31)
    ds = base.repeat().shuffle(buffer, seed=seed)
  transform = decoding.make_transform(config, mode, process_index, channels)
  ds = decoding.decode_stream(ds, transform, num_classes)
  ds = _to_devices(ds, per_process, local_device_count)
  return InputIterator(ds.with_options(tf_data_options(config, deterministic)))


def pretrain_dataset(config, *, split: str | None = None, process_index: int = 0,
                     process_count: int = 1, local_device_count: int,
                     start_step: int = 0) -> InputIterator:
  """Infinite pretraining batches: two random-resized crops of each image.

  Args:
    config: the run config (dataset.*, image_size, batch_size, seed, augment.crop_*).
    split: tfds split string or alias (see sources.py); None: dataset.train_split.
    process_index, process_count: this process and the number of processes; each
      reads its own even slice of the split.
    local_device_count: L, the devices this process feeds.
    start_step: the first step's index; in deterministic mode the stream resumes
      exactly there.

  Returns:
    An InputIterator of dicts: view1, view2 [L, b, S, S, C] uint8 (no flip),
    label [L, b] int32, with b = batch_size // (process_count * L), S = image_size.
  """
  return _train_iterator(config, "pretrain", split, process_index, process_count,
                         local_device_count, start_step, None)


def linear_train_dataset(config, *, split: str | None = None, process_index: int = 0,
                         process_count: int = 1, local_device_count: int,
                         start_step: int = 0, batch_size: int | None = None) -> InputIterator:
  """Infinite linear-evaluation training batches: one random-resized crop + flip.

  Arguments as `pretrain_dataset`; `batch_size` overrides config.batch_size (global).
  Returns an InputIterator of dicts: image [L, b, S, S, C] uint8, label [L, b] int32.
  """
  return _train_iterator(config, "linear", split, process_index, process_count,
                         local_device_count, start_step, batch_size)


def _in_stored_order(config, split: str | None, decoders):
  """The whole split (or alias) in tfds's stored order: example i is `split[i:i+1]`.

  Returns (SplitSource of the whole split, for its checks and sizes; the dataset).
  """
  src = sources.open_split(config, split, deterministic=True)  # Clear errors, sizes.
  builder = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir or None)
  # One file at a time, in order: the order tfds's slicing (split[a:b]) counts in.
  read_config = tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1)
  ds = builder.as_dataset(split=src.split, decoders=decoders, read_config=read_config,
                          shuffle_files=False)
  return src, ds


def split_labels(config, split: str | None = None) -> np.ndarray:
  """Labels of every example of a split in stored order (images are not decoded).

  Args:
    config: the run config (dataset.*).
    split: tfds split string or alias; None: dataset.train_split.

  Returns:
    [N] int64, labels[i] the label of example i (the index `finetune_dataset` takes).

  Raises:
    ValueError: a label outside [0, num_classes) (dataset.num_classes, else the metadata's).
  """
  decoders = tfds.decode.PartialDecoding({"label": True})
  src, ds = _in_stored_order(config, split, decoders)
  ds = ds.map(lambda ex: ex["label"]).batch(8192)
  labels = np.concatenate([np.asarray(b, np.int64) for b in tfds.as_numpy(ds)] or
                          [np.zeros([0], np.int64)])
  outside = labels[(labels < 0) | (labels >= src.num_classes)] if src.num_classes else []
  if len(outside):
    raise ValueError(decoding.label_message(f"[{outside[0]}] [{src.num_classes}]"))
  return labels


def finetune_dataset(config, subset_indices, *, split: str | None = None,
                     process_index: int = 0, process_count: int = 1, local_device_count: int,
                     start_step: int = 0, batch_size: int | None = None) -> InputIterator:
  """Infinite training batches of a subset of a split: one random-resized crop + flip.

  Only the examples whose stored-order index (as `split_labels` counts) is in
  `subset_indices` are read; the subset is cached in memory when it fits under
  dataset.cache_max_bytes (estimated from the split's size), else re-read each epoch.
  Each process takes every process_count-th subset example. Shuffling and (in
  deterministic mode) resumption work as in `linear_train_dataset`.

  Args:
    config: the run config (dataset.*, image_size, seed, augment.crop_*).
    subset_indices: [K] distinct int indices in [0, N) of the split's examples.
    split: tfds split string or alias; None: dataset.train_split.
    process_index, process_count, local_device_count, start_step: as `pretrain_dataset`.
    batch_size: global batch size (default config.batch_size).

  Returns:
    An InputIterator of dicts: image [L, b, S, S, C] uint8, label [L, b] int32.
  """
  decoders = tfds.decode.PartialDecoding(
      {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()})
  src, ds = _in_stored_order(config, split, decoders)
  indices = np.unique(np.asarray(subset_indices, np.int64))
  if indices.size != np.size(subset_indices) or indices.size == 0:
    raise ValueError(f"subset_indices must be non-empty and distinct; got {np.size(subset_indices)} "
                     f"indices, {indices.size} distinct.")
  if indices[0] < 0 or indices[-1] >= src.total_examples:
    raise ValueError(f"subset_indices must lie in [0, {src.total_examples}) (the size of split "
                     f"{src.split!r}); found {indices[0]}..{indices[-1]}.")
  if not 0 <= process_index < process_count or indices.size < process_count:
    raise ValueError(f"process {process_index} of {process_count} cannot take a share of "
                     f"{indices.size} subset examples.")
  member = np.zeros([src.total_examples], bool)
  member[indices] = True
  member = tf.constant(member)

  def in_subset(index, example):
    del example
    return tf.gather(member, index)

  def drop_index(index, example):
    del index
    return example
  ds = ds.enumerate().filter(in_subset).map(drop_index)
  ds = ds.shard(process_count, process_index)
  count = len(range(process_index, indices.size, process_count))
  try:
    split_bytes = int(tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir or None
                                   ).info.splits[src.split].num_bytes)
  except (KeyError, ValueError, AssertionError, TypeError):
    split_bytes = 0  # Unknown: treat as small.
  small = split_bytes * count / src.total_examples <= config.dataset.get(
      "cache_max_bytes", sources.DEFAULT_CACHE_MAX_BYTES)
  base = ds.cache() if small else ds
  return _stream(config, "linear", base, count, small, src.channels, src.num_classes,
                 process_index, process_count, local_device_count, start_step, batch_size)


def eval_dataset(config, split: str | None = None, *, process_index: int = 0,
                 process_count: int = 1, local_device_count: int,
                 batch_size: int | None = None) -> InputIterator:
  """One pass over a split: centre crop (dataset.eval_crop_fraction of the short side).

  Every example is seen once by exactly one process; the last batches are padded so
  every process yields the same number of batches (`num_batches`), padding has mask 0.

  Args:
    config: the run config.
    split: tfds split string or alias; None: dataset.eval_split.
    process_index, process_count, local_device_count: as `pretrain_dataset`.
    batch_size: global batch size (default config.batch_size).

  Returns:
    A finite InputIterator of dicts: image [L, b, S, S, C] uint8, label [L, b] int32,
    mask [L, b] int32 (1 real example, 0 padding).
  """
  per_process = _per_process_batch(batch_size or config.batch_size, process_count,
                                   local_device_count)
  src = sources.open_split(config, split or config.dataset.eval_split, process_index,
                           process_count, deterministic=True)
  num_batches = _ceil_div(_ceil_div(src.total_examples, process_count), per_process)
  transform = decoding.make_transform(config, "eval", process_index, src.channels)
  ds = decoding.decode_stream(src.ds, transform, src.num_classes)
  padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = _to_devices(ds, per_process, local_device_count).take(num_batches)
  return InputIterator(ds.with_options(tf_data_options(config, True)), num_batches)


class _DevicePrefetcher:
  """Keeps `size` batches already placed on the devices ahead of the consumer."""

  def __init__(self, iterator: Iterator[Any], size: int, devices):
    self._source = iterator
    self._queue = collections.deque()
    self._size = size
    self._devices = devices

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._queue) < self._size:
      try:
        self._queue.append(parallel.shard(next(self._source), self._devices))
      except StopIteration:
        break
    if not self._queue:
      raise StopIteration
    return self._queue.popleft()

  @property
  def skipped_images(self) -> int:
    return getattr(self._source, "skipped_images", 0)

  def close(self) -> None:
    """Drops the batches in flight and closes the source (when it has `close`)."""
    self._queue.clear()
    if hasattr(self._source, "close"):
      self._source.close()


def device_prefetch(iterator: Iterator[Any], size: int = 2, devices=None) -> _DevicePrefetcher:
  """Wraps a host batch iterator so the next `size` batches are copied to the devices
  (`parallel.shard`, asynchronous) while the current step runs.

  Args:
    iterator: yields pytrees whose leaves are [L, ...] (e.g. an InputIterator).
    size: batches kept in flight on the devices.
    devices: the L local devices (default: jax.local_devices()).

  Returns:
    An iterator of device-sharded batches; `skipped_images` forwards the source's count.
  """
  if size < 1:
    raise ValueError(f"device_prefetch size={size} must be >= 1.")
  return _DevicePrefetcher(iterator, size, devices)
