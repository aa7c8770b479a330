"""TrainState, its initialisation, and the pmapped BYOL update step.

`update` is a pure module-level function of (state, batch, rng); its dependencies (the
network, the optimiser, the schedules, the augmentation presets) are bound with
functools.partial and the result is pmapped once over `parallel.DEVICE_AXIS`.
"""
import functools
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from byol_jax import config as config_lib
from byol_jax import parallel
from byol_jax.model import networks
from byol_jax.training import augment
from byol_jax.training import losses
from byol_jax.training import monitors
from byol_jax.training import optim

PyTree = Any
# augment_fn(images [b, H, W, C], keys [b, 2], view_cfg) -> float32 [b, H, W, C] in [0, 1].
AugmentFn = Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray]


class TrainState(NamedTuple):
  step: jnp.ndarray  # int32 scalar: optimiser steps applied so far.
  online_params: hk.Params
  online_state: hk.State
  target_params: hk.Params
  target_state: hk.State
  opt_state: optax.OptState


class Deps(NamedTuple):
  """Everything `update` needs besides its arguments; built once per run."""
  forward: hk.TransformedWithState  # Cross-replica BN over DEVICE_AXIS.
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  tau_schedule: optax.Schedule
  augment_fn: AugmentFn
  view1: Any  # Augmentation preset of view 1 (config.augment.view1).
  view2: Any
  # The health monitors run on the steps the loop logs (`is_monitored_step`); 1 = every step.
  monitor_every: int = 1
  total_steps: int = 0  # The last step is always logged, so always monitored.


def make_deps(c: ml_collections.ConfigDict, augment_fn: AugmentFn | None = None) -> Deps:
  """Builds the network, optimiser and schedules of a config (no arrays are created).

  Args:
    c: a full config (see config.py).
    augment_fn: on-device augmentation; default `augment.augment_view`. Tests pass an
      identity to isolate the optimisation maths.
  """
  if augment_fn is None:
    augment_fn = augment.augment_view
  optimizer, lr = optim.make_optimizer(c)
  tau = optim.tau_schedule(c.target.tau_base, config_lib.total_steps(c), c.target.schedule)
  forward = networks.make_byol_network(c.model, c.dataset.num_classes,
                                       axis_name=parallel.DEVICE_AXIS, precision=c.precision)
  return Deps(forward, optimizer, lr, tau, augment_fn,
              c.augment.view1.to_dict(), c.augment.view2.to_dict(),
              monitor_every=int(c.log.every_steps), total_steps=config_lib.total_steps(c))


# Metrics computed only on monitored steps; on the others they hold NaN (never read).
MONITOR_KEYS = ("probe_top1", "collapse_std", "effective_rank", "online_target_cosine")


def is_monitored_step(step, every: int, total: int):
  """Whether the step that ends with the counter at `step` (1-based) is logged.

  The one definition shared by the update (a traced int32) and the host loop (an int):
  steps that are multiples of `every`, and the last step `total`.
  """
  return (step % every == 0) | (step == total)


def init_state(c: ml_collections.ConfigDict, deps: Deps, rng: jax.Array,
               channels: int) -> TrainState:
  """A fresh, unreplicated TrainState.

  The target starts as a copy of the online network (`target.init='copy'`, the authors'
  release) or from its own random init ('separate').

  Args:
    c: the config.
    deps: from `make_deps(c)` (its optimiser initialises the optimiser state).
    rng: the run's init key.
    channels: image channels of the data set (3 for RGB, 1 for grayscale).
  """
  # Init runs outside pmap, so it uses a network without the cross-replica axis; the
  # parameter and state trees are the same.
  init_net = networks.make_byol_network(c.model, c.dataset.num_classes, axis_name=None,
                                        precision=c.precision)
  dummy = jnp.zeros((2, c.image_size, c.image_size, channels), jnp.float32)
  online_key, target_key = jax.random.split(rng)
  online_params, online_state = init_net.init(online_key, dummy, is_training=True)
  if c.target.init == "copy":
    target_params, target_state = online_params, online_state
  else:
    target_params, target_state = init_net.init(target_key, dummy, is_training=True)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      online_params=online_params, online_state=online_state,
      target_params=target_params, target_state=target_state,
      opt_state=deps.optimizer.init(online_params))


def example_keys(rng: jax.Array, step: jnp.ndarray, per_device: int) -> jnp.ndarray:
  """Per-example keys [per_device, 2] from (rng, step, global example index).

  The same global batch gets the same keys whatever the number of devices.
  """
  step_key = jax.random.fold_in(rng, step)
  index = parallel.global_example_index(per_device)
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def augment_views(batch: dict, rng: jax.Array, step: jnp.ndarray, deps: Deps
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Both views of this device's batch, augmented on the device with per-example keys."""
  keys = example_keys(rng, step, batch["view1"].shape[0])
  view1 = deps.augment_fn(batch["view1"], jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), deps.view1)
  view2 = deps.augment_fn(batch["view2"], jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys), deps.view2)
  return view1, view2


