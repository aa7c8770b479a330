"""Orbax checkpoints of the TrainState: asynchronous, verified, resumable on any topology.

Layout under the workdir:
  config.json              the run's config (run_config.py); resuming with a different value
                           of a state-defining field is refused before anything is read or written
  checkpoints/<step>/      one orbax checkpoint per saved step, written to a tmp directory and
                           renamed when complete: a save killed mid-way never touches older steps
  checkpoints/<step>/byol_jax_manifest.json
                           sha256 of every other file of the step (integrity.py), written once
                           orbax has finished it; only a step whose manifest matches is restored
  corrupt_checkpoints/     newer steps skipped by a restore, moved aside (never deleted)

The loop holds the state replicated by pmap (leaves [local_devices, ...]); orbax needs global
arrays, so save views each leaf as one array replicated over all devices of all processes, and
restore reads into targets built from the current topology, then stacks the copies per local
device: 2 processes x 2 devices restores on 1 x 4 or 1 x 1 and back. No pickle anywhere.
Reading a workdir without writing to it (evaluation, export) is checkpoint_reader.py.
"""
import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from byol_jax.store import files
from byol_jax.store import integrity
from byol_jax import parallel
from byol_jax.store import run_config

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"


# ---------------------------------------------------------------- topology conversion


def _check_replicated(state: PyTree) -> None:
  n = jax.local_device_count()
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    if not isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) or not x.shape or x.shape[0] != n:
      raise ValueError(
          f"state leaf {jax.tree_util.keystr(path)} is {type(x).__name__} of shape "
          f"{getattr(x, 'shape', None)}; expected a jax array replicated by pmap over the "
          f"{n} local devices, shaped [{n}, ...]. Pass the state as the pmapped update "
          "returns it.")


def replicated_to_global(state: PyTree) -> PyTree:
  """Replicated pmap state -> global arrays replicated over every device of every process.

  Args:
    state: leaves [local_devices, ...], each device holding the same values.

  Returns:
    The same tree with leaves [...] (leading axis dropped), sharded over all `jax.devices()`.
    Each device's copy loses its leading axis of 1 (a device-local slice).
  """
  _check_replicated(state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def to_global(x):
    # Not ocp.utils.fully_replicated_host_local_array_to_global_array: with one device
    # it keeps the device axis (its shard's shape equals the whole array's), so a
    # single-device checkpoint would not restore. Indexing [0] drops that axis always.
    shards = sorted(x.addressable_shards, key=lambda s: s.device.id)
    return jax.make_array_from_single_device_arrays(x.shape[1:], sharding,
                                                    [s.data[0] for s in shards])

  return jax.tree_util.tree_map(to_global, state)


def abstract_global_state(template_state: PyTree) -> PyTree:
  """Restore targets for the current topology: shapes and dtypes of a replicated template.

  Args:
    template_state: replicated pmap state (arrays or ShapeDtypeStructs [local_devices, ...]).

  Returns:
    jax.ShapeDtypeStruct leaves [...] replicated over all devices of all processes.
  """
  _check_replicated(template_state)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding), template_state)


def global_to_replicated(state: PyTree) -> PyTree:
  """Global fully replicated arrays -> pmap state on this process's devices.

  Args:
    state: leaves [...] of which every local device holds a full copy.

  Returns:
    Leaves [local_devices, ...] laid out as pmap lays out its outputs
    (`parallel.device_sharding`), ready for the pmapped update.
  """
  devices = jax.local_devices()
  sharding = parallel.device_sharding(devices)

  def stack(x):
    copies = {shard.device: shard.data for shard in x.addressable_shards}
    if set(copies) != set(devices) or any(c.shape != x.shape for c in copies.values()):
      raise ValueError(f"array of shape {x.shape} is not replicated on every local device.")
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape, sharding, [jnp.expand_dims(copies[d], 0) for d in devices])

  return jax.tree_util.tree_map(stack, state)


