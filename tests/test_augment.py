"""Tests of byol_jax.training.augment: each op against tf.image or NumPy, the random order, the
probabilities, and the batched, jitted pipeline against a reference built op by op."""
import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import tolerances
from byol_jax.training import augment
from byol_jax.training import image_ops
from byol_jax import config as config_lib

_OFF = dict(flip_prob=0.0, color_jitter_prob=0.0, brightness=0.4, contrast=0.4,
            saturation=0.2, hue=0.1, grayscale_prob=0.0, blur_prob=0.0, blur_sigma_min=0.5,
            blur_sigma_max=2.0, blur_kernel_fraction=0.5, solarize_prob=0.0,
            solarize_threshold=0.5)
_PROB_FIELD = dict(flip="flip_prob", jitter="color_jitter_prob", grayscale="grayscale_prob",
                   blur="blur_prob", solarize="solarize_prob")


def _view(**overrides) -> augment.ViewConfig:
  return augment.view_config({**_OFF, **overrides})


@functools.lru_cache(maxsize=None)
def _jitted_augment(view: augment.ViewConfig):
  """One compiled augment_view per view config, shared by the tests."""
  return jax.jit(functools.partial(augment.augment_view, view_cfg=view))


def _images(shape, seed=0, low=0.0, high=1.0):
  return np.random.RandomState(seed).uniform(low, high, shape).astype(np.float32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.PRNGKey(seed), n)


# --- Independent references ------------------------------------------------------------

def _np_blur(image, sigma, kernel_size):
  """2-D convolution with the outer-product Gaussian kernel, zero padding, float64."""
  radius = kernel_size // 2
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-x**2 / (2 * sigma**2))
  kernel = np.outer(w, w) / np.sum(w)**2
  h, wd, _ = image.shape
  padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)))
  return sum(kernel[i, j] * padded[i:i + h, j:j + wd]
             for i in range(kernel_size) for j in range(kernel_size))


def _tf_jitter_op(image, op, params):
  if op == augment.BRIGHTNESS:
    return tf.image.adjust_brightness(image, float(params.brightness_delta))
  if op == augment.CONTRAST:
    return tf.image.adjust_contrast(image, float(params.contrast_factor))
  if image.shape[-1] == 1:  # Saturation and hue are defined as identities on gray.
    return image
  if op == augment.SATURATION:
    return tf.image.adjust_saturation(image, float(params.saturation_factor))
  return tf.image.adjust_hue(image, float(params.hue_delta))


def _np_hsv_op(image, fn):
  """fn(h, s, v) -> (h, s, v) applied per pixel through colorsys, in float64."""
  flat = np.asarray(image, np.float64).reshape(-1, 3)
  return np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*p))) for p in flat]).reshape(
      np.shape(image))


def _np_jitter_op(image, op, params):
  """_tf_jitter_op's maths in NumPy float64 (HSV through colorsys): the float64 reference."""
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
    return _np_hsv_op(x, lambda h, s, v: (h, min(max(s * f, 0.0), 1.0), v))
  d = float(params.hue_delta)
  return _np_hsv_op(x, lambda h, s, v: ((h + d) % 1.0, s, v))


def _reference_jitter(image, params, ops=augment.JITTER_OPS, float64=False):
  """tf.image's float32 ops in the drawn order, or with float64 their NumPy float64 maths."""
  x = np.asarray(image, np.float64) if float64 else tf.constant(image)
  for op in np.argsort(np.asarray(params.position)):
    if augment.JITTER_OPS[op] in ops:
      x = (np.clip(_np_jitter_op(x, op, params), 0.0, 1.0) if float64 else
           tf.clip_by_value(_tf_jitter_op(x, op, params), 0.0, 1.0))
  return x if float64 else x.numpy()


