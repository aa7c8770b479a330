"""Benchmarks that return figures as a dict (the CLI prints it as one JSON line).

`step_benchmark` times the full pmapped BYOL update against the bare encoder doing the
unavoidable work on the same batch (online forward+backward on both views, target
forward on both views), interleaving the two in one process so the ratio is robust to
other load on the machine. `input_benchmark` lives in bench_input.py.
"""
import statistics
import time
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax import networks
from byol_jax import parallel
from byol_jax import train


def _encoder_baseline(c: ml_collections.ConfigDict) -> Callable:
  """pmapped: the encoder's share of a BYOL step and nothing else."""
  encoder = networks.make_encoder_network(c.model, axis_name=parallel.DEVICE_AXIS,
                                          precision=c.precision)

  def work(params, state, target_params, target_state, batch):
    def online_loss(p):
      y1, s = encoder.apply(p, state, None, batch["view1"], is_training=True)
      y2, s = encoder.apply(p, s, None, batch["view2"], is_training=True)
      return jnp.mean(jnp.square(y1)) + jnp.mean(jnp.square(y2)), s

    grads, _ = jax.grad(online_loss, has_aux=True)(params)
    t1, ts = encoder.apply(target_params, target_state, None, batch["view1"], is_training=True)
    t2, _ = encoder.apply(target_params, ts, None, batch["view2"], is_training=True)
    return jax.lax.pmean(grads, parallel.DEVICE_AXIS), jnp.sum(t1) + jnp.sum(t2)

  return jax.pmap(work, axis_name=parallel.DEVICE_AXIS)


def _encoder_subtree(tree: hk.Params) -> hk.Params:
  return hk.data_structures.filter(lambda module, name, value: module.startswith("encoder"), tree)


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device.
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0)) if analysis else 0.0


def _time(fn: Callable, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def step_benchmark(c: ml_collections.ConfigDict, steps: int = 5, rounds: int = 3,
                   channels: int = 3) -> dict:
  """Times the BYOL update and the bare-encoder baseline on random uint8 views.

  Args:
    c: a config; batch_size is global and must divide over the local devices.
    steps: timed calls per round and function.
    rounds: alternating rounds (full, baseline, full, ...); medians are reported.
    channels: image channels.

  Returns:
    images_per_sec, step_ms, baseline_step_ms, overhead_ratio (full / baseline),
    flops_per_image (XLA cost analysis of the full step, per example of two views),
    achieved_gflops, plus the setting (devices, batch, image size, encoder).
  """
  n_dev = jax.local_device_count()
  per_device = parallel.per_device_batch(c.batch_size, n_dev)
  deps = train.make_deps(c)
  state = train.init_state(c, deps, jax.random.PRNGKey(c.seed), channels)
  rng = np.random.default_rng(c.seed)
  shape = (n_dev, per_device, c.image_size, c.image_size, channels)
  host_batch = dict(view1=rng.integers(0, 256, shape, np.uint8),
                    view2=rng.integers(0, 256, shape, np.uint8),
                    label=rng.integers(0, c.dataset.num_classes, shape[:2]).astype(np.int32))
  batch = parallel.shard(host_batch)
  float_batch = parallel.shard({k: host_batch[k].astype(np.float32) / 255.0 for k in ("view1", "view2")})
  key = jax.random.PRNGKey(c.seed + 1)

  update = train.make_pmapped_update(deps)
  flops = _flops(update.lower(parallel.replicate(state), batch, key).compile())
  baseline = _encoder_baseline(c)
  base_args = parallel.replicate((_encoder_subtree(state.online_params), state.online_state,
                                  _encoder_subtree(state.target_params), state.target_state))
  holder = {"state": parallel.replicate(state)}

  def full():
    holder["state"], metrics = update(holder["state"], batch, key)
    return metrics

  run_baseline = lambda: baseline(*base_args, float_batch)
  full(), run_baseline()  # Compile and warm up both.
  full_times, base_times = [], []
  for _ in range(rounds):
    full_times += _time(full, steps)
    base_times += _time(run_baseline, steps)
  step_s, base_s = statistics.median(full_times), statistics.median(base_times)
  return dict(
      benchmark="step", devices=n_dev, platform=jax.devices()[0].platform,
      batch_size=c.batch_size, image_size=c.image_size, encoder=c.model.encoder,
      width=c.model.width, precision=c.precision,
      images_per_sec=round(c.batch_size / step_s, 2),
      step_ms=round(1e3 * step_s, 2), baseline_step_ms=round(1e3 * base_s, 2),
      overhead_ratio=round(step_s / base_s, 4),
      flops_per_image=round(flops / per_device),
      achieved_gflops=round(flops * n_dev / step_s / 1e9, 2))
