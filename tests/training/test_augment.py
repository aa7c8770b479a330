"""byol_jax.training.augment as the update step calls it: each op applied with its probability
(10,000 draws, 3-sigma bounds), and the batched, jitted pipeline against a reference built
op by op (tests/training/augment_reference.py); keys, jit vs eager, the paper's presets,
errors that name the fix.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from byol_jax.training import augment
from byol_jax import config as config_lib
from augment_reference import (OFF, PROB_FIELD, index_tree, jitted_augment, random_images,
                               random_keys, reference_view, view_config)
from augment_reference import jitted_draws


# --- Probabilities ---------------------------------------------------------------------

N_DRAWS = 10_000
PROB_IMAGES = random_images((N_DRAWS, 4, 4, 3), seed=6, low=0.6, high=0.9)


def _detect(op, before, after):
  """Per image: whether `op` (and only it) changed the image."""
  changed = np.any(before != after, axis=(1, 2, 3))
  if op == "flip":
    return changed & np.all(after == before[:, :, ::-1], axis=(1, 2, 3))
  if op == "grayscale":
    return changed & np.all(after == after[..., :1], axis=(1, 2, 3))
  return changed


@pytest.mark.parametrize("op", sorted(PROB_FIELD))
def test_each_op_applies_with_its_probability(op):
  prob = 0.3
  keys = random_keys(N_DRAWS, seed=7)
  out = jitted_augment(view_config(**{PROB_FIELD[op]: prob}))(PROB_IMAGES, keys)
  applied = _detect(op, PROB_IMAGES, np.asarray(out))
  sigma = np.sqrt(N_DRAWS * prob * (1 - prob))
  assert abs(applied.sum() - N_DRAWS * prob) < 3 * sigma, applied.sum()
  # And exactly on the images whose drawn flag says so (flags do not depend on which
  # other ops are enabled, so one draw config serves every op).
  draws = jitted_draws(view_config(**{f: prob for f in PROB_FIELD.values()}))(keys)
  field = "color_jitter" if op == "jitter" else op
  np.testing.assert_array_equal(applied, np.asarray(getattr(draws, field)))


def test_probability_zero_never_and_one_always_applies():
  keys = random_keys(N_DRAWS, seed=7)
  never = jitted_augment(view_config())(PROB_IMAGES, keys)
  np.testing.assert_array_equal(never, PROB_IMAGES)
  ones = {f: 1.0 for f in PROB_FIELD.values()}
  draws = jitted_draws(view_config(**ones))(keys)
  assert all(np.asarray(getattr(draws, f)).all()
             for f in ("flip", "color_jitter", "grayscale", "blur", "solarize"))
  # With p = 1 the pipeline takes its no-select path; the op-by-op reference below
  # (test_pipeline_matches_op_by_op_reference[ones]) shows every op is then applied.


# --- The batched pipeline --------------------------------------------------------------

HALF = view_config(flip_prob=0.5, color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5,
             solarize_prob=0.5)
ONES = view_config(**{f: 1.0 for f in PROB_FIELD.values()})


# Float RGB and uint8 gray inputs; probabilities 0.5 (selects) and 1 (no-select path).
@pytest.mark.parametrize("view,channels,dtype", [(HALF, 3, np.float32), (HALF, 1, np.uint8),
                                                 (ONES, 3, np.float32)],
                         ids=["half-rgb-float", "half-gray-uint8", "ones-rgb-float"])
def test_pipeline_matches_op_by_op_reference(view, channels, dtype):
  n = 32
  images = random_images((n, 8, 8, channels), seed=8)
  if dtype == np.uint8:
    images = np.round(images * 255).astype(np.uint8)
  keys = random_keys(n, seed=9)
  got = jitted_augment(view)(images, keys)
  assert got.dtype == jnp.float32 and got.shape == images.shape
  got = np.asarray(got)
  assert 0.0 <= got.min() and got.max() <= 1.0
  draws = jitted_draws(view)(keys)
  floats = images.astype(np.float32) / (255.0 if dtype == np.uint8 else 1.0)
  for i in range(n):  # No less accurate than the tf.image / NumPy reference against float64.
    d = index_tree(draws, i)
    tolerances.assert_no_less_accurate(
        {f"image {i}": got[i]}, {f"image {i}": reference_view(floats[i], d, view)},
        {f"image {i}": reference_view(floats[i], d, view, float64=True)})


def test_same_key_same_output_and_each_key_its_own_output():
  same_image = np.repeat(random_images((1, 8, 8, 3), seed=10), 32, axis=0)
  keys = random_keys(32, seed=9)
  augment_fn = jitted_augment(ONES)  # Every op on: outputs differ only by their draws.
  out = np.asarray(augment_fn(same_image, keys))
  np.testing.assert_array_equal(out, augment_fn(same_image, keys))
  repeated = np.asarray(augment_fn(same_image, keys[np.zeros(32, np.int32)]))
  assert all(np.array_equal(repeated[i], out[0]) for i in range(32))
  assert all(not np.array_equal(out[i], out[j]) for i in range(32) for j in range(i))


def test_jit_equals_eager_on_the_paper_view2_preset():
  images = np.random.RandomState(11).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  keys = random_keys(4)
  view = config_lib.view_preset(2)
  eager = augment.augment_view(images, keys, view)
  jitted = jax.jit(lambda x, k: augment.augment_view(x, k, view))(images, keys)
  # Fusion reorders float sums (contrast means, blur taps): equal up to rounding, so the
  # jitted views are no less accurate than the eager ones against the float64 pipeline.
  draws = jitted_draws(augment.view_config(view))(keys)
  want = np.stack([reference_view(images[i] / 255.0, index_tree(draws, i), augment.view_config(view),
                                   float64=True) for i in range(len(images))])
  tolerances.assert_no_less_accurate(np.asarray(jitted), np.asarray(eager), want)


def test_paper_view_presets_read_from_the_config():
  c = config_lib.base_config()
  assert augment.view_config(c.augment.view1).blur_prob == 1.0
  assert augment.view_config(c.augment.view2).solarize_prob == 0.2


@pytest.mark.parametrize("images,keys,match", [
    (np.zeros((2, 8, 8)), random_keys(2), r"\[B, H, W, C\]"),
    (np.zeros((2, 8, 8, 4)), random_keys(2), "C in"),
    (np.zeros((2, 8, 8, 3), np.int32), random_keys(2), "uint8"),
    (np.zeros((2, 8, 8, 3)), random_keys(3), "one PRNG key per example"),
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
    view_config(**overrides)


def test_missing_view_field_is_named():
  fields = dict(OFF)
  del fields["solarize_threshold"]
  with pytest.raises(ValueError, match="solarize_threshold"):
    augment.view_config(fields)
