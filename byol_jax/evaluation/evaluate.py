"""Evaluation on frozen networks: probe accuracy, feature extraction, the kNN monitor.

The pmapped steps are pure functions of (params, state, batch); host functions drive
them over one pass of an eval iterator (padding examples carry mask 0 and are dropped
or not counted). The kNN monitor scores a representation without any training: cosine
similarity to a bank of training features, temperature-weighted votes of the top k.
"""
import functools
from typing import Any, Iterable

import haiku as hk
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax.training import augment
from byol_jax.data import pipelines
from byol_jax.training import losses
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


# ------------------------------------------------------------------ frozen features


def feature_step(params: hk.Params, state: hk.State, images: jnp.ndarray, *,
                 forward: hk.TransformedWithState, output_key: str | None) -> jnp.ndarray:
  """Representations of one device's batch from a frozen network.

  Args:
    params, state: this device's replica (batch norm uses its moving statistics).
    images: [b, H, W, C] uint8 (0-255) or float in [0, 1].
    forward: an encoder network (returns an array) or the BYOL network (returns a dict).
    output_key: the dict entry to take ('representation'), or None for an array output.

  Returns:
    [b, D] float32.
  """
  outputs, _ = forward.apply(params, state, None, augment.to_unit_range(images),
                             is_training=False)
  return outputs if output_key is None else outputs[output_key]


def make_pmapped_features(forward: hk.TransformedWithState, output_key: str | None = None):
  """`feature_step` bound to `forward`, pmapped over the local devices.

  Use `networks.make_encoder_network(model)` with output_key=None for an encoder alone,
  or the BYOL network (train.Deps.forward) with output_key='representation' for the
  online encoder inside a TrainState.
  """
  return jax.pmap(functools.partial(feature_step, forward=forward, output_key=output_key),
                  axis_name=parallel.DEVICE_AXIS)


def _gather_processes(x: np.ndarray) -> np.ndarray:
  """Every process's [n, ...] block (all the same shape), concatenated in process order."""
  if jax.process_count() == 1:
    return x
  gathered = multihost_utils.process_allgather(x, tiled=False)
  return np.asarray(gathered).reshape((-1,) + x.shape[1:])


