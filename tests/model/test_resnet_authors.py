"""byol_jax's encoder against the authors' (hk.nets.ResNet's) init and ResNetTorso layout.

model.zero_init_residual='authors' (the default) must zero the same norm scales as
hk.nets.ResNet's own init; model.first_group_projection=True must give ResNet-18/34 the
authors' ResNetTorso tree and function. And the config side: every option through the
command line, legacy config.json bools, validation, the recipes.

Haiku's side is traced only (jax.eval_shape) with a custom creator that runs each norm
scale's own initialiser; the function comparison runs in float64 in a subprocess, where
rounding is far below any architectural difference (bound derived at TOL_FLOAT64).
"""
import json
import os
import pathlib
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import fakes
from byol_jax import config as config_lib
from byol_jax.model import layers as layers_lib
from byol_jax.model import networks
from byol_jax.model import resnet
from byol_jax.store import run_config
from tiny_models import KEY, fake_init, images, init_encoder, model_cfg, named_shapes, shapes_of

ROOT = pathlib.Path(__file__).resolve().parents[2]
HK_NETS = {"resnet18": hk.nets.ResNet18, "resnet50": hk.nets.ResNet50,
           "resnet101": hk.nets.ResNet101, "resnet200": hk.nets.ResNet200}
BN = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


def below_top(module: str) -> str:
  """'res_net50/~/block_group_0/~/...' -> 'block_group_0/~/...' (the torso-relative path)."""
  return module.split("/~/", 1)[1]


def haiku_scales(make_net, size=32):
  """(all, zero-initialised) norm-scale modules of a Haiku network, torso-relative.

  init is only traced; each scale's value comes from running its own initialiser.
  """
  scales, zero = set(), set()

  def creator(next_creator, shape, dtype, init, context):
    if context.name == "scale":
      with jax.ensure_compile_time_eval():
        value = np.asarray(init(shape, dtype))
      scales.add(below_top(context.module_name))
      if not np.any(value):
        zero.add(below_top(context.module_name))
    return next_creator(shape, dtype, init)

  def forward(x):
    with hk.custom_creator(creator):
      return make_net()(x, True)

  jax.eval_shape(hk.transform_with_state(forward).init, KEY,
                 jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return scales, zero


def our_scales(params):
  """(all, zero-initialised) norm-scale modules of initialised byol_jax params."""
  scales = {below_top(m): v["scale"] for m, v in params.items() if "scale" in v}
  return set(scales), {m for m, s in scales.items() if not np.any(np.asarray(s))}


@pytest.mark.parametrize("encoder", list(HK_NETS))
@pytest.mark.parametrize("v2", [False, True])
def test_default_init_zeroes_the_scales_hk_nets_resnet_zeroes(encoder, v2):
  their_scales, their_zero = haiku_scales(lambda: HK_NETS[encoder](num_classes=2,
                                                                    resnet_v2=v2))
  # Ours at width 1/16 (real init); the module names do not depend on the width.
  _, params, _ = init_encoder(encoder=encoder, resnet_v2=v2)
  scales, zero = our_scales(params)
  assert scales == their_scales
  assert zero == their_zero
  # What Haiku does, by hand: batchnorm_2 of every bottleneck v1 block, nothing else.
  spec = resnet.ENCODERS[encoder]
  expected = sum(spec.blocks_per_group) if spec.bottleneck and not v2 else 0
  assert len(zero) == expected and all(m.endswith("/batchnorm_2") for m in zero)


def jaxprs(cfg, size=16):
  """The init and apply programs of an encoder config, as text (traced, not compiled)."""
  net = networks.make_encoder_network(cfg)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)
  return (str(jax.make_jaxpr(lambda v: net.init(KEY, v, True))(x)),
          str(jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(params, state, x)))


@pytest.mark.parametrize("legacy,option", [(False, "none"), (True, "all")])
def test_legacy_bool_builds_the_network_of_its_option(legacy, option):
  assert config_lib.resolve_zero_init(legacy) == option
  assert (jaxprs(model_cfg(encoder="resnet50", zero_init_residual=legacy)) ==
          jaxprs(model_cfg(encoder="resnet50", zero_init_residual=option)))


def test_legacy_config_json_loads_and_means_its_option(tmp_path):
  for legacy, option in config_lib.LEGACY_ZERO_INITS.items():
    saved = json.loads(config_lib.base_config().to_json_best_effort())
    saved["model"]["zero_init_residual"] = legacy
    del saved["model"]["first_group_projection"]  # Written before the field existed.
    workdir = tmp_path / option
    workdir.mkdir()
    (workdir / run_config.CONFIG_FILE).write_text(json.dumps(saved))
    c = run_config.read_config(str(workdir))  # How the encoder loader reads a workdir's.
    assert c.model.zero_init_residual is legacy
    assert c.model.first_group_projection is False
    assert config_lib.resolve_zero_init(config_lib.validate(c).model.zero_init_residual) == option
    c.model.zero_init_residual = "authors"  # A loaded config still takes today's names.


