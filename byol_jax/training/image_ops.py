"""The single-image ops of BYOL's augmentations: flip, brightness, contrast, saturation,
hue, grayscale, solarize and Gaussian blur.

Pure functions of one float image [H, W, C] with C in {1, 3} and their parameters; none of
them clips (augment.py clips after each op, as the authors' release does). Each is tested
against tf.image. augment.py draws their parameters and applies them to a batch.
"""
import jax
import jax.numpy as jnp

# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale.
LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)

Array = jnp.ndarray


def flip_left_right(image: Array) -> Array:
  """Mirrors an image [H, W, C] along its width."""
  return image[:, ::-1, :]


def adjust_brightness(image: Array, delta: Array | float) -> Array:
  """Adds `delta` to every pixel, as tf.image.adjust_brightness on floats."""
  return image + delta


def adjust_contrast(image: Array, factor: Array | float) -> Array:
  """Scales each channel's deviation from its spatial mean, as tf.image.adjust_contrast."""
  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  return (image - mean) * factor + mean


def rgb_to_hsv(rgb: Array) -> Array:
  """RGB [..., 3] in [0, 1] to HSV [..., 3]; hue is a fraction of the circle in [0, 1)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  # The safe divisor keeps grey pixels (chroma 0) finite; their hue is defined as 0.
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue_sixths = jnp.where(value == r, (g - b) / safe,
                         jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = jnp.where(chroma > 0, hue_sixths / 6.0, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return jnp.stack([hue, saturation, value], axis=-1)


def _wrap(x: Array, period: float) -> Array:
  # x mod period via floor: jnp.mod lowers to fmod, a slow scalar libm call on CPU.
  return x - period * jnp.floor(x / period)


def hsv_to_rgb(hsv: Array) -> Array:
  """HSV [..., 3] (hue a fraction of the circle, any real) to RGB [..., 3]."""
  hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  hue6 = _wrap(hue, 1.0) * 6.0

  def channel(offset):
    # Piecewise-linear ramp of the hue wheel; offsets 5, 3, 1 give R, G, B.
    k = offset + hue6
    k = jnp.where(k >= 6.0, k - 6.0, k)  # k in [1, 11): one wrap suffices.
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def adjust_hsv(image: Array, saturation_factor, hue_delta) -> Array:
  """Scales saturation (clipped to [0, 1]) and rotates hue in one RGB -> HSV -> RGB round
  trip; identity for 1 channel."""
  if image.shape[-1] == 1:  # Gray has no hue, and saturation 0 stays 0.
    return image
  hsv = rgb_to_hsv(image)
  hue = _wrap(hsv[..., 0] + hue_delta, 1.0)
  saturation = jnp.clip(hsv[..., 1] * saturation_factor, 0.0, 1.0)
  return hsv_to_rgb(jnp.stack([hue, saturation, hsv[..., 2]], axis=-1))


def adjust_saturation(image: Array, factor: Array | float) -> Array:
  """Scales HSV saturation by `factor` (clipped to [0, 1]); identity for 1 channel."""
  return adjust_hsv(image, factor, 0.0)


def adjust_hue(image: Array, delta: Array | float) -> Array:
  """Rotates hue by `delta` (a fraction of the circle); identity for 1 channel."""
  return adjust_hsv(image, 1.0, delta)


def to_grayscale(image: Array) -> Array:
  """ITU-R 601 luma repeated to 3 channels, [H, W, 3]; identity for 1 channel."""
  if image.shape[-1] == 1:
    return image
  gray = jnp.tensordot(image, jnp.asarray(LUMA_WEIGHTS, image.dtype), axes=((-1,), (0,)))
  return jnp.repeat(gray[..., None], 3, axis=-1)


def solarize(image: Array, threshold: float) -> Array:
  """Inverts pixels at or above `threshold`: x if x < threshold else 1 - x."""
  return jnp.where(image < threshold, image, 1.0 - image)


def blur_kernel_size(side: int, fraction: float) -> int:
  """Odd blur kernel side about `fraction` of `side`: 2 * int(side * fraction / 2) + 1."""
  return 2 * int(side * fraction / 2) + 1


def gaussian_blur(image: Array, sigma: Array | float, kernel_size: int) -> Array:
  """Separable Gaussian blur of [H, W, C], zero padding ('SAME'), odd `kernel_size`.

  Each 1-D depthwise convolution is written as a weighted sum of shifted copies: under
  vmap every image has its own sigma, and XLA turns a per-example-kernel conv into a
  grouped conv that ran ~25x slower on CPU (64 px) than this fused sum.
  """
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  weights = jnp.exp(-taps**2 / (2.0 * jnp.square(sigma)))
  weights = weights / jnp.sum(weights)

  def blur_axis(x, axis):
    padding = [(0, 0)] * x.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(x, padding)
    size = x.shape[axis]

    def shifted(offset):
      return jax.lax.slice_in_dim(padded, radius + offset, radius + offset + size, axis=axis)

    out = weights[radius] * x
    for offset in range(1, radius + 1):  # The kernel is symmetric: pair the taps.
      out = out + weights[radius + offset] * (shifted(offset) + shifted(-offset))
    return out

  return blur_axis(blur_axis(image, 1), 0)
