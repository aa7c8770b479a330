"""byol_jax.model.resnet: the ResNet family against `hk.nets.ResNet` (names, shapes, forward
with the same weights), literature parameter counts, variants, stems, zero-init residuals
and the representation size.

Compile time dominates on CPU: tiny networks (tests/tiny_models.py) run un-jitted;
parameter counts and names come from jax.eval_shape.
"""
import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import config as config_lib
from byol_jax.model import layers as layers_lib
from byol_jax.model import networks
from byol_jax.model import resnet
from tiny_models import (abstract_forward, count, fake_init, images, init_encoder, model_cfg,
                         named_shapes, shapes_of)


def test_registries_hold_exactly_the_config_names():
  assert tuple(resnet.ENCODERS) == config_lib.ENCODERS
  assert set(resnet.STEMS) == set(config_lib.STEMS)
  assert set(layers_lib.NORMS) == set(config_lib.NORMS)
  assert set(layers_lib.PADDINGS) == set(config_lib.PADDINGS)
  assert set(layers_lib.CONV_IMPLS) == set(config_lib.CONV_IMPLS)
  assert set(networks.PRECISIONS) == set(config_lib.PRECISIONS)
  assert tuple(resnet.ZERO_INITS) == config_lib.ZERO_INITS


# torchvision's totals minus its 1000-way fc layer; the widened ResNets from the BYOL
# paper (Table 1 / appendix), quoted there to 3 significant figures.
@pytest.mark.parametrize("encoder,width,expected,rtol", [
    ("resnet18", 1, 11_689_512 - 513_000, 0),
    ("resnet34", 1, 21_797_672 - 513_000, 0),
    ("resnet50", 1, 25_557_032 - 2_049_000, 0),
    ("resnet101", 1, 44_549_160 - 2_049_000, 0),
    ("resnet152", 1, 60_192_808 - 2_049_000, 0),
    ("resnet50", 2, 94e6, 0.01),
    ("resnet200", 2, 250e6, 0.01),
])
def test_parameter_count_matches_literature(encoder, width, expected, rtol):
  net = networks.make_encoder_network(
      model_cfg(encoder=encoder, width=width, stem="imagenet"))
  params, _ = shapes_of(net)
  n = count(params)
  print(f"{encoder} x{width}: {n:,} parameters")
  assert n == pytest.approx(expected, rel=rtol, abs=0)


HK_NETS = {"resnet18": hk.nets.ResNet18, "resnet50": hk.nets.ResNet50}


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
@pytest.mark.parametrize("v2", [False, True])
def test_names_and_shapes_match_haiku_resnet(encoder, v2):
  ours = networks.make_encoder_network(
      model_cfg(encoder=encoder, width=1, resnet_v2=v2, stem="imagenet"))
  theirs = hk.transform_with_state(
      lambda x, t: HK_NETS[encoder](num_classes=10, resnet_v2=v2)(x, t))
  our_params, our_state = shapes_of(ours)
  their_params, their_state = shapes_of(theirs)
  their_params = {k: v for k, v in their_params.items() if not k.endswith("/~/logits")}
  assert named_shapes(our_params) == named_shapes(their_params)
  assert named_shapes(our_state) == named_shapes(their_state)


def _hk_narrow_resnet(bottleneck, v2, channels):
  """hk.nets.ResNet with one block per group and our channel counts at width 1/16."""
  def forward(x, is_training):
    net = hk.nets.ResNet(
        blocks_per_group=(1, 1, 1, 1), num_classes=channels[-1], resnet_v2=v2,
        bottleneck=bottleneck, channels_per_group=channels,
        use_projection=(bottleneck, True, True, True),
        initial_conv_config=dict(output_channels=4), name="encoder")
    return net(x, is_training)
  return hk.transform_with_state(forward)


@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_forward_matches_haiku_resnet_with_same_weights(bottleneck, v2):
  full = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
  channels = tuple(c // 16 for c in full)
  spec = resnet.ResNetSpec((1, 1, 1, 1), bottleneck, full, (bottleneck, True, True, True))

  def ours_fn(x, is_training):
    return resnet.ResNet(spec, resnet.STEMS["imagenet"], layers_lib.Layers(),
                         width=1 / 16, resnet_v2=v2)(x, is_training)

  ours = hk.transform_with_state(ours_fn)
  theirs = _hk_narrow_resnet(bottleneck, v2, channels)
  # 64 px through the stride-4 stem gives the 16 px block shapes the other tests compile.
  x = images(size=64)
  params, state = fake_init(ours, x)
  d = channels[-1]
  # An identity logits layer turns hk's classifier output into the pooled features.
  their_params = dict(params, **{"encoder/~/logits": dict(w=jnp.eye(d), b=jnp.zeros(d))})
  their_out, their_state = theirs.apply(their_params, state, None, x, True)
  our_out, our_state = ours.apply(params, state, None, x, True)
  # The same operations in the same order (hk.BatchNorm, the same convolutions), run
  # eagerly op by op: bitwise equal on any machine, no tolerance needed.
  chex.assert_trees_all_equal(our_out, their_out)
  chex.assert_trees_all_equal(our_state, their_state)


# Every block type (basic: ResNet-18, bottleneck: ResNet-50) x version x norm, and every
# depth x version with batch norm. Depth changes only the block counts, which the
# parameter-count tests pin to the literature; this keeps the sweep's tracing affordable.
VARIANTS = ([(e, v2, n) for e in ("resnet18", "resnet50") for v2 in (False, True)
             for n in config_lib.NORMS] +
            [(e, v2, "batch") for e in ("resnet34", "resnet101", "resnet152", "resnet200")
             for v2 in (False, True)])


@pytest.mark.parametrize("encoder,v2,norm", VARIANTS)
def test_variant_builds_and_runs_forward(encoder, v2, norm):
  net = networks.make_encoder_network(model_cfg(encoder=encoder, resnet_v2=v2, norm=norm))
  params, state = fake_init(net, images())
  rep, new_state = net.apply(params, state, None, images(), True)
  expected_dim = {"resnet18": 32, "resnet34": 32}.get(encoder, 128)  # 512/16, 2048/16.
  assert rep.shape == (2, expected_dim) and rep.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(rep)))
  assert networks.representation_dim(model_cfg(encoder=encoder)) == expected_dim
  if norm == "batch":  # Only batch norm keeps statistics, and training moves them.
    assert state and all("batchnorm" in m for m in state)
    assert not all(jnp.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(state), jax.tree.leaves(new_state)))
  else:
    assert not state and not new_state
  has_bias = any(name == "b" for _, name, _ in hk.data_structures.traverse(params))
  assert has_bias == (norm == "none")  # Convs carry a bias only without a norm offset.


