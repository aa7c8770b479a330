"""LARS, masks and schedules against NumPy implementations of the formulas."""
import math

import jax
import numpy as np
import optax
import pytest

import tolerances
from byol_jax import config as config_lib
from byol_jax.training import optim

ETA, WD, MOM = 1e-3, 1e-2, 0.9


def _params(rng):
  """A Haiku-style tree: conv/linear weights plus a bias and BN scale/offset."""
  return {
      "encoder/~/conv": {"w": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
      "encoder/~/batchnorm": {"scale": rng.normal(size=(1, 1, 1, 4)).astype(np.float32),
                              "offset": rng.normal(size=(1, 1, 1, 4)).astype(np.float32)},
      "predictor/~/linear": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                             "b": rng.normal(size=(3,)).astype(np.float32)},
  }


def _np_lars(params, grads_seq, lrs, order, dtype=np.float64):
  """Reference LARS: decay + trust ratio on weights only, momentum, lr in the given order.

  In float64, the reference; in float32, a float32 evaluation of the same maths, the
  yardstick of float32 accuracy.
  """
  params = {m: {n: x.astype(dtype) for n, x in v.items()} for m, v in params.items()}
  trace = {m: {n: np.zeros_like(x) for n, x in v.items()} for m, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for m in params:
      for n, w in params[m].items():
        g = grads[m][n].astype(dtype)
        if n not in ("b", "scale", "offset"):
          g = g + WD * w
          wn, gn = np.linalg.norm(w), np.linalg.norm(g)
          g = g * (ETA * wn / gn if wn > 0 and gn > 0 else 1.0)
        if order == "momentum_first":
          trace[m][n] = MOM * trace[m][n] + g
          params[m][n] = w - lr * trace[m][n]
        else:
          trace[m][n] = MOM * trace[m][n] + lr * g
          params[m][n] = w - trace[m][n]
  return params


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("order", ["momentum_first", "lr_first"])
def test_lars_matches_numpy_under_a_changing_learning_rate(order):
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads_seq = [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
               for _ in range(5)]
  schedule = lambda step: 0.5 * (step + 1)  # Changes every step, as in warm-up.
  tx = optim.lars(schedule, WD, MOM, ETA, optim.adaptation_mask, order)
  got = _run(tx, params, grads_seq)
  lrs = [schedule(k) for k in range(5)]
  expected = _np_lars(params, grads_seq, lrs, order)
  # Five steps of norms, ratios and traces: no less accurate than NumPy's float32 evaluation
  # (tolerances.NOISE_FACTOR x its error or the noise floor).
  tolerances.assert_no_less_accurate(got, _np_lars(params, grads_seq, lrs, order, np.float32),
                                     expected)


def test_the_two_lars_orders_differ_only_when_the_learning_rate_changes():
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads_seq = [jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
               for _ in range(3)]
  run = lambda lr, order: _run(optim.lars(lr, WD, MOM, ETA, optim.adaptation_mask, order), params, grads_seq)
  const_a, const_b = run(0.1, "momentum_first"), run(0.1, "lr_first")
  # Equal maths, different float32 roundings: each no less accurate than the other against
  # float64 (tolerances.NOISE_FACTOR x its error or the noise floor).
  want = _np_lars(params, grads_seq, [0.1] * 3, "momentum_first")
  tolerances.assert_no_less_accurate(const_a, const_b, want)
  tolerances.assert_no_less_accurate(const_b, const_a, want)
  ramp = lambda step: 0.1 * (step + 1)
  diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                run(ramp, "momentum_first"), run(ramp, "lr_first"))
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


def test_zero_params_and_zero_gradients_give_finite_updates():
  params = {"lin": {"w": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.float32)}}
  grads_zero = jax.tree_util.tree_map(np.zeros_like, params)
  grads_one = jax.tree_util.tree_map(np.ones_like, params)
  for order in config_lib.LARS_ORDERS:
    tx = optim.lars(0.1, WD, MOM, ETA, optim.adaptation_mask, order)
    for grads in (grads_zero, grads_one):
      out = _run(tx, params, [grads, grads])
      assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))
    # Zero weights: trust ratio falls back to 1, so the weight moves by -lr * g.
    out = _run(tx, params, [grads_one])
    np.testing.assert_array_equal(out["lin"]["w"], np.float32(-0.1))  # Exact: ratio 1, g 1.


