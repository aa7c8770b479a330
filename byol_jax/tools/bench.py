"""The step benchmark: the BYOL update's time against the bare encoder's, and its collectives.

`step_benchmark` times the full pmapped BYOL update against the bare encoder doing the
unavoidable work on the same batch (online forward+backward on both views, target
forward on both views) and against two parts of the rest timed alone (optimiser + EMA,
augmentation), interleaving them in one process so the ratios are robust to other load
on the machine, and counts the collectives of the compiled update. It returns its figures
as a dict (the CLI prints it as one JSON line). `memory_benchmark` lives in
bench_memory.py, `input_benchmark` in bench_input.py.
"""
import collections
import functools
import re
import statistics
import time
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax.model import networks
from byol_jax import parallel
from byol_jax.training import train


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


# ------------------------------------------------------------------ collectives

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
                          r"(?P<op>[a-z][\w\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_CALLEES = re.compile(r"\b(?:to_apply|calls|body|condition)=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations=\{(?P<list>[^}]*)\}|"
                       r"true_computation=%?(?P<true>[\w.\-]+), false_computation=%?(?P<false>[\w.\-]+))")


def _array_bytes(shape: str) -> list[int]:
  return [int(np.prod([int(d) for d in m["dims"].split(",") if d] or [1])) *
          _DTYPE_BYTES.get(m["dtype"], 4) for m in _ARRAY.finditer(shape)]


class _Path(NamedTuple):
  ops: collections.Counter  # Collective kind -> ops.
  bytes: int  # Bytes of their results (what each device receives).

  def __add__(self, other):
    return _Path(self.ops + other.ops, self.bytes + other.bytes)


def collective_figures(hlo_text: str) -> dict:
  """Collective ops of a compiled program and the bytes they move, per call.

  A collective inside a conditional runs only when its branch is taken, so the figures
  come in two paths: the fewest (every conditional takes its cheapest branch: BYOL's
  non-logged step) and the most (the dearest branch: the logged step). Loops count once.

  Args:
    hlo_text: `compiled.as_text()` of the optimised program (a pmapped update: one
      device's program).

  Returns:
    collectives / collective_bytes (fewest path), collectives_logged /
    collective_bytes_logged (most path), both as {kind: ops} over COLLECTIVES, and
    conditional_collectives: for each conditional, the collectives of each branch.
  """
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header["name"], [])
      entry = header["name"] if line.startswith("ENTRY") else entry
    elif current is not None and _INSTRUCTION.match(line):
      current.append(line)
  memo, conditionals = {}, []
  empty = _Path(collections.Counter(), 0)

  def paths(name):  # -> (fewest, most)
    if name not in memo:
      memo[name] = (empty, empty)  # Guards against cycles.
      fewest = most = empty
      for line in computations.get(name, ()):
        match = _INSTRUCTION.match(line)
        op = match["op"].removesuffix("-start")
        if op in COLLECTIVES:
          sizes = _array_bytes(match["shape"])
          # Async starts of gathers and permutes return (operand, result): the result.
          moved = sizes[-1] if match["op"].endswith("-start") and op != "all-reduce" else sum(sizes)
          one = _Path(collections.Counter({op: 1}), moved)
          fewest, most = fewest + one, most + one
          continue
        for callee in _CALLEES.finditer(line):
          low, high = paths(callee["name"])
          fewest, most = fewest + low, most + high
        branch = _BRANCHES.search(line)
        if op == "conditional" and branch:
          names = ([n.strip().lstrip("%") for n in branch["list"].split(",")] if branch["list"]
                   else [branch["true"], branch["false"]])
          options = [paths(n) for n in names]
          conditionals.append([sum(high.ops.values()) for _, high in options])
          fewest += min((low for low, _ in options), key=lambda p: (p.bytes, sum(p.ops.values())))
          most += max((high for _, high in options), key=lambda p: (p.bytes, sum(p.ops.values())))
      memo[name] = (fewest, most)
    return memo[name]

  fewest, most = paths(entry) if entry else (empty, empty)
  counts = lambda p: {kind: p.ops.get(kind, 0) for kind in COLLECTIVES}
  return dict(collectives=counts(fewest), collective_bytes=fewest.bytes,
              collectives_logged=counts(most), collective_bytes_logged=most.bytes,
              conditional_collectives=conditionals)


def _step_parts(deps: train.Deps, state: train.TrainState, batch: dict, key: jax.Array
                ) -> dict[str, Callable]:
  """Two parts of the update that the bare encoder does not do, each alone.

  optimizer_ema: the optimiser step and the target's EMA (`train._apply_gradients`), on
  gradients of the parameters' shapes; augment: both views' on-device augmentation with
  their per-example keys (`train.augment_views`). What the update spends beyond these and
  the encoder is the heads, the loss, the probe, the guards and the monitors' cond.
  """
  apply = jax.pmap(functools.partial(train._apply_gradients, deps=deps),  # pylint: disable=protected-access
                   axis_name=parallel.DEVICE_AXIS, in_axes=(0, 0, 0, 0, None),
                   donate_argnums=(0,))
  grads = parallel.replicate(jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.online_params))
  norm_states = parallel.replicate((state.online_state, state.target_state))
  holder = {"state": parallel.replicate(state)}
  tau = deps.tau_schedule(0)

  def optimizer_ema():
    holder["state"] = apply(holder["state"], grads, *norm_states, tau)
    return holder["state"].step

  augment = jax.pmap(lambda b, k: train.augment_views(b, k, jnp.zeros((), jnp.int32), deps),
                     axis_name=parallel.DEVICE_AXIS, in_axes=(0, None))
  return dict(optimizer_ema=optimizer_ema, augment=lambda: augment(batch, key))


