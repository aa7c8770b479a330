"""Losses and accuracy: BYOL's normalised regression loss, cross-entropy, top-k.

All functions are pure and per-batch; cross-device averaging happens in the update step.
"""
import jax
import jax.numpy as jnp

# Guards the normalisation of an all-zero vector; small enough not to change the value
# for any vector a network produces.
_NORM_EPS = 1e-12


def l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """x / ||x|| along `axis`, finite for a zero vector (returns zeros)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def regression_loss(prediction: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
  """Per-example ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z) (BYOL eq. 2).

  Args:
    prediction: [N, D] online predictions p.
    target: [N, D] target projections z' (the caller stops their gradient).

  Returns:
    [N] losses in [0, 4].
  """
  p = l2_normalize(prediction)
  z = l2_normalize(target)
  return jnp.sum(jnp.square(p - z), axis=-1)


def byol_loss(pred_1: jnp.ndarray, pred_2: jnp.ndarray,
              target_1: jnp.ndarray, target_2: jnp.ndarray) -> jnp.ndarray:
  """Symmetric BYOL loss: the two directions summed per example, then averaged.

  Direction 1 regresses the online prediction of view 1 onto the target projection of
  view 2; direction 2 swaps the views. The paper adds the two (so the loss lies in
  [0, 8]); averaging them instead halves the effective learning rate of the loss.

  Args:
    pred_1, pred_2: [N, D] online predictions of view 1 and view 2.
    target_1, target_2: [N, D] target projections of view 1 and view 2.

  Returns:
    Scalar mean over the batch of l(p1, z'2) + l(p2, z'1).
  """
  target_1 = jax.lax.stop_gradient(target_1)
  target_2 = jax.lax.stop_gradient(target_2)
  per_example = regression_loss(pred_1, target_2) + regression_loss(pred_2, target_1)
  return jnp.mean(per_example)


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                          mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Mean cross-entropy of integer labels.

  Args:
    logits: [N, K].
    labels: [N] integers in [0, K).
    mask: optional [N] weights (1 real example, 0 padding).

  Returns:
    Scalar (masked) mean of -log softmax(logits)[label].
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return _masked_mean(nll, mask)


def topk_correct(logits: jnp.ndarray, labels: jnp.ndarray, k: int = 1) -> jnp.ndarray:
  """[N] 1.0 where the label is among the k largest logits, else 0.0.

  Ties are broken towards the lower class index, as argsort does.
  """
  topk = jax.lax.top_k(logits, k)[1]
  return jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)


def topk_accuracy(logits: jnp.ndarray, labels: jnp.ndarray, k: int = 1,
                  mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Scalar fraction of examples whose label is in the top k (masked mean)."""
  return _masked_mean(topk_correct(logits, labels, k), mask)


def _masked_mean(values: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
