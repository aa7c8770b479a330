"""Losses against NumPy formulas; the health monitors against NumPy statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from byol_jax.training import losses
from byol_jax.training import monitors


def _np_cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _regression_loss_bound(d):
  """Rounding bound of one float32 regression loss of D-dim vectors (the loss is <= 4).

  Normalising (D squares summed, rsqrt, product) moves each component by (D/2 + 2) ulps of
  itself, so each difference p_j - z_j by that times |p_j| + |z_j|, and the loss by
  2 sum |p_j - z_j| (|p_j| + |z_j|) (D/2 + 2) ulps <= 8 (D/2 + 2) ulps; the D differences,
  squares and their sum (<= 4): 4 D ulps more.
  """
  return tolerances.ulps(8 * (d / 2 + 2) + 4 * d)


def test_regression_loss_equals_two_minus_two_cosine():
  rng = np.random.default_rng(0)
  p, z = rng.normal(size=(2, 16, 8)).astype(np.float32) * np.array([1, 5], np.float32)[:, None, None]
  want = 2 - 2 * _np_cos(p.astype(np.float64), z.astype(np.float64))
  tolerances.assert_close(losses.regression_loss(p, z), want, _regression_loss_bound(8))


def test_regression_loss_is_zero_for_parallel_and_four_for_opposite_vectors():
  v = np.array([[1.0, 2.0, -3.0]], np.float32)
  tolerances.assert_close(losses.regression_loss(v, 7 * v), [0.0], _regression_loss_bound(3))
  tolerances.assert_close(losses.regression_loss(v, -v), [4.0], _regression_loss_bound(3))


def test_byol_loss_sums_the_two_directions_and_averages_over_the_batch():
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = rng.normal(size=(4, 32, 6)).astype(np.float32)
  p1, p2, z1, z2 = (x.astype(np.float64) for x in (p1, p2, z1, z2))
  expected = np.mean((2 - 2 * _np_cos(p1, z2)) + (2 - 2 * _np_cos(p2, z1)))
  # Two losses and their sum per example (<= 8: 1 ulp of 8), then the mean of 32 (32 ulps of 8).
  bound = 2 * _regression_loss_bound(6) + tolerances.ulps(1 + 32, 8.0)
  tolerances.assert_close(losses.byol_loss(p1, p2, z1, z2), expected, bound)


def test_byol_loss_is_symmetric_in_the_views():
  rng = np.random.default_rng(2)
  p1, p2, z1, z2 = rng.normal(size=(4, 8, 5)).astype(np.float32)
  # The same two per-example terms, added in the other order: float addition commutes.
  np.testing.assert_array_equal(losses.byol_loss(p1, p2, z1, z2), losses.byol_loss(p2, p1, z2, z1))


def test_byol_loss_sends_no_gradient_to_the_targets():
  rng = np.random.default_rng(3)
  p1, p2, z1, z2 = rng.normal(size=(4, 8, 5)).astype(np.float32)
  grads = jax.grad(losses.byol_loss, argnums=(0, 2, 3))(p1, p2, z1, z2)
  assert np.abs(grads[0]).sum() > 0
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)


def test_l2_normalize_of_zero_vector_is_finite():
  out = losses.l2_normalize(jnp.zeros((2, 4)))
  np.testing.assert_array_equal(out, 0.0)
  g = jax.grad(lambda x: losses.regression_loss(x, jnp.ones((1, 4))).sum())(jnp.zeros((1, 4)))
  assert np.all(np.isfinite(g))


def test_softmax_cross_entropy_matches_numpy_with_and_without_mask():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  x = logits.astype(np.float64)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -logp[np.arange(6), labels]
  # Per example, log-softmax of K = 5 logits: the shifts x - max (1 ulp of the range R each),
  # exp (1 ulp), the sum of K (K ulps), log (1 ulp + the sum's relative error) and the
  # difference (1 ulp of nll): (K + 3) ulps of R + 1 + nll; then the mean (6 ulps).
  r = np.ptp(x, axis=-1)
  bound = lambda keep: np.max(tolerances.ulps(5 + 3, r + 1 + nll)[keep]) + tolerances.ulps(6, nll.max())
  tolerances.assert_close(losses.softmax_cross_entropy(logits, labels), nll.mean(), bound(slice(None)))
  mask = np.array([1, 1, 0, 1, 0, 0], np.float32)
  tolerances.assert_close(losses.softmax_cross_entropy(logits, labels, mask),
                          nll[mask > 0].mean(), bound(mask > 0))


@pytest.mark.parametrize("k", [1, 3])
def test_topk_accuracy_matches_numpy_argsort(k):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(50, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=50)
  top = np.argsort(-logits, axis=-1)[:, :k]
  expected = np.mean([labels[i] in top[i] for i in range(50)])
  # An exact count of hits over 50: one rounding of the quotient.
  tolerances.assert_close(losses.topk_accuracy(logits, labels, k), expected, tolerances.ulps(0.5, expected))


def test_collapse_std_matches_numpy_and_is_zero_when_collapsed():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(64, 16)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  want = np.mean(np.std(z.astype(np.float64), axis=0))
  # Centred squares (the mean's error cancels to first order), their mean over N = 64,
  # sqrt, the mean over D = 16: under N + D ulps of the result.
  tolerances.assert_close(monitors.collapse_std(z), want, tolerances.ulps(64 + 16, want))
  collapsed = np.tile(z[:1], (64, 1))
  # The mean of 64 equal values is off by at most 64 ulps of them, and the std is that error.
  tolerances.assert_close(monitors.collapse_std(collapsed), 0.0, tolerances.ulps(64, np.abs(z[0]).max()))


def _np_effective_rank(z, dtype):
  """effective_rank's algorithm (covariance, eigvalsh, floor, entropy) in NumPy in `dtype`."""
  x = np.asarray(z, dtype)
  centred = x - x.mean(0, dtype=dtype)
  eig = np.linalg.eigvalsh(centred.T @ centred / dtype(len(x)))
  eig = np.where(eig > dtype(1e-6) * eig.max(), eig, dtype(0))
  p = np.sqrt(eig) / np.sqrt(eig).sum()
  return np.exp(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, dtype(1))), dtype(0))))