def _time(fn: Callable, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _synthetic_batches(c: ml_collections.ConfigDict, n_dev: int, per_device: int,
                       channels: int) -> tuple[dict, dict]:
  """A device-sharded batch of random uint8 views and labels, and the same views as
  float32 in [0, 1] (what the bare encoder takes)."""
  rng = np.random.default_rng(c.seed)
  shape = (n_dev, per_device, c.image_size, c.image_size, channels)
  host_batch = dict(view1=rng.integers(0, 256, shape, np.uint8),
                    view2=rng.integers(0, 256, shape, np.uint8),
                    label=rng.integers(0, c.dataset.num_classes, shape[:2]).astype(np.int32))
  batch = parallel.shard(host_batch)
  float_batch = parallel.shard({k: host_batch[k].astype(np.float32) / 255.0
                                for k in ("view1", "view2")})
  return batch, float_batch


def _update_and_encoder(c: ml_collections.ConfigDict, state: train.TrainState, compiled,
                        batch: dict, float_batch: dict, key: jax.Array) -> dict[str, Callable]:
  """full: one call of the compiled update, its state carried from call to call; encoder:
  the bare-encoder baseline (`_encoder_baseline`) on the same views."""
  baseline = _encoder_baseline(c)
  base_args = parallel.replicate((_encoder_subtree(state.online_params), state.online_state,
                                  _encoder_subtree(state.target_params), state.target_state))
  holder = {"state": parallel.replicate(state)}

  def full():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return metrics

  return dict(full=full, encoder=lambda: baseline(*base_args, float_batch))


def _median_ms(parts: dict[str, Callable], steps: int, rounds: int) -> dict[str, float]:
  """Each part's median milliseconds per call: all compiled and warmed up first, then
  `rounds` alternating rounds of `steps` calls of each."""
  for run in parts.values():  # Compile and warm up every part.
    jax.block_until_ready(run())
  times = {name: [] for name in parts}
  for _ in range(rounds):
    for name, run in parts.items():
      times[name] += _time(run, steps)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _step_figures(c: ml_collections.ConfigDict, ms: dict[str, float], flops: float,
                  n_dev: int, per_device: int) -> dict:
  """The setting, and the timings of `_median_ms` as throughput, ratios and shares."""
  step_s = ms["full"] / 1e3
  return dict(
      benchmark="step", devices=n_dev, platform=jax.devices()[0].platform,
      batch_size=c.batch_size, image_size=c.image_size, encoder=c.model.encoder,
      width=c.model.width, precision=c.precision,
      images_per_sec=round(c.batch_size / step_s, 2),
      step_ms=round(ms["full"], 2), baseline_step_ms=round(ms["encoder"], 2),
      overhead_ratio=round(ms["full"] / ms["encoder"], 4),
      non_encoder_share=round(1.0 - ms["encoder"] / ms["full"], 4),
      optimizer_ema_ms=round(ms["optimizer_ema"], 2), augment_ms=round(ms["augment"], 2),
      heads_loss_rest_ms=round(ms["full"] - ms["encoder"] - ms["optimizer_ema"]
                               - ms["augment"], 2),
      flops_per_image=round(flops / per_device),
      achieved_gflops=round(flops * n_dev / step_s / 1e9, 2))


def step_benchmark(c: ml_collections.ConfigDict, steps: int = 5, rounds: int = 3,
                   channels: int = 3) -> dict:
  """Times the BYOL update and the bare-encoder baseline on random uint8 views.

  Args:
    c: a config; batch_size is global and must divide over the local devices.
    steps: timed calls per round and function.
    rounds: alternating rounds (full, baseline, optimiser+EMA, augmentation, full, ...);
      medians are reported.
    channels: image channels.

  Returns:
    images_per_sec, step_ms, baseline_step_ms, overhead_ratio (full / baseline),
    non_encoder_share (1 - baseline / full), the parts of the difference timed alone
    (`_step_parts`: optimizer_ema_ms, augment_ms; heads_loss_rest_ms is what remains),
    flops_per_image (XLA cost analysis of the full step, per example of two views),
    achieved_gflops, the collectives of the compiled update per step and device on a
    non-logged and a logged step (`collective_figures`), plus the setting (devices,
    batch, image size, encoder).
  """
  n_dev = jax.local_device_count()
  per_device = parallel.per_device_batch(c.batch_size, n_dev)
  deps = train.make_deps(c)
  state = train.init_state(c, deps, jax.random.PRNGKey(c.seed), channels)
  batch, float_batch = _synthetic_batches(c, n_dev, per_device, channels)
  key = jax.random.PRNGKey(c.seed + 1)
  update = train.make_pmapped_update(deps)
  compiled = update.lower(parallel.replicate(state), batch, key).compile()
  parts = dict(**_update_and_encoder(c, state, compiled, batch, float_batch, key),
               **_step_parts(deps, state, batch, key))
  ms = _median_ms(parts, steps, rounds)
  return dict(_step_figures(c, ms, _flops(compiled), n_dev, per_device),
              **collective_figures(compiled.as_text()))
