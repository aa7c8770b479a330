"""Health monitors of the projections: collapse, effective rank, online/target agreement.

Computed inside the update step, on the steps the loop logs only (train.is_monitored_step):
the covariance's all-reduce and the eigendecomposition are not paid on other steps.
Statistics are over the global batch: per-device moments are averaged over the device
axis before they are combined, so the figures do not depend on how the batch is split.
"""
import jax
import jax.numpy as jnp

from byol_jax.training import losses

_RELATIVE_EIG_FLOOR = 1e-6


def _global_mean(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  m = jnp.mean(x, axis=0)
  return m if axis_name is None else jax.lax.pmean(m, axis_name)


def collapse_std(normalized: jnp.ndarray, axis_name: str | None = None) -> jnp.ndarray:
  """Mean over dimensions of the batch standard deviation of l2-normalised vectors.

  About 1/sqrt(D) for D-dimensional projections spread over the sphere, 0 when every
  example maps to the same point (collapse).

  Args:
    normalized: [b, D] unit vectors.
    axis_name: device axis to reduce over (None outside pmap).
  """
  # Two passes (mean, then centred squares): E[x^2] - E[x]^2 cancels catastrophically in
  # float32 exactly when the batch has collapsed, the case this monitor exists for.
  mean = _global_mean(normalized, axis_name)
  var = _global_mean(jnp.square(normalized - mean), axis_name)
  return jnp.mean(jnp.sqrt(var))


def effective_rank(normalized: jnp.ndarray, axis_name: str | None = None) -> jnp.ndarray:
  """exp(entropy of the normalised singular values) of the centred batch (Roy & Vetterli 2007).

  Between 1 (all variation along one direction, or collapse) and D. Computed from the
  D x D covariance, so its cost does not grow with the batch.

  Args:
    normalized: [b, D] unit vectors.
    axis_name: device axis to reduce over (None outside pmap).
  """
  x = normalized.astype(jnp.float32)
  centred = x - _global_mean(x, axis_name)  # Centre first: see collapse_std.
  cov = centred.T @ centred / x.shape[0]
  if axis_name is not None:
    cov = jax.lax.pmean(cov, axis_name)
  eig = jnp.linalg.eigvalsh(cov)
  # Eigenvalues below float32 resolution of the largest are rounding noise (a batch
  # smaller than D has exact zeros); their square roots would inflate the rank.
  eig = jnp.where(eig > _RELATIVE_EIG_FLOOR * jnp.max(eig), eig, 0.0)
  singular = jnp.sqrt(eig)
  p = singular / jnp.maximum(jnp.sum(singular), 1e-12)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy)


def projection_health(online: jnp.ndarray, target: jnp.ndarray,
                      axis_name: str | None = None) -> dict:
  """The three monitors as a dict of scalars.

  Args:
    online: [b, D] online projections z of one view.
    target: [b, D] target projections z' of the same view.
    axis_name: device axis (None outside pmap).

  Returns:
    collapse_std, effective_rank, and online_target_cosine (mean cos(z, z')).
  """
  z = losses.l2_normalize(online.astype(jnp.float32))
  t = losses.l2_normalize(target.astype(jnp.float32))
  return dict(
      collapse_std=collapse_std(z, axis_name),
      effective_rank=effective_rank(z, axis_name),
      online_target_cosine=jnp.mean(jnp.sum(z * t, axis=-1)),
  )
