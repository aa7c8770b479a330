"""model.conv_impl='taps' computes what XLA's convolution and max-pool compute.

References: jax.lax.conv_general_dilated and reduce_window (conv_impl='lax'), on the same
inputs and parameters, values and gradients; ties in the max-pool included.

Tolerances come from the computation, never from what one machine measured. One
convolution: the worst-case rounding bound of a float32 sum of n products (each result
within gamma_n * sum|terms| of the exact one, in any summation order), so two orders
differ by at most twice that. The whole encoder (batch statistics, divisions, square
roots): a float64 evaluation is the reference, and taps' float32 error must stay within
what a float32 computation of it can err, measured on XLA's own convolutions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import config as config_lib
from byol_jax.model import layers as layers_lib
from byol_jax.model import networks
from byol_jax.store import run_config

KEY = jax.random.PRNGKey(0)
SYMMETRIC = "symmetric"
UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2  # u = 2**-24: |fl(a op b) - a op b| <= u|.|


def _padding(name, kernel):
  return layers_lib.PADDINGS["symmetric" if name == SYMMETRIC else "same"](kernel)


def _gamma(n):
  """Higham's gamma_n = n u / (1 - n u): relative bound of n float32 roundings in a row."""
  return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def _float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _value_and_grads(conv_fn, x, w, probe, stride, padding):
  """conv(x, w) and the gradients of sum(conv(x, w) * probe) w.r.t. x and w."""
  out, vjp = jax.vjp(lambda x, w: conv_fn(x, w, stride, padding), x, w)
  return (out, *vjp(probe))


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (1, 3, 1, "same"), (2, 3, 1, "same"), (2, 3, 2, "same"), (4, 3, 2, "same"),
    (7, 3, 2, "same"), (8, 7, 2, "same"), (9, 7, 2, SYMMETRIC), (8, 3, 2, SYMMETRIC),
    (5, 3, 1, SYMMETRIC), (4, 1, 2, "same"), (7, 1, 1, "same"), (3, 3, 1, "same"),
])
def test_conv_taps_matches_xla_conv_values_and_gradients(size, kernel, stride, padding):
  x = jax.random.normal(KEY, (3, size, size, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 4))
  pad = _padding(padding, kernel)
  # A fixed random cotangent, so every output element's gradient path is checked.
  out_shape = layers_lib.conv_lax(x, w, stride, pad).shape
  probe = jax.random.normal(jax.random.PRNGKey(7), out_shape)
  want = _value_and_grads(layers_lib.conv_lax, x, w, probe, stride, pad)
  got = _value_and_grads(layers_lib.conv_taps, x, w, probe, stride, pad)
  # Each element of the output and of both gradients is a sum of products of two of
  # (x, w, probe); the same sums of |products| (exactly, in float64) times gamma_n bound
  # each float32 result's rounding error. n, the most roundings a product goes through:
  # its own, then the sum over kernel*kernel*C_in (output), over kernel*kernel*C_out
  # (gradient of x; taps sums C_out, then adds the kernel*kernel taps: fewer) or over
  # N*H'*W' (gradient of w).
  with jax.enable_x64(True):
    magnitude = _value_and_grads(layers_lib.conv_lax, *_float64((jnp.abs(x), jnp.abs(w),
                                                                 jnp.abs(probe))), stride, pad)
  n_terms = (kernel * kernel * x.shape[-1], kernel * kernel * w.shape[-1],
             out_shape[0] * out_shape[1] * out_shape[2])
  for name, g, e, m, n in zip(("output", "grad x", "grad w"), got, want, magnitude, n_terms):
    assert g.shape == e.shape, name
    error = np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64))
    bound = 2 * _gamma(n) * np.asarray(m)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(error - bound), error.shape))
    assert np.all(error <= bound), (
        f"{name}: |taps - lax| = {error[worst]:.3g} at {worst} exceeds the rounding "
        f"bound {bound[worst]:.3g} (n={n})")


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