def loss_fn(online_params: hk.Params, target_params: hk.Params,
            online_state: hk.State, target_state: hk.State,
            view1: jnp.ndarray, view2: jnp.ndarray, labels: jnp.ndarray,
            forward: hk.TransformedWithState):
  """BYOL loss plus the online probe's cross-entropy; differentiate w.r.t. argument 0.

  The probe reads stop_gradient(representation) inside the network, so its loss trains
  only the classifier. The target's outputs are constants for the gradient.

  Returns:
    (total_loss, (online_state, target_state, aux)) where aux holds the projections
    and per-term losses used for metrics.
  """
  online_1, online_state = forward.apply(online_params, online_state, None, view1, is_training=True)
  online_2, online_state = forward.apply(online_params, online_state, None, view2, is_training=True)
  target_1, target_state = forward.apply(target_params, target_state, None, view1, is_training=True)
  target_2, target_state = forward.apply(target_params, target_state, None, view2, is_training=True)
  byol = losses.byol_loss(online_1["prediction"], online_2["prediction"],
                          target_1["projection"], target_2["projection"])
  # As in the authors' release the probe is trained on view 1's representation.
  probe = losses.softmax_cross_entropy(online_1["logits"], labels)
  aux = dict(byol_loss=byol, probe_loss=probe, logits=online_1["logits"],
             online_projection=online_1["projection"],
             target_projection=jax.lax.stop_gradient(target_1["projection"]))
  return byol + probe, (online_state, target_state, aux)


def update(state: TrainState, batch: dict, rng: jax.Array, *, deps: Deps
           ) -> tuple[TrainState, dict]:
  """One BYOL step on this device's part of the global batch (run under pmap).

  Args:
    state: this device's replica of the TrainState.
    batch: view1, view2: [b, H, W, C] uint8 or float in [0, 1] (host-cropped views);
      label: [b] int32.
    rng: the run's augmentation key, identical on all devices.
    deps: from `make_deps`.

  Returns:
    (new_state, metrics): metrics are scalars averaged over all devices; MONITOR_KEYS
    are computed on monitored steps only (`is_monitored_step`) and are NaN on the others.
    A step whose loss or gradients are not finite leaves the state unchanged but for
    `step` (metrics['nonfinite']=1).
  """
  view1, view2 = augment_views(batch, rng, state.step, deps)
  grad_fn = jax.grad(loss_fn, argnums=0, has_aux=True)
  grads, (online_state, target_state, aux) = grad_fn(
      state.online_params, state.target_params, state.online_state, state.target_state,
      view1, view2, batch["label"], forward=deps.forward)
  grads = jax.lax.pmean(grads, parallel.DEVICE_AXIS)

  # Every step: what the guards need (the losses and gradient norm decide `finite`).
  metrics = jax.lax.pmean(dict(loss=aux["byol_loss"], probe_loss=aux["probe_loss"]),
                          parallel.DEVICE_AXIS)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["probe_loss"]) & jnp.isfinite(grad_norm)
  tau = deps.tau_schedule(state.step)
  metrics.update(grad_norm=grad_norm, learning_rate=deps.lr_schedule(state.step), tau=tau,
                 nonfinite=1.0 - finite.astype(jnp.float32))
  metrics.update(_monitors(state.step + 1, aux, batch["label"], deps))

  # A non-finite step is dropped whole; the host loop counts and stops on repeats. The
  # step counter still advances: it counts batches consumed, so the data position and
  # checkpoints stay in step (the optimiser's own lr count does not advance). A cond, not
  # a select over every leaf: the finite step pays no extra pass over the state.
  new_state = jax.lax.cond(
      finite, functools.partial(_apply_gradients, deps=deps), lambda s, *_: s,
      state, grads, online_state, target_state, tau)
  return new_state._replace(step=state.step + 1), metrics


def _apply_gradients(state: TrainState, grads: PyTree, online_state: hk.State,
                     target_state: hk.State, tau: jnp.ndarray, *, deps: Deps) -> TrainState:
  """The optimiser step on the online params, then the target's EMA (a finite step)."""
  updates, opt_state = deps.optimizer.update(grads, state.opt_state, state.online_params)
  online_params = optax.apply_updates(state.online_params, updates)
  # xi <- tau * xi + (1 - tau) * theta, with theta after this step's optimiser update.
  target_params = optax.incremental_update(online_params, state.target_params, 1.0 - tau)
  return TrainState(state.step, online_params, online_state, target_params, target_state,
                    opt_state)


def _monitors(step: jnp.ndarray, aux: dict, labels: jnp.ndarray, deps: Deps) -> dict:
  """MONITOR_KEYS over the global batch on monitored steps, NaN on the others.

  A cond on a predicate of the replicated step counter: every device takes the same
  branch, so the branch's collectives (the covariance's pmean) run on logged steps only,
  and the eigendecomposition is skipped with them. One compiled update serves both kinds
  of step.
  """
  def compute(online, target, logits, labels):
    health = monitors.projection_health(online, target, parallel.DEVICE_AXIS)
    local = dict(probe_top1=losses.topk_accuracy(logits, labels, 1),
                 online_target_cosine=health.pop("online_target_cosine"))
    # collapse_std and effective_rank are already global statistics.
    return dict(jax.lax.pmean(local, parallel.DEVICE_AXIS), **health)

  def skip(*_):
    return {k: jnp.full((), jnp.nan, jnp.float32) for k in MONITOR_KEYS}

  return jax.lax.cond(is_monitored_step(step, deps.monitor_every, deps.total_steps),
                      compute, skip, aux["online_projection"], aux["target_projection"],
                      aux["logits"], labels)


def make_pmapped_update(deps: Deps, devices=None
                        ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """`update` bound to `deps` and pmapped once; the old state's buffers are donated.

  Call it with a replicated state, a batch shaped [local_devices, b, ...] and one rng
  (broadcast to all devices).

  Args:
    deps: from `make_deps`.
    devices: the devices to run on (default: all local devices).
  """
  return jax.pmap(functools.partial(update, deps=deps), axis_name=parallel.DEVICE_AXIS,
                  in_axes=(0, 0, None), donate_argnums=(0,), devices=devices)
