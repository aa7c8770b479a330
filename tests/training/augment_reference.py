"""Independent references for the augmentation tests: each op in NumPy (float64 when asked)
or through tf.image, a view built op by op from the drawn parameters, error bounds for the
blur, and the view configs, images and keys the tests use.
"""
import colorsys
import functools

import jax
import numpy as np
import tensorflow as tf

import tolerances
from byol_jax.training import augment
from byol_jax.training import image_ops


OFF = dict(flip_prob=0.0, color_jitter_prob=0.0, brightness=0.4, contrast=0.4,
           saturation=0.2, hue=0.1, grayscale_prob=0.0, blur_prob=0.0, blur_sigma_min=0.5,
           blur_sigma_max=2.0, blur_kernel_fraction=0.5, solarize_prob=0.0,
           solarize_threshold=0.5)
PROB_FIELD = dict(flip="flip_prob", jitter="color_jitter_prob", grayscale="grayscale_prob",
                  blur="blur_prob", solarize="solarize_prob")


def view_config(**overrides) -> augment.ViewConfig:
  return augment.view_config({**OFF, **overrides})


@functools.lru_cache(maxsize=None)
def jitted_augment(view: augment.ViewConfig):
  """One compiled augment_view per view config, shared by the tests."""
  return jax.jit(functools.partial(augment.augment_view, view_cfg=view))


def random_images(shape, seed=0, low=0.0, high=1.0):
  return np.random.RandomState(seed).uniform(low, high, shape).astype(np.float32)


def random_keys(n, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), n)



@functools.lru_cache(maxsize=None)
def jitted_draws(view: augment.ViewConfig):
  """vmapped, jitted draws of a view's random parameters, one per key."""
  return jax.jit(jax.vmap(lambda key: augment.sample_view_draws(key, view)))


# --- Independent references ------------------------------------------------------------

def np_blur(image, sigma, kernel_size):
  """2-D convolution with the outer-product Gaussian kernel, zero padding, float64."""
  radius = kernel_size // 2
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-x**2 / (2 * sigma**2))
  kernel = np.outer(w, w) / np.sum(w)**2
  h, wd, _ = image.shape
  padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
  return sum(kernel[i, j] * padded[i:i + h, j:j + wd]
             for i in range(kernel_size) for j in range(kernel_size))


def tf_jitter_op(image, op, params):
  if op == augment.BRIGHTNESS:
    return tf.image.adjust_brightness(image, float(params.brightness_delta))
  if op == augment.CONTRAST:
    return tf.image.adjust_contrast(image, float(params.contrast_factor))
  if image.shape[-1] == 1:  # Saturation and hue are defined as identities on gray.
    return image
  if op == augment.SATURATION:
    return tf.image.adjust_saturation(image, float(params.saturation_factor))
  return tf.image.adjust_hue(image, float(params.hue_delta))


def np_hsv_op(image, fn):
  """fn(h, s, v) -> (h, s, v) applied per pixel through colorsys, in float64."""
  flat = np.asarray(image, np.float64).reshape(-1, 3)
  return np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*p))) for p in flat]).reshape(
      np.shape(image))


def np_jitter_op(image, op, params):
  """tf_jitter_op's maths in NumPy float64 (HSV through colorsys): the float64 reference."""
  x = np.asarray(image, np.float64)
  if op == augment.BRIGHTNESS:
    return x + float(params.brightness_delta)
  if op == augment.CONTRAST:
    mean = x.mean(axis=(0, 1), keepdims=True)
    return (x - mean) * float(params.contrast_factor) + mean
  if x.shape[-1] == 1:
    return x
  if op == augment.SATURATION:
    f = float(params.saturation_factor)
    return np_hsv_op(x, lambda h, s, v: (h, min(max(s * f, 0.0), 1.0), v))
  d = float(params.hue_delta)
  return np_hsv_op(x, lambda h, s, v: ((h + d) % 1.0, s, v))


def reference_jitter(image, params, ops=augment.JITTER_OPS, float64=False):
  """tf.image's float32 ops in the drawn order, or with float64 their NumPy float64 maths."""
  x = np.asarray(image, np.float64) if float64 else tf.constant(image)
  for op in np.argsort(np.asarray(params.position)):
    if augment.JITTER_OPS[op] in ops:
      x = (np.clip(np_jitter_op(x, op, params), 0.0, 1.0) if float64 else
           tf.clip_by_value(tf_jitter_op(x, op, params), 0.0, 1.0))
  return x if float64 else x.numpy()


def reference_view(image, draws, view, float64=False):
  """The pipeline, one image, from tf.image and NumPy ops, following `draws` (with float64:
  NumPy float64 maths throughout, the float64 reference)."""
  x = np.asarray(image, np.float64) if float64 else image
  if draws.flip:
    x = x[:, ::-1] if float64 else tf.image.flip_left_right(x).numpy()
  if draws.color_jitter:
    x = reference_jitter(x, draws.jitter, float64=float64)
  if draws.grayscale and x.shape[-1] == 3:
    gray = x @ np.array([0.2989, 0.587, 0.114]) if float64 else tf.image.rgb_to_grayscale(x).numpy()[..., 0]
    x = np.repeat(gray[..., None], 3, axis=-1)
  if draws.blur:
    x = np_blur(x, float(draws.blur_sigma),
                 image_ops.blur_kernel_size(x.shape[0], view.blur_kernel_fraction))
  if draws.solarize:
    x = np.where(x < view.solarize_threshold, x, 1.0 - x)
  return np.clip(x, 0.0, 1.0)


def op_params(**values):
  """JitterParams holding float32 values for single-op references (the ops' own rounding)."""
  return augment.JitterParams(None, *(np.float32(values.get(f, 0.0)) for f in augment.JitterParams._fields[1:]))


def blur_bound(ref, sigma, kernel_size):
  """Float32 rounding of the separable blur of a non-negative image, against float64.

  Each tap weight exp(-t^2 / 2 sigma^2) is off by (3 |a| + 1) ulps (its argument a, rounded,
  passes through exp), the normalisation by their sum of k taps by k + 1 more; two passes
  apply the weights (twice that) and sum k terms each (2 k ulps), all of one sign."""
  a = (kernel_size // 2)**2 / (2 * sigma**2)
  return tolerances.ulps(2 * (3 * a + kernel_size + 2) + 2 * kernel_size, ref)


def index_tree(tree, i):
  return jax.tree.map(lambda leaf: np.asarray(leaf)[i], tree)
