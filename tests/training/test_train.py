"""The pmapped BYOL update: EMA, gradient paths, device-count invariance, guards, ablations.

One tiny config (ResNet-18 at width 1/8, 16 px, small stem) is compiled once per device
count and reused across tests.
"""
import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from byol_jax.tools import bench
from byol_jax import config as config_lib
from byol_jax.model import networks
from byol_jax import parallel
from byol_jax.training import train
from tolerances import augment_in_float32

GLOBAL_BATCH = 8
# Steps 2, 4, ... (and the last, 10) are logged and compute the monitors; 1, 3, ... do not.
LOG_EVERY = 2


def tiny_config(**model_overrides):
  c = config_lib.base_config()
  c.batch_size, c.image_size, c.num_steps = GLOBAL_BATCH, 16, 10
  c.dataset.num_classes = 5
  c.log.every_steps = LOG_EVERY
  c.optim.warmup_epochs = 0
  c.model.update(dict(encoder="resnet18", width=0.125, stem="small", projector_hidden=32,
                      projector_out=16, predictor_hidden=32), **model_overrides)
  return config_lib.validate(c)


def identity_augment(images, keys, view_cfg):
  del keys, view_cfg
  return images.astype(jnp.float32)


def host_batch(seed=0, batch=GLOBAL_BATCH, size=16):
  """Float views in [0, 1] (the update also takes uint8; one dtype keeps one compile)."""
  rng = np.random.default_rng(seed)
  views = rng.uniform(0, 1, (2, batch, size, size, 3)).astype(np.float32)
  return dict(view1=views[0], view2=views[1], label=rng.integers(0, 5, batch).astype(np.int32))


@functools.lru_cache(maxsize=None)
def setup(num_devices: int):
  """(config, deps, initial state, pmapped update on the first num_devices devices)."""
  c = tiny_config()
  deps = train.make_deps(c)
  state = train.init_state(c, deps, jax.random.PRNGKey(0), channels=3)
  update = train.make_pmapped_update(deps, devices=jax.local_devices()[:num_devices])
  return c, deps, state, update


def run_steps(num_devices, batches, start_step=0, all_metrics=False):
  """(final state, metrics of the last step, or of every step when all_metrics)."""
  c, deps, state, update = setup(num_devices)
  devices = jax.local_devices()[:num_devices]
  replicated = parallel.replicate(state._replace(step=jnp.int32(start_step)), devices)
  history = []
  for b in batches:
    replicated, metrics = update(replicated, parallel.shard(parallel.split_for_devices(b, num_devices), devices),
                                 jax.random.PRNGKey(1))
    history.append(parallel.unreplicate(metrics))
  return parallel.unreplicate(replicated), (history if all_metrics else history[-1])


@functools.lru_cache(maxsize=None)
def setup_float64():
  """setup(1)'s update with float32 augmentation, for float64 runs (one compile, cached)."""
  _, deps, _, _ = setup(1)
  return train.make_pmapped_update(deps._replace(augment_fn=augment_in_float32),
                                   devices=jax.local_devices()[:1])


def run_steps_float64(batches):
  """run_steps(1, batches) in float64 (state, params, compute): the reference of the float32
  runs. x64 is on only inside; the results come back as float64 NumPy trees."""
  _, _, state, _ = setup(1)
  devices = jax.local_devices()[:1]
  with jax.enable_x64(True):
    replicated = parallel.replicate(tolerances.float64(state), devices)
    for b in batches:
      replicated, metrics = setup_float64()(
          replicated, parallel.shard(parallel.split_for_devices(b, 1), devices),
          jax.random.PRNGKey(1))
    out = tolerances.float64(parallel.unreplicate((replicated, metrics)))
  assert not jax.config.jax_enable_x64  # Nothing leaks to the other tests.
  return out