@pytest.mark.parametrize("value", ["zero", "None", None, 0, 1.0, ""])
def test_validation_rejects_unknown_zero_init_naming_field_value_and_choices(value):
  c = config_lib.base_config()
  c.model.zero_init_residual = value
  for check in (config_lib.validate, lambda c: networks.make_encoder_network(c.model)):
    with pytest.raises(ValueError) as err:
      check(c)
    assert "model.zero_init_residual" in str(err.value) and repr(value) in str(err.value)
    assert all(repr(name) in str(err.value) for name in config_lib.ZERO_INITS)


def parse_command_line(*overrides):
  """The config `byol-jax --config=configs/byol_imagenet.py:smoke <overrides>` gets."""
  argv = ["byol-jax", f"--config={ROOT / 'configs' / 'byol_imagenet.py'}:smoke", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "recipe", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


@pytest.mark.parametrize("text,value", [
    ("authors", "authors"), ("all", "all"), ("none", "none"),
    ("False", False), ("false", False), ("True", True)])  # The last three: legacy.
def test_every_zero_init_option_through_the_command_line(text, value):
  c = parse_command_line(f"--config.model.zero_init_residual={text}")
  assert c.model.zero_init_residual == value and type(c.model.zero_init_residual) is type(value)
  config_lib.validate(c)


def test_first_group_projection_through_the_command_line():
  assert parse_command_line().model.first_group_projection is False
  c = parse_command_line("--config.model.first_group_projection=true")
  assert c.model.first_group_projection is True


@pytest.mark.parametrize("name,arg", [("byol_fashion_mnist", None), ("byol_cifar10", None),
                                      ("byol_imagenette", None), ("byol_imagenet", None),
                                      ("byol_imagenet", "r200x2-1000")])
def test_recipes_take_the_authors_init_and_small_recipes_start_every_scale_at_one(name, arg):
  m = fakes.recipe(name, arg).model
  assert m.zero_init_residual == "authors" and m.first_group_projection is False
  spec = resnet.ENCODERS[m.encoder]
  zero = resnet.check_zero_init(m.zero_init_residual, spec.bottleneck, m.resnet_v2, m.norm)
  # ResNet-18 recipes start every scale at one, as under the former default (False).
  assert zero == spec.bottleneck and zero == (m.encoder != "resnet18")


# --- model.first_group_projection: the authors' ResNetTorso layout for ResNet-18/34 ---

def their_torso_net(encoder, v2):
  """hk.nets.ResNet as the authors' torso: a projection in every group's first block."""
  spec = resnet.ENCODERS[encoder]
  return lambda: hk.nets.ResNet(
      blocks_per_group=spec.blocks_per_group, bottleneck=spec.bottleneck,
      channels_per_group=spec.channels_per_group, use_projection=(True,) * 4,
      num_classes=2, resnet_v2=v2)


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34"])
@pytest.mark.parametrize("v2", [False, True])
def test_first_group_projection_gives_the_authors_tree(encoder, v2):
  ours = networks.make_encoder_network(model_cfg(
      encoder=encoder, width=1, stem="imagenet", resnet_v2=v2, first_group_projection=True))
  make = their_torso_net(encoder, v2)
  theirs = hk.transform_with_state(lambda x, t: make()(x, t))
  our_params, our_state = shapes_of(ours)
  their_params, their_state = shapes_of(theirs)
  their_params = {k: v for k, v in their_params.items() if not k.endswith("/~/logits")}
  assert named_shapes(our_params) == named_shapes(their_params)
  assert named_shapes(our_state) == named_shapes(their_state)
  shortcut = {k for k in named_shapes(our_params) if "block_group_0/~/block_0/~/shortcut" in k}
  expected = {"block_group_0/~/block_0/~/shortcut_conv/w"}
  if not v2:  # v2 blocks project the pre-activated input, with no norm of their own.
    expected |= {f"block_group_0/~/block_0/~/shortcut_batchnorm/{p}" for p in
                 ("scale", "offset")}
  assert shortcut == expected
  # Without the option: today's layout, no shortcut there.
  default, _ = shapes_of(networks.make_encoder_network(model_cfg(
      encoder=encoder, width=1, stem="imagenet", resnet_v2=v2)))
  assert not any("block_group_0/~/block_0/~/shortcut" in k for k in named_shapes(default))


@pytest.mark.parametrize("v2", [False, True])
def test_first_group_projection_changes_nothing_for_bottleneck_encoders(v2):
  with_option = jaxprs(model_cfg(encoder="resnet50", resnet_v2=v2, first_group_projection=True))
  assert with_option == jaxprs(model_cfg(encoder="resnet50", resnet_v2=v2))
  assert "shortcut_conv" in str(shapes_of(networks.make_encoder_network(
      model_cfg(encoder="resnet50", resnet_v2=v2)), 16)[0].keys())


class AuthorsTorso(hk.Module):
  """The authors' ResNetTorso (byol/utils/networks.py) of basic blocks, from Haiku's parts.

  initial_conv 7x7/2 (SAME, no bias) -> initial_batchnorm -> relu (v1) -> hk.max_pool
  3x3/2 SAME -> four hk.nets.ResNet.BlockGroups with use_projection=True ->
  final_batchnorm -> relu (v2) -> mean over H, W. `channels`: the first conv's and each
  group's, so that it can be as narrow as byol_jax's width 1/16.
  """

  def __init__(self, blocks_per_group, channels, v2, name="encoder"):
    super().__init__(name=name)
    self._v2 = v2
    self._initial_conv = hk.Conv2D(channels[0], 7, stride=2, with_bias=False,
                                   padding="SAME", name="initial_conv")
    if not v2:
      self._initial_norm = hk.BatchNorm(name="initial_batchnorm", **BN)
    self._groups = [hk.nets.ResNet.BlockGroup(
        channels=channels[i + 1], num_blocks=blocks_per_group[i], stride=stride,
        bn_config=BN, resnet_v2=v2, bottleneck=False, use_projection=True,
        name=f"block_group_{i}") for i, stride in enumerate((1, 2, 2, 2))]
    if v2:
      self._final_norm = hk.BatchNorm(name="final_batchnorm", **BN)

  def __call__(self, x, is_training):
    x = self._initial_conv(x)
    if not self._v2:
      x = jax.nn.relu(self._initial_norm(x, is_training))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    for group in self._groups:
      x = group(x, is_training, False)
    if self._v2:
      x = jax.nn.relu(self._final_norm(x, is_training))
    return jnp.mean(x, axis=(1, 2))


def max_relative_difference(a, b) -> float:
  """max |a - b| over all leaves, relative to max |b|."""
  diffs = [np.max(np.abs(np.asarray(x) - np.asarray(y))) / max(np.max(np.abs(y)), 1e-300)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  return float(max(diffs))


def torso_differences(v2: bool) -> dict:
  """Our ResNet-18 (width 1/16, first_group_projection) vs AuthorsTorso, same weights.

  Runs in whatever precision JAX is in (float64 under JAX_ENABLE_X64=1). Both networks get
  the same parameters and batch-norm state, copied by name; the state is the authors' after
  one training-mode step, so evaluation mode divides by real variances.

  Returns:
    {'train' / 'eval': max relative difference of the representations, 'train_state': of
    the updated batch-norm statistics, 'scale': max |representation|}.
  """
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  spec = resnet.ENCODERS["resnet18"]
  ours = hk.transform_with_state(lambda x, t: resnet.ResNet(
      spec, resnet.STEMS["imagenet"], layers_lib.Layers(), width=1 / 16, resnet_v2=v2,
      first_group_projection=True)(x, t))
  channels = (4,) + tuple(c // 16 for c in spec.channels_per_group)
  theirs = hk.transform_with_state(
      lambda x, t: AuthorsTorso(spec.blocks_per_group, channels, v2)(x, t))
  x = images(n=4, size=32).astype(dtype)
  params, state = fake_init(theirs, x)
  assert named_shapes(params) == named_shapes(shapes_of(ours)[0])
  _, state = theirs.apply(params, state, None, x, True)
  out = {}
  for mode, is_training in (("train", True), ("eval", False)):
    their_y, their_state = theirs.apply(params, state, None, x, is_training)
    our_y, our_state = ours.apply(params, state, None, x, is_training)
    assert our_y.dtype == dtype
    out[mode] = max_relative_difference(our_y, their_y)
    if is_training:
      out["train_state"] = max_relative_difference(our_state, their_state)
    out["scale"] = float(np.max(np.abs(their_y)))
  return out


# Two float64 evaluations of the same function differ by rounding only. A dot product of
# n terms rounds by about eps * sqrt(n) relative (n <= 3*3*32 = 288 here, so 2.2e-16 * 17),
# and the errors of the 18 layers add: 6.7e-14. Batch norm can amplify a relative error by
# |mean| / std of its input, not known in advance; allow 1000x for it: 6.7e-11, rounded up.
# A different architecture (a missing shortcut, other padding) changes the output by O(1).
TOL_FLOAT64 = 1e-10


def test_first_group_projection_computes_the_authors_torso_in_float64():
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         str(ROOT / "tests" / "model")]))
  code = ("import json, jax, test_resnet_authors as t; "
          "assert jax.config.jax_enable_x64; "
          "print(json.dumps({v2: t.torso_differences(v2) for v2 in (False, True)}))")
  run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT / "tests",
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(run.stdout.strip().splitlines()[-1])
  for v2, diffs in results.items():
    assert diffs["scale"] > 0.1, (v2, diffs)  # Not a vacuous comparison of zeros.
    for key in ("train", "eval", "train_state"):
      assert diffs[key] <= TOL_FLOAT64, (v2, key, diffs)