def _reference_view(image, draws, view, float64=False):
  """The pipeline, one image, from tf.image and NumPy ops, following `draws` (with float64:
  NumPy float64 maths throughout, the float64 reference)."""
  x = np.asarray(image, np.float64) if float64 else image
  if draws.flip:
    x = x[:, ::-1] if float64 else tf.image.flip_left_right(x).numpy()
  if draws.color_jitter:
    x = _reference_jitter(x, draws.jitter, float64=float64)
  if draws.grayscale and x.shape[-1] == 3:
    gray = x @ np.array([0.2989, 0.587, 0.114]) if float64 else tf.image.rgb_to_grayscale(x).numpy()[..., 0]
    x = np.repeat(gray[..., None], 3, axis=-1)
  if draws.blur:
    x = _np_blur(x, float(draws.blur_sigma),
                 image_ops.blur_kernel_size(x.shape[0], view.blur_kernel_fraction))
  if draws.solarize:
    x = np.where(x < view.solarize_threshold, x, 1.0 - x)
  return np.clip(x, 0.0, 1.0)


def _op_params(**values):
  """JitterParams holding float32 values for single-op references (the ops' own rounding)."""
  return augment.JitterParams(None, *(np.float32(values.get(f, 0.0)) for f in augment.JitterParams._fields[1:]))


def _blur_bound(ref, sigma, kernel_size):
  """Float32 rounding of the separable blur of a non-negative image, against float64.

  Each tap weight exp(-t^2 / 2 sigma^2) is off by (3 |a| + 1) ulps (its argument a, rounded,
  passes through exp), the normalisation by their sum of k taps by k + 1 more; two passes
  apply the weights (twice that) and sum k terms each (2 k ulps), all of one sign."""
  a = (kernel_size // 2)**2 / (2 * sigma**2)
  return tolerances.ulps(2 * (3 * a + kernel_size + 2) + 2 * kernel_size, ref)


def _index(tree, i):
  return jax.tree.map(lambda leaf: np.asarray(leaf)[i], tree)


# --- Single ops against tf.image and NumPy ---------------------------------------------

IMAGE = _images((6, 7, 3), seed=1)


def test_flip_matches_tf():
  np.testing.assert_array_equal(image_ops.flip_left_right(IMAGE),
                                tf.image.flip_left_right(IMAGE).numpy())


@pytest.mark.parametrize("delta", [-0.3, 0.25])
def test_brightness_matches_tf(delta):
  # One float32 addition of the same float32 delta on both sides: bitwise equal.
  np.testing.assert_array_equal(image_ops.adjust_brightness(IMAGE, delta),
                                tf.image.adjust_brightness(IMAGE, delta).numpy())


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_contrast_matches_tf_per_channel_mean(factor):
  # float32 both: against the float64 maths, no less accurate than tf.image (this and below).
  tolerances.assert_no_less_accurate(
      image_ops.adjust_contrast(IMAGE, factor), tf.image.adjust_contrast(IMAGE, factor).numpy(),
      _np_jitter_op(IMAGE, augment.CONTRAST, _op_params(contrast_factor=factor)))


@pytest.mark.parametrize("factor", [0.0, 0.8, 1.2, 3.0])
def test_saturation_matches_tf(factor):
  tolerances.assert_no_less_accurate(
      image_ops.adjust_saturation(IMAGE, factor), tf.image.adjust_saturation(IMAGE, factor).numpy(),
      _np_jitter_op(IMAGE, augment.SATURATION, _op_params(saturation_factor=factor)))


@pytest.mark.parametrize("delta", [-0.1, 0.07, 0.5])
def test_hue_matches_tf(delta):
  tolerances.assert_no_less_accurate(
      image_ops.adjust_hue(IMAGE, delta), tf.image.adjust_hue(IMAGE, delta).numpy(),
      _np_jitter_op(IMAGE, augment.HUE, _op_params(hue_delta=delta)))


def test_grayscale_matches_tf_repeated_to_three_channels():
  want = np.repeat(tf.image.rgb_to_grayscale(IMAGE).numpy(), 3, axis=-1)
  tolerances.assert_no_less_accurate(image_ops.to_grayscale(IMAGE), want, np.repeat(
      (IMAGE.astype(np.float64) @ np.array([0.2989, 0.587, 0.114]))[..., None], 3, axis=-1))


@pytest.mark.parametrize("sigma,kernel_size", [(0.7, 3), (1.5, 5), (2.0, 7)])
def test_blur_matches_numpy_2d_convolution_with_zero_padding(sigma, kernel_size):
  image = _images((9, 11, 3), seed=2)
  want = _np_blur(image, sigma, kernel_size)
  tolerances.assert_close(image_ops.gaussian_blur(image, sigma, kernel_size), want,
                          _blur_bound(want, sigma, kernel_size))


@pytest.mark.parametrize("side,want", [(224, 23), (64, 7), (32, 3), (8, 1)])
def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side(side, want):
  assert image_ops.blur_kernel_size(side, 0.1) == want


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_matches_formula(threshold):
  image = np.concatenate([IMAGE.ravel(), [threshold, 0.0, 1.0]]).astype(np.float32)
  want = np.where(image < threshold, image, 1.0 - image)
  np.testing.assert_array_equal(image_ops.solarize(image, threshold), want)


def test_rgb_to_hsv_matches_colorsys_and_round_trips():
  rgb = np.concatenate([_images((200, 3), seed=3), np.eye(3), np.ones((1, 3)) * 0.4,
                        np.zeros((1, 3)), [[1.0, 1.0, 0.0], [0.2, 0.2, 0.9]]]).astype(np.float32)
  hsv = np.asarray(image_ops.rgb_to_hsv(rgb))
  want = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.astype(np.float64)])
  # From exact float32 inputs: v exact; chroma and s (a quotient) 2 ulps; the hue, a quotient
  # of at most 1 plus a sextant offset up to 4, over 6, plus 1 if negative: 4 ulps of 1.
  tolerances.assert_close(hsv, want, tolerances.ulps(np.array([4, 2, 0]), np.maximum(want, [1, 0, 0])))
  # Back: 6 x the hue's 4 ulps, the ramp's offsets and clips (~6 ulps of 11), and the
  # products and difference with v, s (~6 ulps): 36 ulps of 1.
  tolerances.assert_close(image_ops.hsv_to_rgb(hsv), rgb, tolerances.ulps(36))