def test_target_is_the_ema_of_the_updated_online_params():
  _, _, old, _ = setup(1)
  new, metrics = run_steps(1, [host_batch()])
  tau = float(metrics["tau"])
  assert 0.99 <= tau < 1.0
  expected = jax.tree_util.tree_map(lambda t, o: tau * t + (1 - tau) * o,
                                    old.target_params, new.online_params)
  # The update forms s * online + (1 - s) * target with s = 1 - tau, and 1 - s = tau exactly
  # (Sterbenz: tau in [0.5, 1]): the same two products and sum as here, up to a fused
  # multiply-add: each side is within 2u (|tau t| + |(1 - tau) o|), so 2 ulps apart.
  bound = jax.tree_util.tree_map(
      lambda t, o: tolerances.ulps(2, np.abs(tau * np.asarray(t)) + np.abs((1 - tau) * np.asarray(o))),
      old.target_params, new.online_params)
  tolerances.assert_trees_close(new.target_params, expected, bound)
  # The online params did move, so the EMA is not trivially the old target.
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), old.online_params, new.online_params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  assert int(new.step) == 1


def test_no_gradient_reaches_the_target_params():
  c, deps, state, _ = setup(1)
  b = host_batch()
  fn = lambda online, target: train.loss_fn(online, target, state.online_state, state.target_state,
                                            b["view1"], b["view2"], b["label"],
                                            forward=_local_forward(c))[0]
  g_online, g_target = jax.grad(fn, argnums=(0, 1))(state.online_params, state.target_params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(g_target))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_online))


def _local_forward(c):
  return networks.make_byol_network(c.model, c.dataset.num_classes, axis_name=None)


def test_probe_loss_sends_gradient_only_to_the_classifier():
  c, _, state, _ = setup(1)
  b = host_batch()
  v = b["view1"]
  forward = _local_forward(c)

  def probe_loss(params):
    _, (_, _, aux) = train.loss_fn(params, state.target_params, state.online_state,
                                   state.target_state, v, v, b["label"], forward=forward)
    return aux["probe_loss"]

  grads = jax.grad(probe_loss)(state.online_params)
  for module, name, g in hk.data_structures.traverse(grads):
    if module.startswith("classifier"):
      assert np.any(np.asarray(g) != 0), module
    else:
      assert np.all(np.asarray(g) == 0), f"{module}/{name} received probe gradient"


def test_four_devices_and_one_device_give_the_same_new_state():
  """Both float32 runs against a float64 run of the same two steps (1 device).

  Splitting the batch over 4 devices changes the float32 summation order (partial sums,
  then an all-reduce), not the rounding bound, so the 4-device run must be as accurate as
  the 1-device one, leaf by leaf: err(4) <= 8 max(err(1), 16 ulps of the module's largest
  value), err the max error against float64 (tolerances.NOISE_FACTOR and NOISE_FLOOR_ULPS:
  the factor 8 comes from this test's own measurements, up to 4.4 over 8 batch pairs; the
  floor holds the biases before batch norm, whose gradients are pure cancellation). The
  metrics, the same way. A fixed tolerance failed here on other CPUs: the LARS trace of a
  near-zero batch-norm offset gradient after two steps is ill-conditioned.
  """
  batches = [host_batch(0), host_batch(1)]
  one, m_one = run_steps(1, batches)
  four, m_four = run_steps(4, batches)
  ref, m_ref = run_steps_float64(batches)
  tolerances.assert_no_less_accurate(four, one, ref)
  keys = ("loss", "probe_loss", "grad_norm", "collapse_std", "effective_rank")
  m_four, m_one, m_ref = ({k: m[k] for k in keys} for m in (m_four, m_one, m_ref))
  tolerances.assert_no_less_accurate(m_four, m_one, m_ref)


def test_metrics_are_reported_and_healthy_at_init():
  # Counter at 1: this step ends at 2, a logged step, so the monitors are computed.
  _, metrics = run_steps(1, [host_batch()], start_step=LOG_EVERY - 1)
  expected = {"loss", "probe_loss", "probe_top1", "learning_rate", "tau", "grad_norm",
              "collapse_std", "effective_rank", "online_target_cosine", "nonfinite"}
  assert expected <= set(metrics)
  assert 0.0 <= float(metrics["loss"]) <= 8.0
  assert float(metrics["nonfinite"]) == 0.0
  assert float(metrics["collapse_std"]) > 0.3 / np.sqrt(16)
  # Copy-initialised target: online and target projections agree at step 0, up to rounding
  # delta that moves the cosine by delta^2 only. The rest is rounding: normalising each of z
  # and z' and their dot product (D terms each: 2 D ulps), the mean over the batch.
  d = tiny_config().model.projector_out
  tolerances.assert_close(metrics["online_target_cosine"], 1.0, tolerances.ulps(2 * d + GLOBAL_BATCH),
                          "online_target_cosine")


