"""The per-example stage of every input pipeline: a record's bytes to uint8 crops and label.

`make_transform` decodes and crops one example (crops.py) for a pipeline mode, with
stateless keys from (seed, process, epoch, position) in deterministic mode. `decode_stream`
maps it over a stream in order, drops corrupt images (truncated or unreadable files) and
counts them in each example's SKIPPED field, and fails the iteration on a label outside
[0, num_classes) with LABEL_ERROR, which `label_message` turns into one line.
"""
import re

import tensorflow as tf

from byol_jax.data import crops

SKIPPED = "_skipped"


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


def make_transform(config, mode: str, process_index: int, channels: int):
  """The per-example function of one pipeline mode: bytes -> uint8 crops + label."""
  size = config.image_size
  area, aspect = crop_ranges(config)
  fraction = config.dataset.get("eval_crop_fraction", crops.DEFAULT_EVAL_CROP_FRACTION)

  if mode not in ("pretrain", "linear", "eval"):
    raise ValueError(f"mode {mode!r} is not one of 'pretrain', 'linear', 'eval'.")

  def transform(ex):
    label = tf.cast(ex["label"], tf.int32)
    if mode == "eval":
      image = crops.decode_and_crop(
          ex["image"], lambda hw: crops.centre_crop_window(hw, fraction)[None], size,
          channels)[0]
      return dict(image=image, label=label, mask=tf.constant(1, tf.int32))
    views = 2 if mode == "pretrain" else 1
    keys = _example_keys(config, process_index, ex, views + 1)
    def windows(hw):
      return tf.stack([crops.random_crop_window(hw, area, aspect, keys[i], fraction)
                       for i in range(views)])

    cropped = crops.decode_and_crop(ex["image"], windows, size, channels)
    if mode == "pretrain":
      return dict(view1=cropped[0], view2=cropped[1], label=label)
    if keys[-1] is None:
      flip = tf.random.uniform([]) < 0.5
    else:
      flip = tf.random.stateless_uniform([], keys[-1]) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(cropped[0], [1]), lambda: cropped[0])
    return dict(image=image, label=label)
  return transform


def _count_skips(ds: tf.data.Dataset) -> tf.data.Dataset:
  """After `ignore_errors`: adds SKIPPED, the running count of dropped positions."""
  def step(state, item):
    last, skipped = state
    position, ex = item
    skipped += position - last - 1
    return (position, skipped), {**ex, SKIPPED: skipped}
  return ds.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), step)


LABEL_ERROR = "byol_jax: label outside [0, dataset.num_classes)"


def _check_labels(ds: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
  """Fails the iteration on a label outside [0, num_classes) (0: no bound known).

  resolve_dataset checks the class count from the metadata; this catches data whose
  labels disagree with it, or data sets that record none.
  """
  if not num_classes:
    return ds

  def check(ex):
    label = ex["label"]
    valid = tf.logical_and(label >= 0, label < num_classes)
    with tf.control_dependencies([tf.debugging.Assert(valid, [LABEL_ERROR, label,
                                                              num_classes])]):
      return {**ex, "label": tf.identity(label)}
  return ds.map(check)


def decode_stream(ds, transform, num_classes: int) -> tf.data.Dataset:
  # Order-preserving map so that gaps in the enumeration are exactly the skipped images.
  ds = ds.enumerate().map(lambda i, ex: (i, transform(ex)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Labels are checked after ignore_errors, which would drop a bad one as a "corrupt image".
  return _check_labels(_count_skips(ds.ignore_errors(log_warning=True)), num_classes)


def label_message(text: str) -> str:
  """One line from tf.debugging.Assert's 'assertion failed: [msg] [label] [num_classes]'."""
  values = re.findall(r"\[(-?\d+)\]", text.split(LABEL_ERROR)[-1])
  label, bound = (values + ["?", "?"])[:2]
  return (f"the data holds label {label}, outside [0, {bound}) (dataset.num_classes={bound}); "
          f"set --config.dataset.num_classes to the data's class count (0: from its "
          "metadata), or fix the labels.")