def _leaf_layouts(tree: PyTree) -> dict[str, str]:
  def name(key):  # Orbax metadata keys NamedTuple fields by name, the state by attribute.
    return str(next((getattr(key, a) for a in ("name", "key", "idx") if hasattr(key, a)), key))
  return {"/".join(name(k) for k in path): f"{np.dtype(x.dtype).name}{list(x.shape)}"
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def layout_mismatches(saved: PyTree, current: PyTree) -> list[str]:
  """Leaves whose presence, shape or dtype differ between two trees of arrays or metadata.

  Returns:
    Lines "opt_state/1/trace/w: checkpoint float32[3, 2], current state float32[4, 2]".
  """
  old, new = _leaf_layouts(saved), _leaf_layouts(current)
  return [f"{path}: checkpoint {old.get(path, 'absent')}, current state {new.get(path, 'absent')}"
          for path in sorted(set(old) | set(new)) if old.get(path) != new.get(path)]


def check_layout(saved: PyTree, current: PyTree, problem: str, fix: str) -> None:
  """Raises ValueError(problem, the first mismatches, fix) when `layout_mismatches` finds any."""
  lines = layout_mismatches(saved, current)
  if lines:
    raise ValueError(f"{problem}:\n  " + "\n  ".join(lines[:5] + ["..."] * (len(lines) > 5)) +
                     f"\n{fix}")


# ---------------------------------------------------------------- manager


@dataclasses.dataclass
class KeepLatestVerified:
  """Orbax preservation policy: the newest `keep` steps plus the newest verified one.

  A step counts as verified once it has a manifest, so the last verifiable checkpoint is
  deleted only after a newer one has its manifest (keep=1 never leaves only a step in flight).
  """
  keep: int
  has_manifest: Callable[[int], bool]

  def preserved(self, steps: Sequence[int]) -> set[int]:
    steps = sorted(steps)
    verified = [s for s in steps if self.has_manifest(s)]
    return set(steps[-self.keep:]) | set(verified[-1:])

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    kept = self.preserved([c.step for c in checkpoints])
    return [c.step in kept for c in checkpoints]


class Checkpointer:
  """Saves the replicated TrainState every `every_steps` steps; restores the newest intact one.

  Call the methods on every process (they synchronise); files are written by process 0 and
  by orbax. Usage: `restore_or_none` once at start, `save` after every step, `close` at exit.
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int):
    """Opens (or creates) workdir/checkpoints.

    Args:
      workdir: the run's directory.
      every_steps: `save` writes when step % every_steps == 0 (or when forced).
      keep: how many of the newest checkpoints to keep; older ones are deleted.
    """
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint every_steps={every_steps} and keep={keep} must be >= 1 "
                       "(set --config.checkpoint.every_steps / --config.checkpoint.keep).")
    self.workdir = files.absolute(workdir)
    self.directory = files.join(self.workdir, CHECKPOINT_DIR)
    self._pending = None  # Step saved by orbax in the background, not yet manifested.
    self._policy = KeepLatestVerified(keep, self._has_manifest)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=self._policy,
        enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())

  @classmethod
  def from_config(cls, workdir: str, config: ml_collections.ConfigDict) -> "Checkpointer":
    """A Checkpointer with config.checkpoint.every_steps and config.checkpoint.keep."""
    return cls(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep)

  def step_dir(self, step: int) -> str:
    return files.join(self.directory, str(step))

  def _has_manifest(self, step: int) -> bool:
    return files.exists(files.join(self.step_dir(step), integrity.MANIFEST_FILE))

  def all_steps(self) -> list[int]:
    """Steps on disk (verified or not), ascending."""
    return sorted(self._manager.all_steps())

  def _manifest_pending(self) -> None:
    # Runs only once orbax has renamed the tmp directory: the files hashed are final.
    step, self._pending = self._pending, None
    if step is None or jax.process_index() != 0:
      return
    if files.is_dir(self.step_dir(step)):
      integrity.write_manifest(self.step_dir(step))
    else:
      logging.error("checkpoint save of step %d did not complete: %s is missing.",
                    step, self.step_dir(step))

  def save(self, step: int, state: PyTree, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` as `step` when due (or when forced).

    Args:
      step: optimiser steps applied to `state`; must equal `state.step` when it has one.
      state: replicated pmap state, leaves [local_devices, ...]; its buffers may be donated
        once this returns (orbax has copied them to host memory).
      force: save although step % every_steps != 0 (end of training).

    Returns:
      True when a save was started; False when not due or this step is already saved.

    Raises:
      FloatingPointError: a floating leaf is NaN or Inf; nothing is written, so the newest
        checkpoint stays the last good state.
      ValueError: `step` differs from `state.step`, or the state is not pmap-replicated.
    """
    step = int(step)
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._manifest_pending()  # Manifest the previous save as soon as it has finished.
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    _check_replicated(state)
    if hasattr(state, "step"):
      saved_step = int(np.asarray(state.step.addressable_data(0)).reshape(-1)[0])
      if saved_step != step:
        raise ValueError(f"save(step={step}) got a state with state.step={saved_step}; pass "
                         "the state's own step so that a resume continues where it stopped.")
    bad = integrity.nonfinite_leaves(state)
    if bad:
      raise FloatingPointError(
          f"refusing to checkpoint step {step}: NaN/Inf in {', '.join(bad[:5])}"
          f"{' ...' if len(bad) > 5 else ''}; the newest checkpoint in {self.directory} is the "
          "last good state. Lower optim.base_lr or check the input data, then resume.")
    global_state = replicated_to_global(state)
    # Orbax picks the steps to delete inside save(): the previous step needs its manifest
    # first, so that the policy counts it as verified.
    self.wait_until_finished()
    if self._manager.save(step, args=ocp.args.StandardSave(global_state), force=force):
      self._pending = step
      return True
    return False

  def wait_until_finished(self) -> None:
    """Blocks until the background save is on disk with its manifest."""
    self._manager.wait_until_finished()
    self._manifest_pending()

  def close(self) -> None:
    """Finishes the pending save and its manifest, prunes, releases orbax's resources.

    Orbax deletes old steps only inside save, so the steps made redundant by the last
    save's manifest are deleted here.
    """
    self.wait_until_finished()
    if jax.process_count() > 1:  # Every process must see the manifest before choosing.
      ocp.multihost.sync_global_processes(f"byol_jax_close:{self.directory}")
    kept = self._policy.preserved(self._manager.all_steps())
    for step in self._manager.all_steps():
      if step not in kept:
        self._manager.delete(step)
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def restore_or_none(self, template_state: PyTree,
                      config: ml_collections.ConfigDict) -> tuple[int, PyTree] | None:
    """The newest intact checkpoint, for the current topology; None when there is none.

    Refuses first a config that changes a state-defining field. Steps are tried newest
    first; one without a valid manifest, or with a file that does not match it, is logged as
    an error and skipped, and once an older step restores the skipped ones are moved to
    corrupt_checkpoints/ so the run can write those steps again. Records `config` as
    config.json unless it raises.

    Args:
      template_state: replicated pmap state with the current shapes and dtypes (e.g. the
        freshly initialised state), leaves [local_devices, ...].
      config: the current run's config.

    Returns:
      (step, state), state replicated over this process's devices like the template.

    Raises:
      ValueError: a state-defining config field changed (nothing written), or an intact
        checkpoint does not fit the template (the state's structure changed).
      RuntimeError: checkpoints exist but none is intact.
    """
    run_config.check_config_compatible(self.workdir, config)
    self.wait_until_finished()
    self._manager.reload()
    targets = abstract_global_state(template_state)
    found = integrity.newest_intact(
        self.directory, self._manager.all_steps(),
        fix="restore the files from a backup, or start afresh with another --workdir.")
    if found is None:
      run_config.save_config(self.workdir, config)
      return None
    step, skipped = found
    state = self._restore_step(step, targets)
    if skipped:
      self._quarantine(skipped)
      logging.warning("restored checkpoint step %d after skipping corrupt newer steps %s "
                      "(moved to %s).", step, skipped, files.join(self.workdir, QUARANTINE_DIR))
    run_config.save_config(self.workdir, config)
    return step, state

  def _restore_step(self, step: int, targets: PyTree) -> PyTree:
    check_layout(self._manager.item_metadata(step), targets,
                 f"checkpoint step {step} in {self.directory} is intact but does not fit the "
                 "current state", "The state's structure changed since it was written; resume "
                 "with the code and config that wrote it, or use another --workdir.")
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(targets))
    return global_to_replicated(restored)

  def _quarantine(self, steps: Sequence[int]) -> None:
    if jax.process_index() == 0:
      target_root = files.join(self.workdir, QUARANTINE_DIR)
      files.makedirs(target_root)
      for step in steps:
        target, n = files.join(target_root, str(step)), 1
        while files.exists(target):
          target, n = files.join(target_root, f"{step}.{n}"), n + 1
        files.rename(self.step_dir(step), target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("byol_jax_checkpoint_quarantine")
    self._manager.reload()