def test_one_channel_images_skip_colour_ops_and_keep_the_rest():
  gray = _images((6, 7, 1), seed=4)
  for op in (lambda x: image_ops.adjust_saturation(x, 1.5), lambda x: image_ops.adjust_hue(x, 0.2),
             image_ops.to_grayscale):
    np.testing.assert_array_equal(op(gray), gray)
  tolerances.assert_no_less_accurate(
      image_ops.adjust_contrast(gray, 1.3), tf.image.adjust_contrast(gray, 1.3).numpy(),
      _np_jitter_op(gray, augment.CONTRAST, _op_params(contrast_factor=1.3)))
  want = _np_blur(gray, 1.0, 3)
  tolerances.assert_close(image_ops.gaussian_blur(gray, 1.0, 3), want, _blur_bound(want, 1.0, 3))


# --- Colour jitter in random order -----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _params():
  """4,800 jitter draws from the paper's strengths (one compile, shared)."""
  sample = functools.partial(augment.sample_jitter_params, brightness=0.4, contrast=0.4,
                             saturation=0.2, hue=0.1)
  return jax.jit(jax.vmap(sample))(_keys(4800))


@functools.lru_cache(maxsize=None)
def _jitted_draws(view: augment.ViewConfig):
  return jax.jit(jax.vmap(lambda key: augment.sample_view_draws(key, view)))


def test_jitter_draws_every_order_uniformly_and_values_in_range():
  p = _params()
  position = np.asarray(p.position)
  n = len(position)
  assert (np.sort(position, axis=1) == np.arange(4)).all()  # Each a permutation.
  counts = np.unique(position, axis=0, return_counts=True)[1]
  mean, sigma = n / 24, np.sqrt(n / 24 * (1 - 1 / 24))
  assert len(counts) == 24 and np.abs(counts - mean).max() < 4 * sigma, counts
  for values, low, high in [(p.brightness_delta, -0.4, 0.4), (p.contrast_factor, 0.6, 1.4),
                            (p.saturation_factor, 0.8, 1.2), (p.hue_delta, -0.1, 0.1)]:
    values = np.asarray(values)
    assert low <= values.min() < low + 0.01 and high - 0.01 < values.max() <= high


