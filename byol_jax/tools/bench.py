"""Benchmarks that return figures as a dict (the CLI prints it as one JSON line).

`step_benchmark` times the full pmapped BYOL update against the bare encoder doing the
unavoidable work on the same batch (online forward+backward on both views, target
forward on both views) and against two parts of the rest timed alone (optimiser + EMA,
augmentation), interleaving them in one process so the ratios are robust to other load
on the machine, and counts the collectives of the compiled update. `memory_benchmark`
reads XLA's memory analysis of the compiled update (no allocation) to find the largest
per-device batch that fits a budget, and adds `saved_activations`: the bytes autodiff keeps from the forward pass for
the backward pass, read from the traced program (no compile). Compiled figures are those
of one backend's choices (XLA's CPU backend computes bf16 convolutions in float32, so its
bfloat16 figures say little of an accelerator's), while the saved tensors are what the
model asks of any backend: the measure of a precision policy. `input_benchmark` lives in
bench_input.py.
"""
import collections
import functools
import os
import re
import statistics
import time
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.extend as jex
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
  rng = np.random.default_rng(c.seed)
  shape = (n_dev, per_device, c.image_size, c.image_size, channels)
  host_batch = dict(view1=rng.integers(0, 256, shape, np.uint8),
                    view2=rng.integers(0, 256, shape, np.uint8),
                    label=rng.integers(0, c.dataset.num_classes, shape[:2]).astype(np.int32))
  batch = parallel.shard(host_batch)
  float_batch = parallel.shard({k: host_batch[k].astype(np.float32) / 255.0 for k in ("view1", "view2")})
  key = jax.random.PRNGKey(c.seed + 1)

  update = train.make_pmapped_update(deps)
  compiled = update.lower(parallel.replicate(state), batch, key).compile()
  flops = _flops(compiled)
  baseline = _encoder_baseline(c)
  base_args = parallel.replicate((_encoder_subtree(state.online_params), state.online_state,
                                  _encoder_subtree(state.target_params), state.target_state))
  holder = {"state": parallel.replicate(state)}

  def full():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    return metrics

  parts = dict(full=full, encoder=lambda: baseline(*base_args, float_batch),
               **_step_parts(deps, state, batch, key))
  for run in parts.values():  # Compile and warm up every part.
    jax.block_until_ready(run())
  times = {name: [] for name in parts}
  for _ in range(rounds):
    for name, run in parts.items():
      times[name] += _time(run, steps)
  ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
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
      achieved_gflops=round(flops * n_dev / step_s / 1e9, 2),
      **collective_figures(compiled.as_text()))


# ------------------------------------------------------------------------ memory

_GIB = 1024**3


