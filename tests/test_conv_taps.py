"""model.conv_impl='taps' computes what XLA's convolution and max-pool compute.

References: jax.lax.conv_general_dilated and reduce_window (conv_impl='lax'), on the same
inputs and parameters, values and gradients; ties in the max-pool included.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import config as config_lib
from byol_jax import layers as layers_lib
from byol_jax import networks
from byol_jax import run_config

KEY = jax.random.PRNGKey(0)
SYMMETRIC = "symmetric"


def _padding(name, kernel):
  return layers_lib.PADDINGS["symmetric" if name == SYMMETRIC else "same"](kernel)


def _value_and_grads(conv_fn, x, w, stride, padding):
  # A fixed random cotangent, so every output element's gradient path is checked.
  def loss(x, w):
    out = conv_fn(x, w, stride, padding)
    probe = jax.random.normal(jax.random.PRNGKey(7), out.shape)
    return jnp.sum(out * probe), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
  return out, grads


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (1, 3, 1, "same"), (2, 3, 1, "same"), (2, 3, 2, "same"), (4, 3, 2, "same"),
    (7, 3, 2, "same"), (8, 7, 2, "same"), (9, 7, 2, SYMMETRIC), (8, 3, 2, SYMMETRIC),
    (5, 3, 1, SYMMETRIC), (4, 1, 2, "same"), (7, 1, 1, "same"), (3, 3, 1, "same"),
])
def test_conv_taps_matches_xla_conv_values_and_gradients(size, kernel, stride, padding):
  x = jax.random.normal(KEY, (3, size, size, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 4))
  pad = _padding(padding, kernel)
  want, want_grads = _value_and_grads(layers_lib.conv_lax, x, w, stride, pad)
  got, got_grads = _value_and_grads(layers_lib.conv_taps, x, w, stride, pad)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, e in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size,padding", [(7, "same"), (8, "same"), (8, SYMMETRIC),
                                          (9, SYMMETRIC)])
def test_max_pool_taps_matches_reduce_window_including_ties(size, padding):
  # Values from {0, 1, 2}: most windows hold several equal maxima.
  x = jax.random.randint(KEY, (2, size, size, 3), 0, 3).astype(jnp.float32)
  probe = jax.random.normal(jax.random.PRNGKey(3), layers_lib.max_pool(x, padding).shape)

  def value_and_grad(impl):
    f = lambda v: jnp.sum(layers_lib.max_pool(v, padding, impl) * probe)  # noqa: E731
    return layers_lib.max_pool(x, padding, impl), jax.grad(f)(x)

  want, want_grad = value_and_grad("lax")
  got, got_grad = value_and_grad("taps")
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_grad, want_grad)  # The same maximum gets each window's.


def test_max_pool_taps_propagates_nan():
  x = jnp.zeros((1, 6, 6, 1)).at[0, 2, 3, 0].set(jnp.nan)
  got = layers_lib.max_pool(x, "same", "taps")
  want = layers_lib.max_pool(x, "same", "lax")
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  assert bool(jnp.any(jnp.isnan(got)))


@pytest.mark.parametrize("norm,padding", [("batch", "same"), ("group_ws", SYMMETRIC)])
def test_encoder_with_taps_matches_lax_encoder(norm, padding):
  """Same params, same batch: the ResNet-18 representation, BN state and gradients agree."""
  def model(impl):
    c = config_lib.base_config().model
    c.update(dict(encoder="resnet18", width=0.0625, stem="imagenet", norm=norm,
                  padding=padding, conv_impl=impl))
    return networks.make_encoder_network(c)

  images = jax.random.uniform(KEY, (4, 20, 20, 1))
  params, state = model("lax").init(KEY, images, is_training=True)

  def run(impl):
    net = model(impl)

    def loss(p):
      rep, new_state = net.apply(p, state, None, images, is_training=True)
      return jnp.sum(jnp.square(rep)), (rep, new_state)
    (_, (rep, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return rep, new_state, grads

  want, got = run("lax"), run("taps")
  assert jax.tree.structure(got) == jax.tree.structure(want)
  # Rounding differences grow through 8 batch-normed layers; measured against each array's
  # own scale (a wrong tap or kernel layout gives errors of order 1 on that scale).
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(e))) + 1e-12
    assert float(np.max(np.abs(g - e))) <= 1e-4 * scale


def test_unknown_conv_impl_is_rejected_naming_the_field():
  c = config_lib.base_config()
  c.model.conv_impl = "winograd"
  with pytest.raises(ValueError, match=r"model\.conv_impl.*'lax'"):
    config_lib.validate(c)
  with pytest.raises(ValueError, match=r"model\.conv_impl"):
    networks.make_encoder_network(c.model)  # Networks built without validate() check too.


def test_a_run_may_resume_with_the_other_conv_impl_but_not_another_width():
  saved = config_lib.base_config()
  now = config_lib.base_config()
  now.model.conv_impl = "taps"
  assert run_config.config_mismatches(run_config.config_to_dict(saved),
                                      run_config.config_to_dict(now)) == []
  now.model.width = 2.0
  lines = run_config.config_mismatches(run_config.config_to_dict(saved),
                                       run_config.config_to_dict(now))
  assert len(lines) == 1 and lines[0].startswith("model.width")