# All four ops, and one HSV op between RGB ops (three gaps, one HSV slot).
@pytest.mark.parametrize("ops", [augment.JITTER_OPS, ("brightness", "contrast", "hue")])
def test_jitter_applies_ops_in_drawn_order_with_clips_like_tf(ops):
  p = _params()
  first_of_each_order = np.unique(np.asarray(p.position), axis=0, return_index=True)[1]
  assert len(first_of_each_order) == 24
  p = _index(p, first_of_each_order)
  image = _images((8, 8, 3), seed=5)
  apply = jax.jit(jax.vmap(lambda q: augment.apply_color_jitter(jnp.asarray(image), q, ops)))
  got = np.asarray(apply(p))
  for i in range(24):  # No less accurate than tf.image's float32 ops against float64.
    q = _index(p, i)
    tolerances.assert_no_less_accurate({i: got[i]}, {i: _reference_jitter(image, q, ops)},
                                       {i: _reference_jitter(image, q, ops, float64=True)})


def test_unknown_jitter_op_is_rejected_with_valid_names():
  with pytest.raises(ValueError, match="valid.*brightness"):
    augment.apply_color_jitter(IMAGE, _index(_params(), 0), ["sharpness"])


# --- Probabilities ---------------------------------------------------------------------

N_DRAWS = 10_000
PROB_IMAGES = _images((N_DRAWS, 4, 4, 3), seed=6, low=0.6, high=0.9)


def _detect(op, before, after):
  """Per image: whether `op` (and only it) changed the image."""
  changed = np.any(before != after, axis=(1, 2, 3))
  if op == "flip":
    return changed & np.all(after == before[:, :, ::-1], axis=(1, 2, 3))
  if op == "grayscale":
    return changed & np.all(after == after[..., :1], axis=(1, 2, 3))
  return changed


@pytest.mark.parametrize("op", sorted(_PROB_FIELD))
def test_each_op_applies_with_its_probability(op):
  prob = 0.3
  keys = _keys(N_DRAWS, seed=7)
  out = _jitted_augment(_view(**{_PROB_FIELD[op]: prob}))(PROB_IMAGES, keys)
  applied = _detect(op, PROB_IMAGES, np.asarray(out))
  sigma = np.sqrt(N_DRAWS * prob * (1 - prob))
  assert abs(applied.sum() - N_DRAWS * prob) < 3 * sigma, applied.sum()
  # And exactly on the images whose drawn flag says so (flags do not depend on which
  # other ops are enabled, so one draw config serves every op).
  draws = _jitted_draws(_view(**{f: prob for f in _PROB_FIELD.values()}))(keys)
  field = "color_jitter" if op == "jitter" else op
  np.testing.assert_array_equal(applied, np.asarray(getattr(draws, field)))


def test_probability_zero_never_and_one_always_applies():
  keys = _keys(N_DRAWS, seed=7)
  never = _jitted_augment(_view())(PROB_IMAGES, keys)
  np.testing.assert_array_equal(never, PROB_IMAGES)
  ones = {f: 1.0 for f in _PROB_FIELD.values()}
  draws = _jitted_draws(_view(**ones))(keys)
  assert all(np.asarray(getattr(draws, f)).all()
             for f in ("flip", "color_jitter", "grayscale", "blur", "solarize"))
  # With p = 1 the pipeline takes its no-select path; the op-by-op reference below
  # (test_pipeline_matches_op_by_op_reference[ones]) shows every op is then applied.


# --- The batched pipeline --------------------------------------------------------------

HALF = _view(flip_prob=0.5, color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5,
             solarize_prob=0.5)
ONES = _view(**{f: 1.0 for f in _PROB_FIELD.values()})