def extract_features(feature_fn, params: hk.Params, state: hk.State,
                     batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
  """Frozen features of one pass over an eval iterator, padding removed, in dataset order.

  Args:
    feature_fn: from `make_pmapped_features`.
    params, state: replicated over the local devices.
    batches: dicts with image [L, b, H, W, C], label [L, b], mask [L, b] (1 real,
      0 padding), e.g. `pipelines.eval_dataset` (optionally through `pipelines.device_prefetch`).

  Returns:
    features [N, D] float32 and labels [N] int32 as host NumPy arrays; N counts the real
    examples of all processes (each process gets the whole set).
  """
  feats, labels, masks = [], [], []
  pending = None
  for batch in batches:
    out = feature_fn(params, state, batch["image"])  # Dispatched; runs while we copy.
    if pending is not None:
      feats.append(np.asarray(jax.device_get(pending)))
    pending = out
    labels.append(np.asarray(batch["label"]))
    masks.append(np.asarray(batch["mask"]))
  if pending is None:
    raise ValueError("the split yielded no batches; check the split name and data set.")
  feats.append(np.asarray(jax.device_get(pending)))
  flat = lambda arrays: np.concatenate([a.reshape((-1,) + a.shape[2:]) for a in arrays])
  feats, labels, masks = (_gather_processes(flat(x)) for x in (feats, labels, masks))
  keep = masks.astype(bool)
  return feats[keep].astype(np.float32), labels[keep].astype(np.int32)


def split_features(c: ml_collections.ConfigDict, feature_fn, params: hk.Params,
                   state: hk.State, split: str,
                   batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`extract_features` over one split of c.dataset with eval preprocessing (centre crop).

  Args:
    c: the config (dataset.*, image_size).
    feature_fn, params, state: as `extract_features`.
    split: a tfds split string or a sources.py alias ('train_minus_val', 'val_from_train').
    batch_size: global batch size of the pass (default c.batch_size).

  Returns:
    features [N, D], labels [N] (host NumPy, dataset order).
  """
  batches = pipelines.eval_dataset(c, split, process_index=jax.process_index(),
                              process_count=jax.process_count(),
                              local_device_count=jax.local_device_count(),
                              batch_size=batch_size)
  return extract_features(feature_fn, params, state, pipelines.device_prefetch(batches))


# ------------------------------------------------------------------------------ kNN

# Largest query x bank similarity block kNN builds at once (float32: 64 MiB).
KNN_MAX_MATRIX_ELEMENTS = 1 << 24


def l2_normalize_np(x: np.ndarray) -> np.ndarray:
  """Rows of x [N, D] divided by their L2 norm (zero rows stay zero), float32."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_chunks(num_queries: int, num_bank: int, k: int,
               max_elements: int = KNN_MAX_MATRIX_ELEMENTS) -> tuple[int, int]:
  """(query chunk, bank chunk) sizes whose product stays within `max_elements`.

  The bank chunk is at least k (top-k merges need k candidates) and at most the bank.
  """
  bank = max(k, min(num_bank, max_elements // max(1, min(num_queries, 1024))))
  queries = max(1, min(num_queries, max_elements // bank))
  return queries, bank


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_top_k(best_sims, best_labels, queries, bank, bank_labels, bank_valid, *, k):
  """Top-k of (the running best) and (the similarities to one bank chunk)."""
  sims = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
  sims = jnp.concatenate([best_sims, sims], axis=1)
  labels = jnp.concatenate(
      [best_labels, jnp.broadcast_to(bank_labels[None, :], (queries.shape[0],) +
                                     bank_labels.shape)], axis=1)
  top, index = jax.lax.top_k(sims, k)
  return top, jnp.take_along_axis(labels, index, axis=1)


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  extra = -x.shape[0] % multiple
  return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)]) if extra else x


def knn_predict(train_feats: np.ndarray, train_labels: np.ndarray, query_feats: np.ndarray,
                k: int, temperature: float, num_classes: int,
                max_elements: int = KNN_MAX_MATRIX_ELEMENTS) -> np.ndarray:
  """Weighted kNN class scores (InstDisc / DINO monitor) on cosine similarity.

  Each query's k most similar training examples (cosine similarity of L2-normalised
  features) vote for their label with weight exp(similarity / temperature). Computed in
  chunks: no similarity block exceeds `max_elements` entries (see `knn_chunks`).

  Args:
    train_feats: [N, D] bank features. train_labels: [N] ints in [0, num_classes).
    query_feats: [Q, D]. k: neighbours (capped at N). temperature: > 0.
    num_classes: C. max_elements: bound on one query x bank block.

  Returns:
    [Q, C] float32 summed vote weights; argmax is the prediction.
  """
  train_feats, query_feats = np.asarray(train_feats), np.asarray(query_feats)
  if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
    raise ValueError(f"features must be [N, D] and [Q, D] with the same D; got "
                     f"{train_feats.shape} and {query_feats.shape}.")
  if len(train_labels) != len(train_feats) or len(train_feats) == 0:
    raise ValueError(f"{len(train_labels)} labels for {len(train_feats)} bank features; "
                     "need one label per (at least one) bank example.")
  if k < 1 or temperature <= 0:
    raise ValueError(f"knn k={k} must be >= 1 and temperature={temperature} > 0.")
  k = min(k, len(train_feats))
  num_q = len(query_feats)
  q_chunk, b_chunk = knn_chunks(num_q, len(train_feats), k, max_elements)
  bank = _pad_rows(l2_normalize_np(train_feats), b_chunk)
  bank_labels = _pad_rows(np.asarray(train_labels, np.int32), b_chunk)
  valid = _pad_rows(np.ones(len(train_feats), bool), b_chunk)
  queries = _pad_rows(l2_normalize_np(query_feats), q_chunk)
  scores = []
  for q0 in range(0, len(queries), q_chunk):
    best = (jnp.full((q_chunk, k), -jnp.inf), jnp.zeros((q_chunk, k), jnp.int32))
    for b0 in range(0, len(bank), b_chunk):
      best = _merge_top_k(*best, queries[q0:q0 + q_chunk], bank[b0:b0 + b_chunk],
                          bank_labels[b0:b0 + b_chunk], valid[b0:b0 + b_chunk], k=k)
    sims, labels = (np.asarray(x) for x in best)
    weights = np.exp(sims.astype(np.float64) / temperature)
    votes = np.zeros((q_chunk, num_classes))
    np.add.at(votes, (np.arange(q_chunk)[:, None], labels), weights)
    scores.append(votes.astype(np.float32))
  return np.concatenate(scores)[:num_q]


def knn_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, query_feats: np.ndarray,
                 query_labels: np.ndarray, k: int, temperature: float, num_classes: int,
                 max_elements: int = KNN_MAX_MATRIX_ELEMENTS) -> dict:
  """Top-1/top-5 accuracy of `knn_predict` on labelled queries.

  Returns:
    dict(knn_top1=, knn_top5=) as Python floats (top-5 is top-C when C < 5).
  """
  scores = knn_predict(train_feats, train_labels, query_feats, k, temperature, num_classes,
                       max_elements)
  labels = np.asarray(query_labels)
  # Stable descending order: ties go to the lower class index, as losses.topk_correct.
  order = np.argsort(-scores, axis=1, kind="stable")
  hit = order[:, :min(5, num_classes)] == labels[:, None]
  return dict(knn_top1=float(np.mean(hit[:, 0])), knn_top5=float(np.mean(hit.any(axis=1))))


def knn_train_split(c: ml_collections.ConfigDict) -> str:
  """The kNN bank split: dataset.train_split, its first knn.train_examples when set."""
  n = int(c.knn.train_examples)
  if n < 0:
    raise ValueError(f"config.knn.train_examples={n} must be >= 0 (0: all of train).")
  return f"{c.dataset.train_split}[:{n}]" if n else c.dataset.train_split


def knn_monitor(c: ml_collections.ConfigDict, feature_fn, params: hk.Params, state: hk.State,
                batch_size: int | None = None) -> dict:
  """kNN accuracy of a frozen encoder: bank = train (knn.train_examples), queries = eval split.

  Cheap enough to run during pretraining (two forward passes, no training).

  Args:
    c: the config (dataset.*, knn.k, knn.temperature, knn.train_examples).
    feature_fn: from `make_pmapped_features` (e.g. the BYOL network with
      output_key='representation' on the online params).
    params, state: replicated over the local devices.
    batch_size: global batch of the forward passes (default c.batch_size).

  Returns:
    dict(knn_top1=, knn_top5=, knn_train_examples=, knn_eval_examples=).
  """
  bank, bank_labels = split_features(c, feature_fn, params, state, knn_train_split(c),
                                     batch_size)
  query, query_labels = split_features(c, feature_fn, params, state, c.dataset.eval_split,
                                       batch_size)
  result = knn_accuracy(bank, bank_labels, query, query_labels, c.knn.k, c.knn.temperature,
                        c.dataset.num_classes)
  return dict(result, knn_train_examples=len(bank), knn_eval_examples=len(query))
