"""byol_jax.training.augment and image_ops, one op at a time: each op against tf.image or
NumPy (flip, brightness, contrast, saturation, hue, grayscale, blur, solarize, HSV), one-
channel images, and the colour jitter's random order (uniform over orders, applied in the
drawn order with tf.image's clips).
"""
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
from augment_reference import (blur_bound, index_tree, np_blur, np_jitter_op, op_params,
                               random_images, random_keys, reference_jitter)


# --- Single ops against tf.image and NumPy ---------------------------------------------

IMAGE = random_images((6, 7, 3), seed=1)


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
      np_jitter_op(IMAGE, augment.CONTRAST, op_params(contrast_factor=factor)))


@pytest.mark.parametrize("factor", [0.0, 0.8, 1.2, 3.0])
def test_saturation_matches_tf(factor):
  tolerances.assert_no_less_accurate(
      image_ops.adjust_saturation(IMAGE, factor), tf.image.adjust_saturation(IMAGE, factor).numpy(),
      np_jitter_op(IMAGE, augment.SATURATION, op_params(saturation_factor=factor)))


@pytest.mark.parametrize("delta", [-0.1, 0.07, 0.5])
def test_hue_matches_tf(delta):
  tolerances.assert_no_less_accurate(
      image_ops.adjust_hue(IMAGE, delta), tf.image.adjust_hue(IMAGE, delta).numpy(),
      np_jitter_op(IMAGE, augment.HUE, op_params(hue_delta=delta)))


def test_grayscale_matches_tf_repeated_to_three_channels():
  want = np.repeat(tf.image.rgb_to_grayscale(IMAGE).numpy(), 3, axis=-1)
  tolerances.assert_no_less_accurate(image_ops.to_grayscale(IMAGE), want, np.repeat(
      (IMAGE.astype(np.float64) @ np.array([0.2989, 0.587, 0.114]))[..., None], 3, axis=-1))


@pytest.mark.parametrize("sigma,kernel_size", [(0.7, 3), (1.5, 5), (2.0, 7)])
def test_blur_matches_numpy_2d_convolution_with_zero_padding(sigma, kernel_size):
  image = random_images((9, 11, 3), seed=2)
  want = np_blur(image, sigma, kernel_size)
  tolerances.assert_close(image_ops.gaussian_blur(image, sigma, kernel_size), want,
                          blur_bound(want, sigma, kernel_size))


@pytest.mark.parametrize("side,want", [(224, 23), (64, 7), (32, 3), (8, 1)])
def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side(side, want):
  assert image_ops.blur_kernel_size(side, 0.1) == want


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_matches_formula(threshold):
  image = np.concatenate([IMAGE.ravel(), [threshold, 0.0, 1.0]]).astype(np.float32)
  want = np.where(image < threshold, image, 1.0 - image)
  np.testing.assert_array_equal(image_ops.solarize(image, threshold), want)


def test_rgb_to_hsv_matches_colorsys_and_round_trips():
  rgb = np.concatenate([random_images((200, 3), seed=3), np.eye(3), np.ones((1, 3)) * 0.4,
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
  gray = random_images((6, 7, 1), seed=4)
  for op in (lambda x: image_ops.adjust_saturation(x, 1.5), lambda x: image_ops.adjust_hue(x, 0.2),
             image_ops.to_grayscale):
    np.testing.assert_array_equal(op(gray), gray)
  tolerances.assert_no_less_accurate(
      image_ops.adjust_contrast(gray, 1.3), tf.image.adjust_contrast(gray, 1.3).numpy(),
      np_jitter_op(gray, augment.CONTRAST, op_params(contrast_factor=1.3)))
  want = np_blur(gray, 1.0, 3)
  tolerances.assert_close(image_ops.gaussian_blur(gray, 1.0, 3), want, blur_bound(want, 1.0, 3))


# --- Colour jitter in random order -----------------------------------------------------

@functools.lru_cache(maxsize=None)
def _params():
  """4,800 jitter draws from the paper's strengths (one compile, shared)."""
  sample = functools.partial(augment.sample_jitter_params, brightness=0.4, contrast=0.4,
                             saturation=0.2, hue=0.1)
  return jax.jit(jax.vmap(sample))(random_keys(4800))


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
  p = index_tree(p, first_of_each_order)
  image = random_images((8, 8, 3), seed=5)
  apply = jax.jit(jax.vmap(lambda q: augment.apply_color_jitter(jnp.asarray(image), q, ops)))
  got = np.asarray(apply(p))
  for i in range(24):  # No less accurate than tf.image's float32 ops against float64.
    q = index_tree(p, i)
    tolerances.assert_no_less_accurate({i: got[i]}, {i: reference_jitter(image, q, ops)},
                                       {i: reference_jitter(image, q, ops, float64=True)})


def test_unknown_jitter_op_is_rejected_with_valid_names():
  with pytest.raises(ValueError, match="valid.*brightness"):
    augment.apply_color_jitter(IMAGE, index_tree(_params(), 0), ["sharpness"])