@pytest.mark.parametrize("stem,stride,pools",
                         [("imagenet", 2, 1), ("small", 1, 0), ("small_s2", 2, 0)])
def test_stem_first_conv_and_max_pool(stem, stride, pools):
  net = networks.make_encoder_network(model_cfg(stem=stem))
  params, state = shapes_of(net, size=16)
  kernel = 7 if stem == "imagenet" else 3
  assert params["encoder/~/initial_conv"]["w"].shape == (kernel, kernel, 3, 4)
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(
      params, state, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)).jaxpr
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs[0].params["window_strides"] == (stride, stride)
  assert sum(e.primitive.name == "reduce_window_max" for e in jaxpr.eqns) == pools


def _last_in_block(params, module_suffix, param):
  return {m: v[param] for m, v in params.items()
          if "/block_" in m and m.endswith(module_suffix)}


# The block's closing norm per (encoder, norm): basic blocks have two, bottlenecks three.
@pytest.mark.parametrize("encoder,norm,last", [("resnet18", "batch", "batchnorm_1"),
                                               ("resnet50", "batch", "batchnorm_2"),
                                               ("resnet18", "group_ws", "groupnorm_1"),
                                               ("resnet50", "group_ws", "groupnorm_2")])
@pytest.mark.parametrize("option", ["all", "none", None])  # None: the default.
def test_zero_init_residual_sets_last_norm_scale_in_v1(encoder, norm, last, option):
  overrides = {} if option is None else dict(zero_init_residual=option)
  _, params, _ = init_encoder(encoder=encoder, norm=norm, **overrides)
  # The default ('authors') zeroes bottleneck blocks only, as hk.nets.ResNet's BlockV1.
  zero = option == "all" or (option is None and resnet.ENCODERS[encoder].bottleneck)
  last_scales = _last_in_block(params, last, "scale")
  assert len(last_scales) == sum(resnet.ENCODERS[encoder].blocks_per_group)
  for scale in last_scales.values():
    np.testing.assert_array_equal(scale, 0.0 if zero else 1.0)
  others = [v["scale"] for m, v in params.items() if "scale" in v and not m.endswith(last)]
  assert others and all(np.all(np.asarray(s) == 1.0) for s in others)


@pytest.mark.parametrize("encoder,v2,norm,option", [("resnet18", True, "batch", "all"),
                                                    ("resnet18", False, "none", "all"),
                                                    ("resnet50", False, "none", "authors")])
def test_zero_init_residual_zeroes_last_conv_without_a_closing_norm(encoder, v2, norm, option):
  _, params, _ = init_encoder(encoder=encoder, resnet_v2=v2, norm=norm,
                              zero_init_residual=option)
  last = "conv_2" if resnet.ENCODERS[encoder].bottleneck else "conv_1"
  kernels = _last_in_block(params, last, "w")
  assert len(kernels) == sum(resnet.ENCODERS[encoder].blocks_per_group)
  assert all(not np.any(np.asarray(w)) for w in kernels.values())
  assert np.any(np.asarray(params["encoder/~/block_group_0/~/block_0/~/conv_0"]["w"]))


@pytest.mark.parametrize("option", ["all", True])  # True: a legacy config.json's 'all'.
def test_zero_init_residual_rejects_v2_with_weight_standardisation(option):
  with pytest.raises(ValueError, match="zero_init_residual"):
    networks.make_encoder_network(
        model_cfg(resnet_v2=True, norm="group_ws", zero_init_residual=option))
  # 'authors' and 'none' zero nothing in v2 blocks, so every encoder takes them.
  for encoder in ("resnet18", "resnet50"):
    for fine in ("authors", "none", False):
      shapes_of(networks.make_encoder_network(model_cfg(
          encoder=encoder, resnet_v2=True, norm="group_ws", zero_init_residual=fine)), 16)


@pytest.mark.parametrize("encoder,width,expected", [
    ("resnet18", 1, 512), ("resnet34", 2, 1024), ("resnet18", 0.125, 64),
    ("resnet50", 1, 2048), ("resnet200", 2, 4096), ("resnet50", 0.3, 614),
])
def test_representation_dim(encoder, width, expected):
  cfg = model_cfg(encoder=encoder, width=width)
  assert networks.representation_dim(cfg) == expected
  if width < 1:  # The network itself agrees on the rounding (traced only).
    net = networks.make_encoder_network(cfg)
    out, _ = abstract_forward(net, size=32)
    assert out.shape == (2, expected)