def test_monitors_are_computed_on_logged_steps_only():
  _, history = run_steps(4, [host_batch(0), host_batch(1)], all_metrics=True)
  skipped, logged = history
  for key in train.MONITOR_KEYS:
    assert np.isnan(skipped[key]), key
    assert np.isfinite(logged[key]), key
  for metrics in history:  # What the guards need is there on every step.
    assert np.isfinite(metrics["loss"]) and float(metrics["nonfinite"]) == 0.0


@pytest.mark.parametrize("step, logged", [(1, False), (2, True), (9, False), (10, True)])
def test_logged_steps_are_multiples_of_log_every_and_the_last(step, logged):
  assert bool(train.is_monitored_step(step, LOG_EVERY, 10)) == logged
  assert bool(train.is_monitored_step(jnp.int32(step), LOG_EVERY, 10)) == logged


def test_a_non_finite_batch_leaves_the_state_unchanged_but_the_step():
  _, _, old, _ = setup(1)
  bad = host_batch()
  bad["view1"][3] = np.nan
  new, metrics = run_steps(1, [bad])
  assert float(metrics["nonfinite"]) == 1.0
  assert int(new.step) == int(old.step) + 1  # Batches consumed still advance.
  chex.assert_trees_all_equal(new._replace(step=old.step), old)


def test_batch_not_divisible_by_device_count_names_both_numbers():
  with pytest.raises(ValueError, match=r"batch_size=10 .*device count 4"):
    parallel.per_device_batch(10, 4)


@pytest.mark.parametrize("init", ["copy", "separate"])
def test_target_init_copy_or_separate(init):
  c = tiny_config()
  c.target.init = init
  deps = train.make_deps(c, identity_augment)
  state = train.init_state(c, deps, jax.random.PRNGKey(0), 3)
  if init == "copy":
    chex.assert_trees_all_equal(state.target_params, state.online_params)
  else:
    w = "encoder/~/initial_conv"
    assert not np.allclose(state.target_params[w]["w"], state.online_params[w]["w"])
  assert jax.tree_util.tree_structure(state.target_params) == jax.tree_util.tree_structure(state.online_params)

def test_without_predictor_the_update_traces_and_has_no_predictor_params():
  c = tiny_config(use_predictor=False)
  deps = train.make_deps(c, identity_augment)
  state = train.init_state(c, deps, jax.random.PRNGKey(0), 3)
  assert not any(m.startswith("predictor") for m in state.online_params)
  b = parallel.split_for_devices(host_batch(), 1)
  out_state, metrics = jax.eval_shape(
      jax.pmap(functools.partial(train.update, deps=deps), axis_name=parallel.DEVICE_AXIS,
               in_axes=(0, 0, None)),
      jax.tree_util.tree_map(lambda x: x[None], state), b, jax.random.PRNGKey(0))
  assert metrics["loss"].shape == (1,)


