"""Losses against NumPy formulas; the health monitors against NumPy statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.training import losses
from byol_jax.training import monitors


def _np_cos(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_regression_loss_equals_two_minus_two_cosine():
  rng = np.random.default_rng(0)
  p, z = rng.normal(size=(2, 16, 8)).astype(np.float32) * np.array([1, 5], np.float32)[:, None, None]
  np.testing.assert_allclose(losses.regression_loss(p, z), 2 - 2 * _np_cos(p, z), atol=1e-5)


def test_regression_loss_is_zero_for_parallel_and_four_for_opposite_vectors():
  v = np.array([[1.0, 2.0, -3.0]], np.float32)
  np.testing.assert_allclose(losses.regression_loss(v, 7 * v), [0.0], atol=1e-6)
  np.testing.assert_allclose(losses.regression_loss(v, -v), [4.0], atol=1e-6)


def test_byol_loss_sums_the_two_directions_and_averages_over_the_batch():
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = rng.normal(size=(4, 32, 6)).astype(np.float32)
  expected = np.mean((2 - 2 * _np_cos(p1, z2)) + (2 - 2 * _np_cos(p2, z1)))
  np.testing.assert_allclose(losses.byol_loss(p1, p2, z1, z2), expected, rtol=1e-5)


def test_byol_loss_is_symmetric_in_the_views():
  rng = np.random.default_rng(2)
  p1, p2, z1, z2 = rng.normal(size=(4, 8, 5)).astype(np.float32)
  np.testing.assert_allclose(losses.byol_loss(p1, p2, z1, z2), losses.byol_loss(p2, p1, z2, z1),
                             rtol=1e-6)


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
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -logp[np.arange(6), labels]
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels), nll.mean(), rtol=1e-5)
  mask = np.array([1, 1, 0, 1, 0, 0], np.float32)
  np.testing.assert_allclose(losses.softmax_cross_entropy(logits, labels, mask),
                             nll[mask > 0].mean(), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_topk_accuracy_matches_numpy_argsort(k):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(50, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=50)
  top = np.argsort(-logits, axis=-1)[:, :k]
  expected = np.mean([labels[i] in top[i] for i in range(50)])
  np.testing.assert_allclose(losses.topk_accuracy(logits, labels, k), expected)


def test_collapse_std_matches_numpy_and_is_zero_when_collapsed():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(64, 16)).astype(np.float32)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  np.testing.assert_allclose(monitors.collapse_std(z), np.mean(np.std(z, axis=0)), rtol=1e-4)
  collapsed = np.tile(z[:1], (64, 1))
  np.testing.assert_allclose(monitors.collapse_std(collapsed), 0.0, atol=1e-6)


def test_effective_rank_matches_numpy_svd():
  rng = np.random.default_rng(7)
  z = rng.normal(size=(128, 8)).astype(np.float32) * np.array([5, 3, 1, 1, .5, .1, .1, .01])
  centred = z - z.mean(0)
  s = np.linalg.svd(centred, compute_uv=False)
  p = s / s.sum()
  np.testing.assert_allclose(monitors.effective_rank(z), np.exp(-np.sum(p * np.log(p))), rtol=1e-3)
  rank_one = np.outer(rng.normal(size=128), rng.normal(size=8)).astype(np.float32)
  np.testing.assert_allclose(monitors.effective_rank(rank_one), 1.0, rtol=1e-2)
  collapsed = np.tile(z[:1] / np.linalg.norm(z[:1]), (128, 1))
  np.testing.assert_allclose(monitors.effective_rank(collapsed), 1.0, rtol=1e-2)


def test_monitors_over_devices_equal_the_single_device_figures():
  n = jax.local_device_count()
  rng = np.random.default_rng(8)
  online, target = rng.normal(size=(2, 8 * n, 6)).astype(np.float32)
  single = monitors.projection_health(online, target)
  split = lambda x: x.reshape(n, 8, 6)
  multi = jax.pmap(lambda a, b: monitors.projection_health(a, b, "d"), axis_name="d")(
      split(online), split(target))
  for key in ("collapse_std", "effective_rank"):  # Global statistics: identical on all devices.
    np.testing.assert_allclose(multi[key], np.full(n, single[key]), rtol=1e-4)
  np.testing.assert_allclose(np.mean(multi["online_target_cosine"]), single["online_target_cosine"], rtol=1e-5)