# Float RGB and uint8 gray inputs; probabilities 0.5 (selects) and 1 (no-select path).
@pytest.mark.parametrize("view,channels,dtype", [(HALF, 3, np.float32), (HALF, 1, np.uint8),
                                                 (ONES, 3, np.float32)],
                         ids=["half-rgb-float", "half-gray-uint8", "ones-rgb-float"])
def test_pipeline_matches_op_by_op_reference(view, channels, dtype):
  n = 32
  images = _images((n, 8, 8, channels), seed=8)
  if dtype == np.uint8:
    images = np.round(images * 255).astype(np.uint8)
  keys = _keys(n, seed=9)
  got = _jitted_augment(view)(images, keys)
  assert got.dtype == jnp.float32 and got.shape == images.shape
  got = np.asarray(got)
  assert 0.0 <= got.min() and got.max() <= 1.0
  draws = _jitted_draws(view)(keys)
  floats = images.astype(np.float32) / (255.0 if dtype == np.uint8 else 1.0)
  for i in range(n):  # No less accurate than the tf.image / NumPy reference against float64.
    d = _index(draws, i)
    tolerances.assert_no_less_accurate(
        {f"image {i}": got[i]}, {f"image {i}": _reference_view(floats[i], d, view)},
        {f"image {i}": _reference_view(floats[i], d, view, float64=True)})


def test_same_key_same_output_and_each_key_its_own_output():
  same_image = np.repeat(_images((1, 8, 8, 3), seed=10), 32, axis=0)
  keys = _keys(32, seed=9)
  augment_fn = _jitted_augment(ONES)  # Every op on: outputs differ only by their draws.
  out = np.asarray(augment_fn(same_image, keys))
  np.testing.assert_array_equal(out, augment_fn(same_image, keys))
  repeated = np.asarray(augment_fn(same_image, keys[np.zeros(32, np.int32)]))
  assert all(np.array_equal(repeated[i], out[0]) for i in range(32))
  assert all(not np.array_equal(out[i], out[j]) for i in range(32) for j in range(i))


def test_jit_equals_eager_on_the_paper_view2_preset():
  images = np.random.RandomState(11).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  keys = _keys(4)
  view = config_lib.view_preset(2)
  eager = augment.augment_view(images, keys, view)
  jitted = jax.jit(lambda x, k: augment.augment_view(x, k, view))(images, keys)
  # Fusion reorders float sums (contrast means, blur taps): equal up to rounding, so the
  # jitted views are no less accurate than the eager ones against the float64 pipeline.
  draws = _jitted_draws(augment.view_config(view))(keys)
  want = np.stack([_reference_view(images[i] / 255.0, _index(draws, i), augment.view_config(view),
                                   float64=True) for i in range(len(images))])
  tolerances.assert_no_less_accurate(np.asarray(jitted), np.asarray(eager), want)


def test_paper_view_presets_read_from_the_config():
  c = config_lib.base_config()
  assert augment.view_config(c.augment.view1).blur_prob == 1.0
  assert augment.view_config(c.augment.view2).solarize_prob == 0.2


@pytest.mark.parametrize("images,keys,match", [
    (np.zeros((2, 8, 8)), _keys(2), r"\[B, H, W, C\]"),
    (np.zeros((2, 8, 8, 4)), _keys(2), "C in"),
    (np.zeros((2, 8, 8, 3), np.int32), _keys(2), "uint8"),
    (np.zeros((2, 8, 8, 3)), _keys(3), "one PRNG key per example"),
])
def test_bad_batch_is_rejected_with_the_fix(images, keys, match):
  with pytest.raises(ValueError, match=match):
    augment.augment_view(images, keys, HALF)


@pytest.mark.parametrize("overrides,match", [
    (dict(flip_prob=1.5), "flip_prob.*probability"),
    (dict(hue=0.7), "hue"),
    (dict(blur_sigma_min=3.0), "blur_sigma_min <= blur_sigma_max"),
])
def test_bad_view_config_is_rejected_naming_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    _view(**overrides)


def test_missing_view_field_is_named():
  fields = dict(_OFF)
  del fields["solarize_threshold"]
  with pytest.raises(ValueError, match="solarize_threshold"):
    augment.view_config(fields)
