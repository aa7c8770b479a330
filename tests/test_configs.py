"""Recipes in configs/: every recipe and preset loads locked and validates, and carries the
numbers of BYOL_REFERENCE.md (tables below, written from it); encoder parameter counts
from jax.eval_shape match the published sizes."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from byol_jax import config as config_lib
from byol_jax.model import networks

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("byol_*.py"))


# BYOL_REFERENCE.md, "Presets by pretraining length": epochs -> base_lr, wd, tau_base.
PAPER_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99),
                 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}
# The encoders the paper reports, as (config encoder, width).
PAPER_ENCODERS = {"r50": ("resnet50", 1.0), "r50x2": ("resnet50", 2.0),
                  "r50x4": ("resnet50", 4.0), "r200x2": ("resnet200", 2.0)}
# Train split sizes of each recipe's data set (tfds catalogue); the recipes take them from
# the data (dataset.num_train_examples=0), so tests of epoch-based lengths set them.
TRAIN_EXAMPLES = {"byol_imagenet": 1_281_167, "byol_imagenette": 9_469,
                  "byol_cifar10": 50_000, "byol_fashion_mnist": 60_000}
# Every (recipe, arg) that must load; the ImageNet presets are crossed below.
ARGS = {"byol_imagenet": ["", "smoke", "1000", "r50x2", "r200x2-1000", "40-r50x4"],
        "byol_imagenette": ["", "smoke"], "byol_cifar10": ["", "cpu", "smoke"],
        "byol_fashion_mnist": ["", "smoke", "ablation"]}


def test_every_recipe_file_is_covered():
  assert sorted(ARGS) == RECIPES


@pytest.mark.parametrize("name,arg", [(n, a) for n in ARGS for a in ARGS[n]])
def test_recipe_loads_locked_and_valid(name, arg):
  c = fakes.recipe(name, arg or None)
  config_lib.validate(c)
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.optim.base_lrr = 1.0  # A misspelt field fails instead of being added.
  assert (c.dataset.num_train_examples, c.dataset.num_classes) == (
      0, 1000 if name == "byol_imagenet" else 10)  # Train size from the data; classes stated.
  c.dataset.num_train_examples = TRAIN_EXAMPLES[name]
  assert config_lib.total_steps(c) >= 1
  if arg == "smoke":
    assert c.batch_size <= 8 and config_lib.total_steps(c) <= 4 and c.model.width <= 0.125


@pytest.mark.parametrize("name", list(ARGS))
def test_unknown_arg_is_rejected_with_the_valid_ones(name):
  with pytest.raises(ValueError, match="smoke"):
    fakes.recipe(name, "no-such-preset")


@pytest.mark.parametrize("epochs", list(PAPER_PRESETS))
@pytest.mark.parametrize("encoder", list(PAPER_ENCODERS))
def test_imagenet_presets_match_the_paper(encoder, epochs):
  c = fakes.recipe("byol_imagenet", f"{encoder}-{epochs}")
  base_lr, weight_decay, tau_base = PAPER_PRESETS[epochs]
  assert (c.optim.base_lr, c.optim.weight_decay, c.target.tau_base) == (
      base_lr, weight_decay, tau_base)
  assert (c.model.encoder, c.model.width) == PAPER_ENCODERS[encoder]
  assert c.num_epochs == epochs and c.batch_size == 4096 and c.optim.warmup_epochs == 10
  assert (c.optim.momentum, c.optim.trust_coefficient) == (0.9, 1e-3)
  assert (c.target.schedule, c.model.stem, c.image_size) == ("cosine", "imagenet", 224)
  assert (c.model.projector_hidden, c.model.projector_out, c.model.predictor_hidden) == (
      4096, 256, 4096)
  # Warm-up in steps, once the data gives the train size: 10 epochs of 1,281,167 // 4096.
  c.dataset.num_train_examples = TRAIN_EXAMPLES["byol_imagenet"]
  assert config_lib.warmup_steps(c) == 10 * (1_281_167 // 4096) == 3120
  # The paper's linear protocol: 80 epochs, batch 1024, SGD + Nesterov, no weight decay.
  assert (c.linear.mode, c.linear.num_epochs, c.linear.batch_size) == ("augmented", 80, 1024)
  assert (c.linear.momentum, c.linear.nesterov, c.linear.weight_decay) == (0.9, True, 0.0)


def test_imagenet_default_is_the_300_epoch_resnet50():
  default = fakes.recipe("byol_imagenet")
  explicit = fakes.recipe("byol_imagenet", "r50-300")
  assert config_lib.config_hash(default) == config_lib.config_hash(explicit)


def test_imagenette_is_the_authors_small_setting():
  c = fakes.recipe("byol_imagenette")
  assert (c.model.encoder, c.model.width, c.image_size, c.batch_size) == (
      "resnet18", 1.0, 128, 256)
  assert (c.optim.base_lr, c.optim.weight_decay, c.num_epochs) == (2.0, 1e-6, 1000)
  assert (c.dataset.name, c.dataset.eval_split, c.dataset.num_classes) == (
      "imagenette/160px-v2", "validation", 10)
  assert c.dataset.num_train_examples == 0  # From the data (9,469 in 160px-v2 'train').
  assert c.linear.mode == "features"


def test_cifar10_recipe_uses_the_small_stem_at_32px():
  for arg in ("", "cpu"):
    c = fakes.recipe("byol_cifar10", arg)
    assert (c.model.encoder, c.model.stem, c.image_size) == ("resnet18", "small", 32)
    assert (c.dataset.name, c.dataset.eval_split, c.dataset.num_train_examples) == (
        "cifar10", "test", 0)
    assert c.linear.mode == "features"
    assert c.augment.view1.blur_prob == c.augment.view2.blur_prob == 0.0
  # Solarize stays as the paper's (view 2 only): only blur is changed for 32 px.
  assert (c.augment.view1.solarize_prob, c.augment.view2.solarize_prob) == (0.0, 0.2)


def encoder_parameters(c) -> int:
  net = networks.make_encoder_network(c.model)
  params, _ = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x, True),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# Encoder parameters without the classifier: torchvision's ResNet-50 (25,557,032) minus
# its 2048x1000 fc; the BYOL paper's widened networks (3 significant figures); ResNet-18
# with a 3x3 stem: torchvision's ResNet-18 (11,689,512) minus its fc (513,000) minus the
# 7x7x3x64 stem plus a 3x3x3x64 one.
@pytest.mark.parametrize("name,arg,expected,rtol", [
    ("byol_imagenet", "r50", 25_557_032 - 2_049_000, 0),
    ("byol_imagenet", "r50x4", 375e6, 0.01),
    ("byol_cifar10", "", 11_689_512 - 513_000 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64, 0),
    ("byol_imagenette", "", 11_689_512 - 513_000, 0),
])
def test_recipe_encoder_parameter_count(name, arg, expected, rtol):
  n = encoder_parameters(fakes.recipe(name, arg))
  assert n == pytest.approx(expected, rel=rtol, abs=0)
