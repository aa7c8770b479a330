"""The sweep files in experiments/: every file expands over every recipe into valid configs
whose changes are only the intended fields, and the paper's ablations mean what the paper
means (tau schedules, batch-size lr scaling, augmentation runs keeping only their ops).
"""
import pathlib

import jax
import numpy as np
import pytest

import tolerances
from byol_jax.training import augment
from byol_jax import config as config_lib
from byol_jax.training import optim
from byol_jax.jobs import sweep_spec
from sweep_helpers import EXPERIMENTS, SMOKE, flat, runs_of


ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPES = [str(ROOT / "configs" / spec) for spec in (
    "byol_imagenet.py", "byol_imagenet.py:r200x2-1000", "byol_imagenette.py",
    "byol_cifar10.py:cpu", "byol_fashion_mnist.py")]

# The only fields each ablation may change (prefixes of dotted names).
INTENDED = {
    "target_tau": ("target.",),
    "predictor": ("model.use_predictor",),
    "predictor_lr": ("target.", "optim.predictor_lr_multiplier"),
    "normalisation": ("model.norm", "optim.predictor_lr_multiplier"),
    "small_stem": ("model.stem", "optim.predictor_lr_multiplier"),
    "recipe_28px": ("model.width", "batch_size", "optim.base_lr", "target.tau_base",
                    "augment.crop_area_min"),
    "batch_size": ("batch_size",),
    "augmentations": ("augment.view1.", "augment.view2."),
    "small_images": ("batch_size", "target.tau_base", "augment.view1.blur_prob",
                     "augment.view2.blur_prob", "augment.crop_area_min", "optim.base_lr",
                     "linear.standardize", "linear.learning_rates"),
}
DEVICE_OPS = ("flip", "color_jitter", "grayscale", "blur", "solarize")


def test_every_experiment_file_has_intended_fields():
  assert sorted(EXPERIMENTS) == sorted(INTENDED)


@pytest.mark.parametrize("base", RECIPES)
@pytest.mark.parametrize("experiment", sorted(INTENDED))
def test_expansion_validates_and_changes_only_intended_fields(experiment, base):
  base_config = sweep_spec.load_recipe(base)
  before = flat(base_config)
  runs = sweep_spec.expand(sweep_spec.load_sweep(EXPERIMENTS[experiment]), base_config)
  assert len({r.name for r in runs}) == len(runs) >= 2
  for run in runs:
    config_lib.validate(run.config)
    after = flat(run.config)
    assert after.keys() == before.keys()
    changed = {k for k in after if after[k] != before[k]}
    assert all(k.startswith(INTENDED[experiment]) for k in changed), (run.name, changed)
    for key, value in run.overrides.items():
      assert after[key] == value, (run.name, key)


def tau_at(c, steps):
  schedule = optim.tau_schedule(c.target.tau_base, config_lib.total_steps(c), c.target.schedule)
  return np.array([float(schedule(s)) for s in steps])


def test_tau_runs_follow_the_paper_definitions():
  runs = runs_of("target_tau", RECIPES[0])
  total = config_lib.total_steps(runs["tau_0"])
  steps = [0, total // 2, total]
  # tau_base 0: constant 0 (stop-gradient of online); 1: 1 - 0 x (...) = 1 (constant random
  # network). Both exact in float32.
  np.testing.assert_array_equal(tau_at(runs["tau_0"], steps), 0.0)
  np.testing.assert_array_equal(tau_at(runs["tau_1"], steps), 1.0)
  assert runs["tau_1_separate_init"].target.init == "separate"
  # Cosine from tau_base to 1: 1 - (1 - 0.9)(cos(pi k / K) + 1) / 2 at k = 0, K/2, K.
  # (K // 2 is not K / 2 for odd K: the formula at the steps themselves, in float64.) The
  # schedule's float32 ops: 8 ulps of 1, as in test_optim.
  want = [1 - (1 - 0.9) * (np.cos(np.pi * k / total) + 1) / 2 for k in steps]
  tolerances.assert_close(tau_at(runs["tau_0.9"], steps), want, tolerances.ulps(8, 1.0))
  tolerances.assert_close(want, [0.9, 0.95, 1.0], 0.1 * np.pi / 4 / total + 1e-12)  # |cos| <= pi / 2K.
  for name, c in runs_of("predictor_lr", RECIPES[0]).items():
    np.testing.assert_array_equal(tau_at(c, steps), 0.0, err_msg=name)  # No EMA target: exact.


def test_batch_size_runs_scale_the_peak_lr_linearly():
  for name, c in runs_of("batch_size", RECIPES[0]).items():
    b = int(name.split("_")[1])
    assert c.batch_size == b
    schedule = optim.learning_rate_schedule(c.optim.base_lr, c.batch_size,
                                            config_lib.total_steps(c), config_lib.warmup_steps(c))
    peak = float(schedule(config_lib.warmup_steps(c)))
    # The peak rounded to float32 and the schedule's ops at the end of the warm-up: 4 ulps.
    tolerances.assert_close(peak, 0.3 * b / 256, tolerances.ulps(4, 0.3 * b / 256), name)


# Device ops each augmentation run keeps (at the paper's probability); the rest are 0.
KEPT_OPS = {"baseline": DEVICE_OPS, "no_grayscale": ("flip", "color_jitter", "blur", "solarize"),
            "no_color": ("flip", "blur", "solarize"), "crop_blur_only": ("blur",),
            "crop_color_only": ("color_jitter", "grayscale"), "crop_only": ()}


def test_augmentation_runs_keep_only_their_ops():
  runs = runs_of("augmentations", RECIPES[0])  # ImageNet: the paper's augmentations.
  assert sorted(runs) == sorted(KEPT_OPS)
  for name, ops in KEPT_OPS.items():
    for view in (1, 2):
      paper = config_lib.view_preset(view)
      for op in DEVICE_OPS:
        prob = runs[name].augment[f"view{view}"][f"{op}_prob"]
        assert prob == (paper[f"{op}_prob"] if op in ops else 0.0), (name, view, op)


def test_augmentation_runs_keep_the_recipes_probabilities_of_kept_ops():
  recipe = sweep_spec.load_recipe(SMOKE)  # Fashion-MNIST: no blur in either view.
  baseline = runs_of("augmentations")["baseline"]
  assert baseline.augment.to_dict() == recipe.augment.to_dict()
  assert baseline.augment.view1.blur_prob == 0.0


def test_crop_only_views_are_the_identity_on_the_device():
  c = runs_of("augmentations")["crop_only"]
  image = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
  for view in ("view1", "view2"):
    v = augment.view_config(c.augment[view])
    for seed in range(3):
      draws = augment.sample_view_draws(jax.random.PRNGKey(seed), v)
      np.testing.assert_array_equal(augment.apply_view(image, draws, v), image)
