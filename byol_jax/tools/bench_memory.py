"""The memory benchmark: what one device holds during a BYOL update, and what fits.

`memory_benchmark` reads XLA's memory analysis of the compiled update (no allocation) to
find the largest per-device batch that fits a budget, and adds `saved_activations`: the
bytes autodiff keeps from the forward pass for the backward pass, read from the traced
program (no compile). Compiled figures are those of one backend's choices (XLA's CPU
backend computes bf16 convolutions in float32, so its bfloat16 figures say little of an
accelerator's), while the saved tensors are what the model asks of any backend: the
measure of a precision policy. The step benchmark lives in bench.py.
"""
import collections
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax.model import networks
from byol_jax import parallel
from byol_jax.training import train

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
