"""LARS composed from optax transformations, parameter masks, and the lr / tau schedules.

LARS (You et al. 2017) as BYOL uses it: weight decay added to the gradient, the update
rescaled by the trust ratio eta * ||w|| / ||g + wd * w||, a momentum trace, the learning
rate. Biases and normalisation parameters are excluded from both the weight decay and
the trust-ratio adaptation (BYOL Appendix C).
"""
import math
from typing import Any, Callable

import haiku as hk
import jax.numpy as jnp
import ml_collections
import optax

from byol_jax import config as config_lib

PyTree = Any

# Haiku's names for biases (Linear/Conv 'b') and normalisation parameters (BatchNorm /
# GroupNorm 'scale' and 'offset'). Haiku stores BN scales as [1, 1, 1, C], so the shape
# alone cannot tell them from weights.
EXCLUDED_PARAM_NAMES = frozenset({"b", "scale", "offset"})
PREDICTOR_PREFIX = "predictor"


def adaptation_mask(params: PyTree) -> PyTree:
  """True for parameters that get weight decay and LARS adaptation (weights), else False."""
  return hk.data_structures.map(
      lambda module, name, value: name not in EXCLUDED_PARAM_NAMES, params)


def predictor_mask(params: PyTree) -> PyTree:
  """True for parameters of the predictor head (module names starting 'predictor')."""
  return hk.data_structures.map(
      lambda module, name, value: module.split("/")[0].startswith(PREDICTOR_PREFIX), params)


def lars(learning_rate: optax.ScalarOrSchedule,
         weight_decay: float = 0.0,
         momentum: float = 0.9,
         trust_coefficient: float = 1e-3,
         mask: Callable[[PyTree], PyTree] = adaptation_mask,
         order: str = "momentum_first") -> optax.GradientTransformation:
  """LARS as an optax chain.

  Args:
    learning_rate: a float or a schedule step -> lr.
    weight_decay: coefficient of the decoupled-into-gradient L2 term (g + wd * w).
    momentum: trace decay.
    trust_coefficient: eta in eta * ||w|| / ||g + wd * w||.
    mask: params -> bool tree, True where weight decay and adaptation apply.
    order: 'momentum_first' (the authors' release: trace, then multiply by the current
      lr) or 'lr_first' (`optax.lars`: multiply by the lr, then trace). They differ
      whenever the lr changes between steps (warm-up, decay).

  Returns:
    The GradientTransformation; its updates are to be added to the params.
  """
  if order == "lr_first":
    return optax.lars(learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
                      trust_coefficient=trust_coefficient, eps=0.0,
                      trust_ratio_mask=mask, momentum=momentum)
  if order != "momentum_first":
    raise ValueError(f"LARS order {order!r} is unknown; valid: {list(config_lib.LARS_ORDERS)}.")
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def learning_rate_schedule(base_lr: float, batch_size: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """base_lr * batch_size / 256, linear warm-up from 0, then cosine decay to 0 at total_steps."""
  peak = base_lr * batch_size / 256.0
  decay_steps = max(1, total_steps - warmup_steps)
  cosine = optax.cosine_decay_schedule(init_value=peak, decay_steps=decay_steps)
  if warmup_steps <= 0:
    return cosine
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def tau_schedule(tau_base: float, total_steps: int, kind: str = "cosine") -> optax.Schedule:
  """EMA decay of the target: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, or constant."""
  if kind == "constant":
    return lambda step: jnp.asarray(tau_base, jnp.float32)
  if kind != "cosine":
    raise ValueError(f"target.schedule {kind!r} is unknown; valid: {list(config_lib.TAU_SCHEDULES)}.")

  def schedule(step):
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - tau_base) * (jnp.cos(math.pi * progress) + 1.0) / 2.0

  return schedule


def make_optimizer(c: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The pretraining optimiser and its lr schedule, from a full config.

  The online classifier (probe) is trained by the same LARS as the rest, as in the
  authors' release; the predictor's updates are scaled by `optim.predictor_lr_multiplier`
  (the paper's lambda ablation; 1.0 = no change).
  """
  o = c.optim
  lr = learning_rate_schedule(o.base_lr, c.batch_size, config_lib.total_steps(c),
                              config_lib.warmup_steps(c))
  optimizer = optax.chain(
      lars(lr, o.weight_decay, o.momentum, o.trust_coefficient, adaptation_mask, o.lars_order),
      optax.masked(optax.scale(o.predictor_lr_multiplier), predictor_mask),
  )
  return optimizer, lr
