"""byol_jax.model.layers: cross-replica batch norm against one device, weight standardisation,
symmetric padding and max-pool against NumPy references, the group count of GroupNorm.
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from byol_jax.model import layers as layers_lib
from byol_jax.model import networks
from byol_jax import parallel
from tiny_models import KEY, init_byol, model_cfg


def test_cross_replica_batchnorm_matches_one_device_on_the_whole_batch():
  n_dev = 4
  assert jax.local_device_count() >= n_dev, "conftest provides 4 fake CPU devices"
  single, params, state = init_byol()
  # Zero-mean inputs keep batch norm's E[x^2] - E[x]^2 well conditioned in float32.
  x = jnp.asarray(np.random.RandomState(1).randn(8, 16, 16, 3), jnp.float32)
  out, new_state = single.apply(params, state, None, x, True)
  pmapped = networks.make_byol_network(model_cfg(), 5, axis_name=parallel.DEVICE_AXIS)
  apply = jax.pmap(lambda p, s, xs: pmapped.apply(p, s, None, xs, True),
                   axis_name=parallel.DEVICE_AXIS, in_axes=(None, None, 0),
                   devices=jax.local_devices()[:n_dev])
  out_p, state_p = apply(params, state, x.reshape(n_dev, 2, *x.shape[1:]))
  # Against the whole-batch apply in float64: the 4-device outputs and statistics no less
  # accurate than the 1-device ones (tolerances.NOISE_FACTOR x their error or the noise
  # floor).
  with jax.enable_x64(True):
    ref = jax.jit(lambda p, s, v: single.apply(p, s, None, v, True))(*tolerances.float64((params, state, x)))
    ref_out, ref_state = tolerances.float64(ref)
  out_shape = lambda tree: jax.tree.map(lambda a: np.asarray(a).reshape(8, -1), tree)  # noqa: E731
  tolerances.assert_no_less_accurate(out_shape(out_p), out_shape(out), out_shape(ref_out))
  # On the host: indexing the sharded outputs (a[d]) would run a cross-device program.
  state_host = jax.tree.map(np.asarray, state_p)
  for d in range(n_dev):
    tolerances.assert_no_less_accurate(jax.tree.map(lambda a: a[d], state_host), new_state,
                                       ref_state)
  # Statistics of one device's 2 examples alone give visibly different outputs.
  local, _ = single.apply(params, state, None, x[:2], True)
  assert np.max(np.abs(local["projection"] - out["projection"][:2])) > 1e-2


def test_weight_standardised_kernel_has_zero_mean_unit_variance_per_output():
  w = np.random.RandomState(0).normal(0.3, 0.05, size=(3, 3, 5, 7)).astype(np.float32)
  ws = np.asarray(layers_lib.standardize_kernel(jnp.asarray(w)), np.float64)
  # float32 in the library over n = 45 values per output: its mean is off by n ulps of
  # mean|w|, which shifts every standardised value by that over std (+ 2 ulps of each); its
  # variance (n squares summed, n + 3 ulps), rsqrt and the products move the variance of the
  # result by n + 10 ulps relative, and WS_EPS by WS_EPS / var. Checked in float64.
  n, w64 = 45, w.astype(np.float64)
  scale = np.abs(w64).mean(axis=(0, 1, 2)) / w64.std(axis=(0, 1, 2))
  tolerances.assert_close(ws.mean(axis=(0, 1, 2)), 0.0, tolerances.ulps(n + 3, scale + 1))
  tolerances.assert_close(ws.var(axis=(0, 1, 2)), 1.0, tolerances.ulps(n + 10)
                          + layers_lib.WS_EPS / w64.var(axis=(0, 1, 2)))


def test_weight_standardised_conv_uses_the_standardised_kernel():
  x = np.random.RandomState(1).rand(2, 4, 4, 3).astype(np.float32)
  conv = hk.transform(lambda v: layers_lib.Conv2D(6, 1, standardize=True, name="c")(v))
  params = conv.init(KEY, x)
  w = np.asarray(params["c"]["w"], np.float64)[0, 0]  # [3, 6]
  w_hat = (w - w.mean(0)) / np.sqrt(w.var(0))
  # float32: standardising n = 3 values (the mean: n + 1 ulps of mean|w| over std; std and
  # rsqrt: n / 2 + 4 ulps of each value), then a sum of 3 products (3 ulps of sum|x w|).
  n = w.shape[0]
  w_err = (tolerances.ulps(n + 1, np.abs(w).mean(0) / np.sqrt(w.var(0)))
           + tolerances.ulps(n / 2 + 4 + n, w_hat))
  tolerances.assert_close(conv.apply(params, None, x), np.einsum("nhwc,co->nhwo", x, w_hat),
                          np.einsum("nhwc,co->nhwo", np.abs(x), w_err))


def np_conv(x, w, stride, pad):
  """Direct convolution with explicit symmetric zero padding (torchvision's arithmetic)."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] + 2 * pad - k) // stride + 1
  out_w = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]), np.float64)
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return out