def _np_health(online, target):
  """projection_health in NumPy float64: the references of the monitors."""
  z = online / np.linalg.norm(online, axis=-1, keepdims=True)
  t = target / np.linalg.norm(target, axis=-1, keepdims=True)
  s = np.linalg.svd(z - z.mean(0), compute_uv=False)
  p = s / s.sum()
  return dict(collapse_std=np.mean(np.std(z, axis=0)), effective_rank=np.exp(-np.sum(p * np.log(p))),
              online_target_cosine=np.mean(np.sum(z * t, axis=-1)))


def test_effective_rank_matches_numpy_svd():
  rng = np.random.default_rng(7)
  z = rng.normal(size=(128, 8)).astype(np.float32) * np.array([5, 3, 1, 1, .5, .1, .1, .01])
  centred = z - z.mean(0)
  s = np.linalg.svd(centred, compute_uv=False)
  p = s / s.sum()
  # The float32 covariance's eigenvalues are off by up to ~N ulps of the largest, which the
  # square root amplifies for small ones: no useful a-priori bound. The yardstick is the
  # float32 evaluation of the same algorithm in NumPy: no less accurate than it against the
  # float64 SVD (tolerances.NOISE_FACTOR x its error or the noise floor).
  def check(z, want):
    tolerances.assert_no_less_accurate(monitors.effective_rank(z), _np_effective_rank(z, np.float32),
                                       want)
  check(z, np.exp(-np.sum(p * np.log(p))))
  rank_one = np.outer(rng.normal(size=128), rng.normal(size=8)).astype(np.float32)
  check(rank_one, 1.0)
  collapsed = np.tile(z[:1] / np.linalg.norm(z[:1]), (128, 1))
  check(collapsed, 1.0)


def test_monitors_over_devices_equal_the_single_device_figures():
  n = jax.local_device_count()
  rng = np.random.default_rng(8)
  online, target = rng.normal(size=(2, 8 * n, 6)).astype(np.float32)
  single = monitors.projection_health(online, target)
  split = lambda x: x.reshape(n, 8, 6)
  multi = jax.pmap(lambda a, b: monitors.projection_health(a, b, "d"), axis_name="d")(
      split(online), split(target))
  # Against float64: each device's figures no less accurate than the single-device ones
  # (tolerances.NOISE_FACTOR x their error or the noise floor).
  want = _np_health(online.astype(np.float64), target.astype(np.float64))
  for key in ("collapse_std", "effective_rank"):  # Global statistics: the same on all devices.
    for d in range(n):
      tolerances.assert_no_less_accurate({key: multi[key][d]}, {key: single[key]}, {key: want[key]})
  key = "online_target_cosine"
  tolerances.assert_no_less_accurate({key: np.mean(multi[key])}, {key: single[key]}, {key: want[key]})
