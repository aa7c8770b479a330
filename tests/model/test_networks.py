"""byol_jax.model.networks: the BYOL network's outputs and modules, heads, the online
classifier's stop-gradient, encoder parameters cut from the BYOL tree, precision policies
and the errors for unknown names.

Compile time dominates on CPU: tiny networks (tests/tiny_models.py) run un-jitted.
"""
import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import config as config_lib
from byol_jax.model import networks
from tiny_models import KEY, images, init_byol, model_cfg, named_shapes, shapes_of


def test_byol_outputs_and_top_level_modules():
  net, params, state = init_byol()
  out, _ = net.apply(params, state, None, images(), True)
  assert {k.split("/")[0] for k in params} == {"encoder", "projector", "predictor",
                                              "classifier"}
  assert {k: v.shape for k, v in out.items()} == dict(
      representation=(2, 32), projection=(2, 8), prediction=(2, 8), logits=(2, 5))
  assert networks.representation_dim(model_cfg()) == 32
  assert all(v.dtype == jnp.float32 for v in out.values())
  # Heads as in the authors' release: biased hidden layer, bias-free output layer.
  assert named_shapes(params, strip_top=False).items() >= {
      "projector/linear/w": (32, 16), "projector/linear/b": (16,),
      "projector/batch_norm/scale": (1, 16), "projector/linear_1/w": (16, 8),
      "predictor/linear/w": (8, 16), "predictor/linear_1/w": (16, 8)}.items()
  assert "projector/linear_1/b" not in named_shapes(params, strip_top=False)


@pytest.mark.parametrize("norm,module", [("group_ws", "group_norm"), ("none", None)])
def test_head_norm_follows_model_norm(norm, module):
  net = networks.make_byol_network(model_cfg(norm=norm), num_classes=5)
  params, _ = shapes_of(net, size=16)
  head_modules = {m for m in params if m.startswith("projector")}
  expected = {"projector/linear", "projector/linear_1"}
  assert head_modules == expected | ({f"projector/{module}"} if module else set())


def test_without_predictor_prediction_is_the_projection():
  net, params, state = init_byol(use_predictor=False)
  assert not any(k.startswith("predictor") for k in params)
  out, _ = net.apply(params, state, None, images(), True)
  np.testing.assert_array_equal(out["prediction"], out["projection"])


def test_online_classifier_sends_no_gradient_into_the_encoder():
  net, params, state = init_byol()

  def loss(p, output):
    return jnp.sum(net.apply(p, state, None, images(), True)[0][output] ** 2)

  @jax.jit  # One compile beats eager backward ops.
  def grads(p):
    return jax.grad(loss)(p, "logits"), jax.grad(loss)(p, "representation")

  probe_grads, rep_grads = grads(params)
  encoder_modules = [m for m in params if m.startswith("encoder")]
  for module in encoder_modules:
    for g in probe_grads[module].values():
      np.testing.assert_array_equal(g, 0.0)
  assert any(np.any(np.asarray(g)) for g in probe_grads["classifier"].values())
  # The same encoder parameters do get gradient from a loss on the representation.
  assert all(np.any(np.asarray(rep_grads[m]["w"])) for m in encoder_modules if "conv" in m)


def test_init_in_evaluation_mode_gives_the_training_mode_trees():
  net = networks.make_byol_network(model_cfg(), num_classes=5)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  train = jax.eval_shape(lambda v: net.init(KEY, v, is_training=True), x)
  evaluation = jax.eval_shape(lambda v: net.init(KEY, v, is_training=False), x)
  for a, b in zip(train, evaluation):  # params, then state
    assert named_shapes(a, False) == named_shapes(b, False)


def test_encoder_params_cut_from_byol_tree_run_the_encoder_network():
  byol, params, state = init_byol()
  encoder = networks.make_encoder_network(model_cfg())
  enc_params = {k: v for k, v in params.items() if k.startswith("encoder")}
  enc_state = {k: v for k, v in state.items() if k.startswith("encoder")}
  enc_shapes, _ = shapes_of(encoder, size=16)
  assert named_shapes(enc_shapes, False) == named_shapes(enc_params, False)
  for is_training in (True, False):
    rep, new_state = encoder.apply(enc_params, enc_state, None, images(), is_training)
    out, byol_state = byol.apply(params, state, None, images(), is_training)
    np.testing.assert_array_equal(rep, out["representation"])
    chex.assert_trees_all_equal(
        new_state, {k: v for k, v in byol_state.items() if k.startswith("encoder")})



def test_bfloat16_computes_in_bf16_keeps_float32_params_norms_and_outputs():
  net = networks.make_byol_network(model_cfg(), num_classes=5, precision="bfloat16")
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out, new_state = jax.eval_shape(lambda p, s, v: net.apply(p, s, None, v, True),
                                  params, state, x)
  assert {o.dtype for o in out.values()} == {jnp.dtype(jnp.float32)}
  float_state = [s.dtype for s in jax.tree.leaves(new_state) if s.dtype != jnp.int32]
  assert float_state and set(float_state) == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(params, state, x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  for cls, _ in networks.PRECISIONS["bfloat16"]:  # No policy outlives the call.
    assert hk.mixed_precision.get_policy(cls) is None


def test_float32_default_has_no_bf16():
  net = networks.make_byol_network(model_cfg(), num_classes=5)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(params, state, x)
  assert all(v.aval.dtype != jnp.bfloat16 for e in jaxpr.jaxpr.eqns for v in e.outvars)


@pytest.mark.parametrize("field,value", [
    ("encoder", "resnet9"), ("stem", "cifar"), ("norm", "layer"), ("padding", "valid")])
def test_unknown_model_names_raise_listing_valid_ones(field, value):
  valid = getattr(config_lib, {"encoder": "ENCODERS", "stem": "STEMS", "norm": "NORMS",
                               "padding": "PADDINGS"}[field])
  for make in (networks.make_encoder_network,
               lambda c: networks.make_byol_network(c, num_classes=5)):
    with pytest.raises(ValueError) as err:
      make(model_cfg(**{field: value}))
    assert value in str(err.value) and all(v in str(err.value) for v in valid)


def test_unknown_precision_and_bad_numbers_raise():
  with pytest.raises(ValueError, match="float32.*bfloat16|bfloat16.*float32"):
    networks.make_byol_network(model_cfg(), 5, precision="float16")
  for make in (networks.make_encoder_network, networks.representation_dim):
    with pytest.raises(ValueError, match="width"):
      make(model_cfg(width=0.0))
  with pytest.raises(ValueError, match="gn_groups"):
    networks.make_encoder_network(model_cfg(norm="group_ws", gn_groups=0))
  with pytest.raises(ValueError, match="num_classes"):
    networks.make_byol_network(model_cfg(), num_classes=0)
