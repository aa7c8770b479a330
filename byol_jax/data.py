"""Host input pipelines (tf.data): pretrain, linear-train, fine-tune (a subset) and eval batches.

Each pipeline takes this process's slice of a split from sources.open_split (tfds data
sets with 'image' and 'label'; split names and aliases are documented there), decodes
and crops on the host and yields NumPy batches shaped [local_devices, per_device_batch,
...] with uint8 images (normalised on the device: 4x fewer bytes to send than float32).
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
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import parallel
from byol_jax import sources

# ImageNet evaluation crops 224 px from an image resized to 256: keep that fraction.
DEFAULT_EVAL_CROP_FRACTION = 224 / 256
CROP_ATTEMPTS = 10
# Powers of two libjpeg can scale by while decoding (DCT scaling).
_JPEG_RATIOS = (1, 2, 4, 8)
_SKIPPED = "_skipped"
_MAX_EPOCHS = 1 << 40


# ----------------------------------------------------------------------------- crops


def centre_crop_window(shape_hw: tf.Tensor, fraction: float) -> tf.Tensor:
  """Square centre window of side `fraction` x the shorter side, as [y, x, h, w] int32."""
  h, w = shape_hw[0], shape_hw[1]
  side = tf.maximum(1, tf.cast(fraction * tf.cast(tf.minimum(h, w), tf.float32), tf.int32))
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def random_crop_window(shape_hw: tf.Tensor, area_range: Sequence[float],
                       aspect_range: Sequence[float], seed: tf.Tensor | None = None,
                       fallback_fraction: float = DEFAULT_EVAL_CROP_FRACTION) -> tf.Tensor:
  """Random-resized-crop window [y, x, h, w] int32 for an image of shape [h, w].

  Samples as `tf.image.sample_distorted_bounding_box` (area fraction and aspect ratio
  uniform in their ranges, CROP_ATTEMPTS tries); when every try fails it returns the
  whole image, which is replaced by the centre crop, as the reference does.
  `seed` ([2] int): stateless sampling; None: stateful (faster, not reproducible).
  """
  shape_hw = tf.cast(shape_hw, tf.int32)
  args = dict(image_size=tf.concat([shape_hw, [1]], 0),
              bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
              min_object_covered=float(area_range[0]),
              aspect_ratio_range=tuple(aspect_range), area_range=tuple(area_range),
              max_attempts=CROP_ATTEMPTS, use_image_if_no_bounding_boxes=True)
  if seed is None:
    begin, size, _ = tf.image.sample_distorted_bounding_box(**args)
  else:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(seed=seed, **args)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  failed = tf.reduce_all(tf.equal(size[:2], shape_hw))
  return tf.where(failed, centre_crop_window(shape_hw, fallback_fraction), window)


def resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize of [h, w, C] to [size, size, C], rounded and clipped to uint8."""
  # The bicubic kernel is ~25% faster on float32 input than on uint8 (same values).
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  # Bicubic overshoots [0, 255]; clip before the cast so edges do not wrap around.
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _crops(region: tf.Tensor, windows: tf.Tensor, origin: tf.Tensor, ratio: int, size: int):
  """Resized crops of `windows` (full-size coordinates) from `region`, a part of the
  image decoded at 1/ratio scale whose top-left corner is `origin` (scaled)."""
  out = []
  for i in range(windows.shape[0]):
    y, x = windows[i, 0] // ratio - origin[0], windows[i, 1] // ratio - origin[1]
    h, w = tf.maximum(1, windows[i, 2] // ratio), tf.maximum(1, windows[i, 3] // ratio)
    out.append(resize_uint8(region[y:y + h, x:x + w], size))
  return tf.stack(out)


def decode_and_crop(image_bytes: tf.Tensor, window_fn: Callable[[tf.Tensor], tf.Tensor],
                    size: int, channels: int) -> tf.Tensor:
  """Decodes an encoded image and returns one resized crop per window.

  JPEG (detected from the bytes, not the file name) is decoded once, only over the
  bounding box of all windows (`decode_and_crop_jpeg`) and at the largest DCT scale
  1/r (r in 1, 2, 4, 8) that keeps every crop at least `size` pixels a side; windows are
  divided by r. For two views one decode is ~1.3x faster than two decode_and_crop_jpeg
  calls; decoding the box rather than the whole image ties on 500x375 JPEGs and saves
  work on larger ones (measured by bench_input.py). Other formats decode fully.

  Args:
    image_bytes: scalar string, any format `tf.io.decode_image` reads.
    window_fn: maps the image shape [h, w] (int32) to windows [V, 4] = (y, x, h, w).
    size: output side S.
    channels: output channels C (grayscale/CMYK/RGBA sources are converted).

  Returns:
    [V, S, S, C] uint8, bicubic-resized crops.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)[:2]
    windows = window_fn(shape)
    shortest = tf.reduce_min(windows[:, 2:])
    # Index of the largest ratio r with shortest >= r * size: shrinks, never upsamples.
    level = tf.add_n([tf.cast(shortest >= r * size, tf.int32) for r in _JPEG_RATIOS[1:]])
    top = tf.reduce_min(windows[:, :2], 0)
    bottom = tf.reduce_max(windows[:, :2] + windows[:, 2:], 0)

    def decode(ratio):
      def fn():
        start = top // ratio
        end = tf.minimum(-(-bottom // ratio), -(-shape // ratio))  # Scaled sizes round up.
        region = tf.image.decode_and_crop_jpeg(image_bytes, tf.concat([start, end - start], 0),
                                               channels=channels, ratio=ratio)
        return _crops(region, windows, start, ratio, size)
      return fn
    return tf.switch_case(level, [decode(r) for r in _JPEG_RATIOS])

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    return _crops(image, window_fn(tf.shape(image)[:2]), tf.zeros([2], tf.int32), 1, size)

  crops = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  return tf.ensure_shape(crops, [None, size, size, channels])


# ------------------------------------------------------------------- per-example ops


def crop_ranges(config):
  """(area range, aspect range) of the random-resized crop, from config.augment."""
  a = config.augment
  return (a.crop_area_min, a.crop_area_max), (a.crop_aspect_min, a.crop_aspect_max)


def _example_keys(config, process_index: int, ex, num: int):
  """Stateless keys from (seed, process, epoch, position), or None in stateful mode."""
  if "_epoch" not in ex:
    return [None] * num
  key = tf.constant([config.seed, process_index], tf.int64)
  for value in (ex["_epoch"], ex["_pos"]):
    key = tf.random.experimental.stateless_fold_in(key, value)
  return tf.unstack(tf.random.experimental.stateless_split(key, num))


def _make_transform(config, mode: str, process_index: int, channels: int):
  """The per-example function of one pipeline mode: bytes -> uint8 crops + label."""
  size = config.image_size
  area, aspect = crop_ranges(config)
  fraction = config.dataset.get("eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION)

  if mode not in ("pretrain", "linear", "eval"):
    raise ValueError(f"mode {mode!r} is not one of 'pretrain', 'linear', 'eval'.")

  def transform(ex):
    label = tf.cast(ex["label"], tf.int32)
    if mode == "eval":
      image = decode_and_crop(ex["image"], lambda hw: centre_crop_window(hw, fraction)[None],
                              size, channels)[0]
      return dict(image=image, label=label, mask=tf.constant(1, tf.int32))
    views = 2 if mode == "pretrain" else 1
    keys = _example_keys(config, process_index, ex, views + 1)
    def windows(hw):
      return tf.stack([random_crop_window(hw, area, aspect, keys[i], fraction)
                       for i in range(views)])

    crops = decode_and_crop(ex["image"], windows, size, channels)
    if mode == "pretrain":
      return dict(view1=crops[0], view2=crops[1], label=label)
    if keys[-1] is None:
      flip = tf.random.uniform([]) < 0.5
    else:
      flip = tf.random.stateless_uniform([], keys[-1]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(crops[0], [1]), lambda: crops[0])
    return dict(image=image, label=label)
  return transform


def _count_skips(ds: tf.data.Dataset) -> tf.data.Dataset:
  """After `ignore_errors`: adds _SKIPPED, the running count of dropped positions."""
  def step(state, item):
    last, skipped = state
    position, ex = item
    skipped += position - last - 1
    return (position, skipped), {**ex, _SKIPPED: skipped}
  return ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), step)


def _decode_stream(ds, transform) -> tf.data.Dataset:
  # Order-preserving map so that gaps in the enumeration are exactly the skipped images.
  ds = ds.enumerate().map(lambda i, ex: (i, transform(ex)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _count_skips(ds.ignore_errors(log_warning=True))


# ---------------------------------------------------------------------- iterators


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
    batch = next(self._iterator)
    self.skipped_images = max(self.skipped_images, int(batch.pop(_SKIPPED)))
    return batch


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
           for k, v in batch.items() if k != _SKIPPED}
    out[_SKIPPED] = tf.reduce_max(batch[_SKIPPED])
    return out
  return ds.batch(per_process, drop_remainder=True).map(reshape).prefetch(tf.data.AUTOTUNE)


def _train_iterator(config, mode, split, process_index, process_count, local_device_count,
                    start_step, batch_size):
  deterministic = bool(config.dataset.deterministic)
  src = sources.open_split(config, split, process_index, process_count, deterministic)
  base = src.ds.cache() if src.small else src.ds
  return _stream(config, mode, base, src.num_examples, src.small, src.channels,
                 process_index, process_count, local_device_count, start_step, batch_size)


def _stream(config, mode, base, num_examples, small, channels, process_index, process_count,
            local_device_count, start_step, batch_size) -> InputIterator:
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
  ds = _decode_stream(ds, _make_transform(config, mode, process_index, channels))
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
  """
  decoders = tfds.decode.PartialDecoding({"label": True})
  _, ds = _in_stored_order(config, split, decoders)
  ds = ds.map(lambda ex: ex["label"]).batch(8192)
  return np.concatenate([np.asarray(b, np.int64) for b in tfds.as_numpy(ds)] or
                        [np.zeros([0], np.int64)])


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
  return _stream(config, "linear", base, count, small, src.channels, process_index,
                 process_count, local_device_count, start_step, batch_size)


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
  ds = _decode_stream(src.ds, _make_transform(config, "eval", process_index, src.channels))
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