# The encoder case: 4 images of 36 px, so the last stage's maps are 2x2 and group norm
# (one channel per group at this width) has values to normalise; at 1x1 every
# representation and gradient of the group-norm encoder is exactly 0.
ENCODER_IMAGES = (4, 36, 36, 1)
# XLA's float32 error is measured on this many batch orders (the same function, its batch
# sums taken in other orders): one order alone can be luckily accurate.
ENCODER_ORDERS = 4
ENCODER_FLOOR_ULPS = 4


def _encoder_value_and_grads(impl, norm, padding):
  c = config_lib.base_config().model
  c.update(dict(encoder="resnet18", width=0.0625, stem="imagenet", norm=norm,
                padding=padding, conv_impl=impl))
  net = networks.make_encoder_network(c)

  @jax.jit
  def run(params, state, images):
    def loss(p):
      rep, new_state = net.apply(p, state, None, images, is_training=True)
      return jnp.sum(jnp.square(rep)), (rep, new_state)
    (_, (rep, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return rep, new_state, grads
  return net, run


def _relative_errors(tree, exact):
  """Per array: max |tree - exact| over the exact array's own scale (max |exact|)."""
  return jax.tree.map(lambda a, e: float(np.max(np.abs(np.asarray(a, np.float64) - e)) /
                                         np.max(np.abs(e))), tree, exact)


@pytest.mark.parametrize("norm,padding", [("batch", "same"), ("group_ws", SYMMETRIC)])
def test_encoder_with_taps_matches_lax_encoder(norm, padding):
  """Same params, same batch: the ResNet-18 representation, BN state and gradients agree.

  A float64 evaluation is the reference (its few float32 steps, weight standardisation
  and the final cast, are single roundings, small next to the float32 runs' errors and
  counted alike in XLA's and taps'). Rounding errors grow through 8 normalised
  layers and their gradients, more or less for every array, so the float32 error level of
  this computation is measured: the largest relative error XLA's own convolutions make
  over all arrays (and several batch orders). taps' relative error on every array may
  exceed it by sqrt(n) for the longest float32 sum n of the network, plus a few ulps: the
  typical error of a sum taken in sequence is up to sqrt(n) times that of a blocked or
  pairwise one (the gradient of the stem's kernel and its batch statistics sum
  N x H/2 x W/2 terms). A wrong tap, kernel layout or padding gives errors of order 1 on
  an array's scale.
  """
  net, lax_run = _encoder_value_and_grads("lax", norm, padding)
  _, taps_run = _encoder_value_and_grads("taps", norm, padding)
  images = jax.random.uniform(KEY, ENCODER_IMAGES)
  params, state = net.init(KEY, images, is_training=True)
  with jax.enable_x64(True):
    exact = jax.tree.map(np.asarray, lax_run(*_float64((params, state, images))))
  zeros = [jax.tree_util.keystr(p) for p, e in jax.tree_util.tree_leaves_with_path(exact)
           if not np.any(e)]
  assert not zeros, f"all-zero arrays compare nothing: {zeros}"

  lax_level = 0.0
  for shift in range(ENCODER_ORDERS):
    order = np.roll(np.arange(images.shape[0]), shift)
    rep, new_state, grads = lax_run(params, state, images[order])
    result = (np.asarray(rep)[np.argsort(order)], new_state, grads)  # Back in batch order.
    lax_level = max(lax_level, *jax.tree.leaves(_relative_errors(result, exact)))
  n, height, width, _ = ENCODER_IMAGES
  factor = np.sqrt(n * (height // 2) * (width // 2))
  tolerance = factor * lax_level + ENCODER_FLOOR_ULPS * 2 * UNIT_ROUNDOFF

  got = taps_run(params, state, images)
  assert jax.tree.structure(got) == jax.tree.structure(exact)
  errors = _relative_errors(got, exact)
  too_far = {jax.tree_util.keystr(p): f"{e:.3g}"
             for p, e in jax.tree_util.tree_leaves_with_path(errors) if e > tolerance}
  assert not too_far, (f"taps' relative errors exceed {tolerance:.3g} ({factor:.0f} x XLA's "
                       f"{lax_level:.3g}): {too_far}")


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