def _float32_bytes(tree):
  return sum(4 * int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def test_collectives_per_step_are_gradients_batch_norm_and_guard_losses():
  """Pins the all-reduces of the compiled update on 4 devices to what BYOL must exchange.

  Per non-logged step, bytes received per device (float32):
  - the gradient pmean: every online parameter once;
  - cross-replica batch norm: each BN layer's batch mean and mean of squares ([C] each)
    in each of the 4 forwards (online and target, both views), and again in the online
    forwards' 2 backward passes (a pmean's transpose is a pmean): 6 x 2C per layer;
  - the losses the non-finite guard reads (2 scalars);
  - less what XLA merges: a projection shortcut's BN offset gradient is the same sum as
    its block's last BN offset gradient (one cotangent reaches both through the residual
    add), so it is reduced once.
  A logged step adds the monitors: batch mean and variance [D], covariance [D, D], probe
  top-1 and online/target cosine. No other collective kind is needed. XLA may combine
  all-reduces, so the op count is bounded by the sites: 1 + 6 per BN layer + 1 (+ 4).
  """
  c, _, state, update = setup(4)
  devices = jax.local_devices()[:4]
  batch = parallel.shard(parallel.split_for_devices(host_batch(), 4), devices)
  text = update.lower(parallel.replicate(state, devices), batch, jax.random.PRNGKey(1)
                      ).compile().as_text()
  figures = bench.collective_figures(text)

  bn_layers = {m: v["average"] for m, v in state.online_state.items() if m.endswith("mean_ema")}
  batch_norm = 6 * 2 * _float32_bytes(list(bn_layers.values()))
  merged = _float32_bytes([v["offset"] for m, v in state.online_params.items()
                           if m.endswith("shortcut_batchnorm")])
  assert merged > 0  # The tiny ResNet-18 has shortcut projections in groups 1-3.
  expected = _float32_bytes(state.online_params) + batch_norm + 2 * 4 - merged
  d = c.model.projector_out
  assert figures["collective_bytes"] == expected
  assert figures["collective_bytes_logged"] == expected + 4 * (2 * d + d * d + 2)
  sites = 1 + 6 * len(bn_layers) + 1
  assert 0 < figures["collectives"]["all-reduce"] <= sites
  assert figures["collectives"]["all-reduce"] < figures["collectives_logged"]["all-reduce"] <= sites + 4
  others = [k for k in bench.COLLECTIVES if k != "all-reduce"]
  assert all(figures[path][k] == 0 for path in ("collectives", "collectives_logged") for k in others)
  # Two conditionals: the monitors (collectives in the logged branch only) and the
  # non-finite guard (none in either branch).
  conditionals = figures["conditional_collectives"]
  assert len(conditionals) == 2 and all(min(branches) == 0 for branches in conditionals)
  assert sorted(max(branches) > 0 for branches in conditionals) == [False, True]


def test_bfloat16_update_matches_float32_loss_and_keeps_float32_state():
  """One step of the tiny config under both precisions, from the same init and batch.

  Bound on the BYOL loss: bf16 keeps 8 significant bits, so each rounding of an
  activation to bf16 is off by at most u = 2^-8 relative. The deepest path of the tiny
  ResNet-18 rounds about n = 50 times in series (input cast, stem conv and norm; per block
  two convs, two norms and the residual add; projector and predictor: linear, norm,
  linear each); independent roundings add in quadrature, so the outputs p, z are off by
  delta ~ sqrt(n) u ~ 0.028 relative. Each term 2 - 2 cos(p, z) moves by at most
  2 (delta_p + delta_z) to first order, and the loss sums two terms per example:
  |loss_bf16 - loss_f32| <= 8 sqrt(n) u ~ 0.22 (measured: 0.02 on a loss of 3.55).
  """
  f32_state, f32_metrics = run_steps(1, [host_batch()])
  c = tiny_config()
  c.precision = "bfloat16"
  deps = train.make_deps(c)
  init = train.init_state(c, deps, jax.random.PRNGKey(0), channels=3)
  chex.assert_trees_all_equal(init.online_params, setup(1)[2].online_params)  # Same start.
  device = jax.local_devices()[:1]
  state, metrics = train.make_pmapped_update(deps, devices=device)(
      parallel.replicate(init, device),
      parallel.shard(parallel.split_for_devices(host_batch(), 1), device), jax.random.PRNGKey(1))
  state, metrics = parallel.unreplicate(state), parallel.unreplicate(metrics)

  assert float(metrics["nonfinite"]) == 0.0
  bound = 8 * np.sqrt(50) * 2.0**-8
  assert abs(float(metrics["loss"]) - float(f32_metrics["loss"])) <= bound
  # Params, BN statistics and optimiser state stay float32: bf16 is for compute only.
  dtypes = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).dtype, tree)
  assert dtypes(state) == dtypes(f32_state)
  floating = [x.dtype for x in jax.tree_util.tree_leaves(state)
              if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floating and set(floating) == {np.dtype(np.float32)}