def np_max_pool(x):
  """3x3 stride-2 max-pool with padding 1 (torch.nn.MaxPool2d(3, 2, 1))."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                             for j in range(out_w)], 1) for i in range(out_h)], 1)


@pytest.mark.parametrize("size,kernel", [(8, 3), (9, 3), (8, 7), (9, 7), (8, 1)])
def test_symmetric_padding_stride2_conv_matches_reference(size, kernel):
  x = np.random.RandomState(2).randn(1, size, size, 2).astype(np.float32)

  def run(padding):
    conv = hk.transform(lambda v: layers_lib.Conv2D(3, kernel, 2, padding, name="c")(v))
    params = conv.init(KEY, x)
    return np.asarray(conv.apply(params, None, x)), np.asarray(params["c"]["w"])

  got, w = run("symmetric")
  expected = np_conv(x.astype(np.float64), w.astype(np.float64), 2, kernel // 2)
  # A float32 sum of k x k x C products: k^2 C ulps of the sum of their magnitudes.
  bound = tolerances.ulps(kernel * kernel * x.shape[-1], np_conv(np.abs(x), np.abs(w), 2, kernel // 2))
  tolerances.assert_close(got, expected, bound)
  same, _ = run("same")  # Same init key, so the same kernel.
  if size % 2 == 0 and kernel > 1:  # TF 'SAME' shifts the window by one pixel here.
    assert np.any(np.abs(same - expected) > bound)  # Differs beyond rounding.


@pytest.mark.parametrize("size", [7, 8, 9])
def test_symmetric_max_pool_matches_reference(size):
  x = np.random.RandomState(3).randn(2, size, size, 3).astype(np.float32)
  got = np.asarray(layers_lib.max_pool(jnp.asarray(x), "symmetric"))
  np.testing.assert_array_equal(got, np_max_pool(x))
  # The gradient routes each window's 1 to its maximum, as torch's max-pool does.
  grad = jax.grad(lambda v: jnp.sum(layers_lib.max_pool(v, "symmetric")))(jnp.asarray(x))
  expected = np.zeros_like(x)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  for n, i, j, c in np.ndindex(got.shape):
    window = xp[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
    di, dj = np.unravel_index(np.argmax(window), window.shape)
    expected[n, 2 * i + di - 1, 2 * j + dj - 1, c] += 1
  np.testing.assert_array_equal(grad, expected)
  if size % 2 == 0:
    assert not np.array_equal(np.asarray(layers_lib.max_pool(jnp.asarray(x), "same")), got)



@pytest.mark.parametrize("channels,max_groups,expected", [
    (64, 32, 32), (4, 32, 4), (38, 32, 19), (24, 16, 12), (7, 4, 1), (8, 1, 1)])
def test_group_count_is_largest_divisor_not_above_gn_groups(channels, max_groups, expected):
  assert layers_lib.group_count(channels, max_groups) == expected