def test_masks_exclude_biases_and_normalisation_parameters_only():
  params = _params(np.random.default_rng(2))
  mask = optim.adaptation_mask(params)
  assert mask["encoder/~/conv"]["w"] and mask["predictor/~/linear"]["w"]
  assert not any([mask["encoder/~/batchnorm"]["scale"], mask["encoder/~/batchnorm"]["offset"],
                  mask["predictor/~/linear"]["b"]])
  pred = optim.predictor_mask(params)
  assert pred["predictor/~/linear"]["w"] and pred["predictor/~/linear"]["b"]
  assert not pred["encoder/~/conv"]["w"]


def _schedule_config(**overrides):
  c = config_lib.base_config()
  c.batch_size, c.dataset.num_train_examples, c.num_epochs = 512, 5120, 100  # 10 steps/epoch.
  c.optim.base_lr, c.optim.warmup_epochs = 0.4, 10
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def test_learning_rate_schedule_at_start_warmup_end_middle_and_end():
  c = _schedule_config()
  total, warmup = config_lib.total_steps(c), config_lib.warmup_steps(c)
  assert (total, warmup) == (1000, 100)
  lr = optim.learning_rate_schedule(c.optim.base_lr, c.batch_size, total, warmup)
  peak = 0.4 * 512 / 256
  # float32: the step fraction and pi x it (~3 ulps into cos), cos, 1 + cos, x peak / 2.
  bound = tolerances.ulps(8, peak)
  tolerances.assert_close([lr(0), lr(50), lr(100), lr(550), lr(1000)],
                          [0.0, peak / 2, peak, peak / 2, 0.0], bound)
  k = 325  # A quarter into the decay: cos(pi/4).
  tolerances.assert_close(lr(k), peak * (1 + math.cos(math.pi * 225 / 900)) / 2, bound)


def test_learning_rate_schedule_without_warmup_starts_at_peak():
  lr = optim.learning_rate_schedule(1.0, 256, 10, 0)
  tolerances.assert_close([lr(0), lr(5), lr(10)], [1.0, 0.5, 0.0], tolerances.ulps(8, 1.0))  # As above.


def test_tau_schedule_rises_from_tau_base_to_one_as_a_cosine():
  tau = optim.tau_schedule(0.99, 1000, "cosine")
  # float32: 1 - tau_base, the fraction, pi x it, cos, + 1, products, 1 - them: 8 ulps of 1.
  bound = tolerances.ulps(8, 1.0)
  tolerances.assert_close([tau(0), tau(500), tau(1000), tau(5000)], [0.99, 0.995, 1.0, 1.0], bound)
  tolerances.assert_close(tau(250), 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, bound)
  const = optim.tau_schedule(0.0, 1000, "constant")
  np.testing.assert_array_equal([const(0), const(999)], [0.0, 0.0])  # A constant: exact.


def test_unknown_schedule_and_order_names_are_rejected_with_the_valid_ones():
  with pytest.raises(ValueError, match="cosine"):
    optim.tau_schedule(0.99, 10, "linear")
  with pytest.raises(ValueError, match="momentum_first"):
    optim.lars(0.1, order="nesterov")


def test_predictor_lr_multiplier_scales_only_predictor_updates():
  params = _params(np.random.default_rng(3))
  grads = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.3, np.float32), params)

  def step(multiplier):
    c = _schedule_config()
    c.optim.predictor_lr_multiplier = multiplier
    c.optim.warmup_epochs = 0
    tx, _ = optim.make_optimizer(c)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  base, tenfold = step(1.0), step(10.0)
  for m in params:
    for n in params[m]:
      factor = 10.0 if m.startswith("predictor") else 1.0
      # The same LARS update, then one multiplication by the factor: the same rounding.
      np.testing.assert_array_equal(tenfold[m][n], factor * np.asarray(base[m][n]))