def available_host_memory_bytes() -> int:
  """MemAvailable from /proc/meminfo (Linux), else free physical pages x page size."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class UpdateMemory:
  """XLA's memory analysis of the compiled pmapped update, per device, by per-device batch.

  Nothing is allocated: the state's shapes come from `jax.eval_shape` and the update is
  lowered on shapes. Results (and the compiled updates) are cached per batch size.

  Attributes:
    prefetch: batches the input pipeline keeps on each device besides the one in use
      (data.device_prefetch's default).
  """

  def __init__(self, c: ml_collections.ConfigDict, channels: int, prefetch: int = 2):
    self.c, self.channels, self.prefetch = c, channels, prefetch
    self.devices = jax.local_device_count()
    self.deps = train.make_deps(c)
    shapes = jax.eval_shape(
        lambda key: train.init_state(c, self.deps, key, channels), jax.random.PRNGKey(0))
    self.state_shapes = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((self.devices,) + x.shape, x.dtype), shapes)
    self.update = train.make_pmapped_update(self.deps)
    self.compiled: dict[int, Any] = {}
    self._figures: dict[int, dict] = {}

  def batch_shapes(self, per_device: int) -> dict:
    """ShapeDtypeStructs of one device-sharded batch: the data pipeline's uint8 views."""
    s, n = self.c.image_size, self.devices
    view = jax.ShapeDtypeStruct((n, per_device, s, s, self.channels), jnp.uint8)
    return dict(view1=view, view2=view,
                label=jax.ShapeDtypeStruct((n, per_device), jnp.int32))

  def __call__(self, per_device: int) -> dict:
    """Per-device bytes of the update at `per_device` examples per device.

    Returns:
      argument_bytes, output_bytes, alias_bytes (outputs written into donated inputs),
      temp_bytes, batch_bytes (one batch), and total_bytes = argument + output - alias +
      temp + prefetch x batch: what one device holds during a step.
    """
    if per_device < 1:
      raise ValueError(f"per-device batch must be >= 1, got {per_device}.")
    if per_device not in self._figures:
      key = jax.ShapeDtypeStruct((2,), jnp.uint32)
      compiled = self.update.lower(self.state_shapes, self.batch_shapes(per_device), key).compile()
      stats = compiled.memory_analysis()
      batch_bytes = sum(np.prod(x.shape[1:]) * np.dtype(x.dtype).itemsize
                        for x in self.batch_shapes(per_device).values())
      figures = dict(argument_bytes=int(stats.argument_size_in_bytes),
                     output_bytes=int(stats.output_size_in_bytes),
                     alias_bytes=int(stats.alias_size_in_bytes),
                     temp_bytes=int(stats.temp_size_in_bytes), batch_bytes=int(batch_bytes))
      figures["total_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] -
                                figures["alias_bytes"] + figures["temp_bytes"] +
                                self.prefetch * figures["batch_bytes"])
      self.compiled[per_device], self._figures[per_device] = compiled, figures
    return self._figures[per_device]


def largest_fitting_batch(total_bytes: Callable[[int], int], budget_bytes: int, start: int = 1,
                          max_evaluations: int = 16, resolution: int | None = None) -> dict:
  """The largest per-device batch b with total_bytes(b) <= budget_bytes.

  Doubles from the largest power of two <= `start` (or halves) until the budget is
  crossed, then bisects between the last fit and the first miss until they are within
  `resolution` (default: an eighth of the fit) or `max_evaluations` run out. Assumes
  total_bytes grows with b.

  Returns:
    largest (0 when even 1 does not fit), smallest_failing (None when never crossed
    within the evaluations), evaluations (calls of total_bytes).
  """
  cache: dict[int, bool] = {}

  def fits(b):
    if b not in cache:
      cache[b] = total_bytes(b) <= budget_bytes
    return cache[b]

  b = 1 << (max(1, start).bit_length() - 1)
  lo, hi = 0, None
  if fits(b):
    lo = b
    while hi is None and len(cache) < max_evaluations:
      b *= 2
      lo, hi = (b, None) if fits(b) else (lo, b)
  else:
    hi = b
    while b > 1 and lo == 0:
      b //= 2
      lo, hi = (b, hi) if fits(b) else (0, b)
  while hi is not None and hi - lo > max(1, resolution or lo // 8) and len(cache) < max_evaluations:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return dict(largest=lo, smallest_failing=hi, evaluations=len(cache))


# ------------------------------------------------------------- saved activations


class SavedTensor(NamedTuple):
  """One array autodiff keeps from the forward pass for the backward pass (a residual)."""
  shape: tuple[int, ...]
  dtype: np.dtype
  activation: bool  # Its size grows with the batch; else weights as used, statistics.

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def saved_tensors(c: ml_collections.ConfigDict, per_device: int,
                  channels: int) -> list[SavedTensor]:
  """The residuals of BYOL's loss: what one device keeps between forward and backward.

  The loss is train.loss_fn on both views (online and target forwards), differentiated
  w.r.t. the online params as the update does; the residuals are the leaves of the
  function `jax.vjp` returns, traced on shapes (nothing is allocated or compiled). Arrays
  the loss was given (views, params, states) and constants are not counted: they are
  held whether or not a backward pass follows. Batch norm is traced without the device
  axis: the cross-replica means add per-channel statistics only.

  An activation is a residual whose size grows with the batch: the loss is traced at
  `per_device` and `per_device + 1` examples and the two lists compared, so no weight is
  mistaken for one because a dimension happens to equal the batch.
  """
  net = networks.make_byol_network(c.model, c.dataset.num_classes, axis_name=None,
                                   precision=c.precision)
  image = lambda b: jax.ShapeDtypeStruct((b, c.image_size, c.image_size, channels), jnp.float32)
  params, state = jax.eval_shape(lambda key, x: net.init(key, x, is_training=True),
                                 jax.ShapeDtypeStruct((2,), jnp.uint32), image(per_device))

  def backward(online_params, target_params, online_state, target_state, view1, view2, labels):
    loss = lambda p: train.loss_fn(p, target_params, online_state, target_state, view1,
                                   view2, labels, forward=net)
    return jax.vjp(loss, online_params, has_aux=True)[1]

  def residuals(b):
    labels = jax.ShapeDtypeStruct((b,), jnp.int32)
    jaxpr = jax.make_jaxpr(backward)(params, params, state, state, image(b), image(b),
                                     labels).jaxpr
    given, seen, avals = set(jaxpr.invars) | set(jaxpr.constvars), set(), []
    for v in jaxpr.outvars:  # The backward function's leaves: the residuals.
      if isinstance(v, jex.core.Literal) or v in given or v in seen:
        continue
      seen.add(v)
      avals.append(v.aval)
    return avals

  at, above = residuals(per_device), residuals(per_device + 1)
  if [a.dtype for a in at] != [a.dtype for a in above]:
    raise RuntimeError("the loss saves different residuals at batch sizes "
                       f"{per_device} and {per_device + 1}; cannot tell activations apart.")
  return [SavedTensor(tuple(a.shape), np.dtype(a.dtype), a.shape != b.shape)
          for a, b in zip(at, above)]


def saved_activations(c: ml_collections.ConfigDict, per_device: int, channels: int) -> dict:
  """Per-device bytes autodiff keeps for the update's backward pass (`saved_tensors`).

  Backend-independent, unlike XLA's compiled figures: a precision policy is judged by
  these (bfloat16 compute should save bf16 activations, half float32's bytes).

  Returns:
    saved_activation_bytes (residuals that grow with the batch), the same by dtype as
    saved_activation_bytes_<dtype> (float32 and bfloat16 always, other dtypes present:
    bool masks of the ReLUs, ...), and saved_non_activation_bytes (the weights as the
    forward used them, e.g. their bf16 casts, and per-channel statistics).
  """
  tensors = saved_tensors(c, per_device, channels)
  by_dtype = collections.Counter({"float32": 0, "bfloat16": 0})
  for t in tensors:
    if t.activation:
      by_dtype[t.dtype.name] += t.nbytes
  return dict(saved_activation_bytes=sum(by_dtype.values()),
              **{f"saved_activation_bytes_{k}": v for k, v in sorted(by_dtype.items())},
              saved_non_activation_bytes=sum(t.nbytes for t in tensors if not t.activation))


def memory_benchmark(c: ml_collections.ConfigDict, budget_gb: float | None = None,
                     channels: int = 3, max_compiles: int = 16) -> dict:
  """Per-device memory of the update at the configured batch, and the largest that fits.

  Args:
    c: a config; batch_size is global over this process's devices.
    budget_gb: per-device budget in GiB; default this host's available memory divided by
      its local devices (right for CPU, where devices share host memory).
    channels: image channels.
    max_compiles: cap on the update compiles of the search.

  Returns:
    One dict of figures: the configured batch's bytes (see UpdateMemory), the budget,
    largest_per_device_batch, smallest_failing_per_device_batch and compiles used, and
    the configured batch's saved activations (`saved_activations`; their total in GiB
    as saved_activation_gb).
  """
  n_dev = jax.local_device_count()
  per_device = parallel.per_device_batch(c.batch_size, n_dev)
  budget = int((budget_gb * _GIB) if budget_gb else available_host_memory_bytes() // n_dev)
  analyse = UpdateMemory(c, channels)
  configured = analyse(per_device)
  search = largest_fitting_batch(lambda b: analyse(b)["total_bytes"], budget, per_device,
                                 max_compiles)
  saved = saved_activations(c, per_device, channels)
  return dict(
      benchmark="memory", devices=n_dev, platform=jax.devices()[0].platform,
      image_size=c.image_size, encoder=c.model.encoder, width=c.model.width,
      precision=c.precision, per_device_batch=per_device,
      **{k: configured[k] for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                    "temp_bytes", "batch_bytes", "total_bytes")},
      total_gb=round(configured["total_bytes"] / _GIB, 4),
      budget_gb=round(budget / _GIB, 3),
      largest_per_device_batch=search["largest"],
      smallest_failing_per_device_batch=search["smallest_failing"],
      compiles=len(analyse.compiled),
      **saved, saved_activation_gb=round(saved["saved_activation_bytes"] / _GIB, 4))
