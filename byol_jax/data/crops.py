"""The host's TensorFlow image ops: crop windows, decode-and-crop, bicubic resize to uint8.

Random-resized-crop and centre-crop windows, and one decode per image that yields every
view's crop (JPEGs decoded over the windows' bounding box at a DCT scale). Pure tf ops,
usable eagerly and inside tf.data; separate from data.py, which builds the pipelines
around them, so they can be tested and benchmarked (bench_input.py) on their own.
"""
from typing import Callable, Sequence

import tensorflow as tf

# ImageNet evaluation crops 224 px from an image resized to 256: keep that fraction.
DEFAULT_EVAL_CROP_FRACTION = 224 / 256
CROP_ATTEMPTS = 10
# Powers of two libjpeg can scale by while decoding (DCT scaling).
_JPEG_RATIOS = (1, 2, 4, 8)


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
