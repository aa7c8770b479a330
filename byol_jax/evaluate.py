"""Evaluation on frozen networks: the online probe's accuracy on a held-out split.

The pmapped evaluation step is a pure function of (params, state, batch); the host
function drives it over one pass of an eval iterator and sums exact counts (padding
examples carry mask 0).
"""
import functools
from typing import Any, Iterable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import augment
from byol_jax import losses
from byol_jax import parallel


def probe_eval_step(params: hk.Params, state: hk.State, batch: dict, *,
                    forward: hk.TransformedWithState) -> dict:
  """Counts of correct top-1/top-5 probe predictions, summed over all devices.

  Args:
    params, state: this device's replica of the online network.
    batch: image [b, H, W, C], label [b], mask [b] (1 real, 0 padding).
    forward: the BYOL network (is_training=False: batch norm uses moving statistics).

  Returns:
    dict(top1=, top5=, count=) as float32 sums over the global batch.
  """
  outputs, _ = forward.apply(params, state, None, augment.to_unit_range(batch["image"]),
                                is_training=False)
  mask = batch["mask"].astype(jnp.float32)
  k5 = min(5, outputs["logits"].shape[-1])
  counts = dict(top1=jnp.sum(losses.topk_correct(outputs["logits"], batch["label"], 1) * mask),
                top5=jnp.sum(losses.topk_correct(outputs["logits"], batch["label"], k5) * mask),
                count=jnp.sum(mask))
  return jax.lax.psum(counts, parallel.DEVICE_AXIS)


def make_pmapped_probe_eval(forward: hk.TransformedWithState):
  """`probe_eval_step` bound to `forward`, pmapped over the local devices."""
  return jax.pmap(functools.partial(probe_eval_step, forward=forward),
                  axis_name=parallel.DEVICE_AXIS)


def probe_accuracy(eval_fn, params: hk.Params, state: hk.State,
                   batches: Iterable[Any]) -> dict:
  """Top-1/top-5 of the online probe over one pass of `batches` (device-sharded).

  Args:
    eval_fn: from `make_pmapped_probe_eval`.
    params, state: replicated online params and batch-norm state.
    batches: an iterator of sharded eval batches (image, label, mask).

  Returns:
    dict(eval_top1=, eval_top5=, eval_examples=) as Python floats/ints.
  """
  totals = None
  for batch in batches:
    counts = eval_fn(params, state, batch)
    totals = counts if totals is None else jax.tree_util.tree_map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError("the evaluation split yielded no batches; check dataset.eval_split.")
  totals = jax.tree_util.tree_map(lambda x: float(np.asarray(x)[0]), jax.device_get(totals))
  n = max(totals["count"], 1.0)
  return dict(eval_top1=totals["top1"] / n, eval_top5=totals["top5"] / n,
              eval_examples=int(totals["count"]))
