"""Orbax checkpoints of the TrainState: asynchronous, verified, resumable on any topology.

Layout under the workdir:
  config.json              the run's config; resuming with a different value of a field in
                           STATE_DEFINING_FIELDS is refused before anything is read or written
  checkpoints/<step>/      one orbax checkpoint per saved step, written to a tmp directory and
                           renamed when complete: a save killed mid-way never touches older steps
  checkpoints/<step>/byol_jax_manifest.json
                           sha256 of every other file of the step, written once orbax has
                           finished it. Orbax restores a file with a flipped byte silently, so
                           only a step whose manifest exists and matches is restored; a step
                           whose save was in flight when the process died has none.
  corrupt_checkpoints/     newer steps skipped by a restore, moved aside (never deleted)

The loop holds the state replicated by pmap (leaves [local_devices, ...]); orbax needs global
arrays, so save views each leaf as one array replicated over all devices of all processes, and
restore reads into targets built from the current topology, then stacks the copies per local
device: 2 processes x 2 devices restores on 1 x 4 or 1 x 1 and back. No pickle anywhere.
"""
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from byol_jax import files as file_io
from byol_jax import parallel

PyTree = Any

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"
MANIFEST_FILE = "byol_jax_manifest.json"
_MANIFEST_FORMAT = "byol_jax.sha256.v1"

# The rule for resuming a workdir with an edited config: every field listed here (a key ending
# in "." covers all fields below it) must equal the saved value, because it fixes the shapes,
# dtypes or meaning of the saved TrainState. Every other field may change between runs: run
# length (num_steps, num_epochs), batch size and learning-rate values, logging, checkpoint and
# evaluation cadence, data location (dataset.data_dir), augmentation strengths.
STATE_DEFINING_FIELDS = {
    "model.": "the network architecture: parameter and batch-norm state shapes",
    "precision": "the dtype of the parameters",
    "dataset.num_classes": "the shape of the online linear probe",
    "dataset.name": "the classes the probe predicts and the data the state has learnt from",
    "optim.lars_order": "the meaning of the LARS momentum buffer in opt_state",
}


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


# ---------------------------------------------------------------- integrity


@jax.jit
def _finite_flags(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(state: PyTree) -> list[str]:
  """Paths of the floating leaves that hold a NaN or Inf (checked on the first local replica).

  Args:
    state: any tree of arrays; pmap-replicated leaves are read on one device only.

  Returns:
    Key paths such as ".online_params['linear']['w']"; empty when every leaf is finite.
  """
  paths, leaves = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(x.addressable_data(0) if isinstance(x, jax.Array) else np.asarray(x))
  if not leaves:
    return []
  flags = np.asarray(_finite_flags(leaves))
  return [p for p, ok in zip(paths, flags) if not ok]


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(directory: str) -> list[str]:
  found = (os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
           for root, _, files in os.walk(directory) for name in files)
  return sorted(f for f in found if f != MANIFEST_FILE)


def write_manifest(step_dir: str) -> None:
  """Writes MANIFEST_FILE: relative path -> {sha256, bytes} for every other file of step_dir."""
  files = {rel: {"sha256": _sha256(os.path.join(step_dir, rel)),
                 "bytes": os.path.getsize(os.path.join(step_dir, rel))}
           for rel in _files_under(step_dir)}
  file_io.write_json_atomic(os.path.join(step_dir, MANIFEST_FILE),
                           {"format": _MANIFEST_FORMAT, "files": files})


def verify_manifest(step_dir: str) -> str | None:
  """Checks step_dir against its manifest.

  Returns:
    None when every file is present with its recorded digest and no file was added; else
    one line naming the problem and the file.
  """
  try:
    with open(os.path.join(step_dir, MANIFEST_FILE)) as f:
      expected = json.load(f)["files"]
  except FileNotFoundError:
    return f"no {MANIFEST_FILE} (the save never finished, or the file was removed)"
  except (ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST_FILE}: {e}"
  present = set(_files_under(step_dir))
  missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
  if missing:
    return f"file {missing[0]} is listed in the manifest but missing"
  if extra:
    return f"file {extra[0]} is not in the manifest"
  for rel in sorted(expected):
    full = os.path.join(step_dir, rel)
    size = os.path.getsize(full)
    if size != expected[rel]["bytes"]:
      return f"file {rel} has {size} bytes, the manifest says {expected[rel]['bytes']} (truncated?)"
    if _sha256(full) != expected[rel]["sha256"]:
      return f"file {rel} does not match its sha256 in the manifest (modified on disk)"
  return None


# ---------------------------------------------------------------- config guard


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (what config.json holds), so saved and new compare equal."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: Mapping, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_mismatches(saved: Mapping, current: Mapping) -> list[str]:
  """State-defining fields (STATE_DEFINING_FIELDS) whose values differ.

  Args:
    saved, current: configs as nested dicts (`config_to_dict`).

  Returns:
    Lines "field: saved X, now Y (what the field defines)" sorted by field; a field missing
    on one side counts as a difference. Empty when the saved state can be resumed.
  """
  old, new = _flatten(saved), _flatten(current)
  show = lambda flat, field: repr(flat[field]) if field in flat else "<absent>"  # noqa: E731
  lines = []
  for field in sorted(set(old) | set(new)):
    rule = next((k for k in STATE_DEFINING_FIELDS
                 if (field.startswith(k) if k.endswith(".") else field == k)), None)
    if rule and (field not in old or field not in new or old[field] != new[field]):
      lines.append(f"{field}: saved {show(old, field)}, now {show(new, field)} "
                   f"({STATE_DEFINING_FIELDS[rule]})")
  return lines


def check_config_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when workdir's config.json differs in a state-defining field.

  Writes nothing. A workdir without config.json passes.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  lines = config_mismatches(saved, config_to_dict(config))
  if lines:
    raise ValueError(
        f"--workdir={workdir} holds a run whose config differs in fields that define the "
        "saved state, so it cannot be resumed:\n  " + "\n  ".join(lines) +
        f"\nFix: pass another --workdir for the new config, or rerun with the values saved "
        f"in {path}.")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes workdir/config.json atomically (process 0 only)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    file_io.write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_to_dict(config))


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
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
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
    return os.path.join(self.directory, str(step))

  def _has_manifest(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.step_dir(step), MANIFEST_FILE))

  def all_steps(self) -> list[int]:
    """Steps on disk (verified or not), ascending."""
    return sorted(self._manager.all_steps())

  def _manifest_pending(self) -> None:
    # Runs only once orbax has renamed the tmp directory: the files hashed are final.
    step, self._pending = self._pending, None
    if step is None or jax.process_index() != 0:
      return
    if os.path.isdir(self.step_dir(step)):
      write_manifest(self.step_dir(step))
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
    bad = nonfinite_leaves(state)
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
    check_config_compatible(self.workdir, config)
    self.wait_until_finished()
    self._manager.reload()
    targets = abstract_global_state(template_state)
    skipped = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = verify_manifest(self.step_dir(step))
      if problem:
        logging.error("checkpoint step %d in %s is corrupt or incomplete and will not be used: "
                      "%s. Trying an older one.", step, self.directory, problem)
        skipped.append((step, problem))
        continue
      state = self._restore_step(step, targets)
      if skipped:
        self._quarantine([s for s, _ in skipped])
        logging.warning("restored checkpoint step %d after skipping corrupt newer steps %s "
                        "(moved to %s).", step, [s for s, _ in skipped],
                        os.path.join(self.workdir, QUARANTINE_DIR))
      save_config(self.workdir, config)
      return step, state
    if skipped:
      details = "\n  ".join(f"step {s}: {p}" for s, p in skipped)
      raise RuntimeError(
          f"no intact checkpoint in {self.directory}:\n  {details}\nFix: restore the files "
          "from a backup, or start afresh with another --workdir.")
    save_config(self.workdir, config)
    return None

  def _restore_step(self, step: int, targets: PyTree) -> PyTree:
    check_layout(self._manager.item_metadata(step), targets,
                 f"checkpoint step {step} in {self.directory} is intact but does not fit the "
                 "current state", "The state's structure changed since it was written; resume "
                 "with the code and config that wrote it, or use another --workdir.")
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(targets))
    return global_to_replicated(restored)

  def _quarantine(self, steps: Sequence[int]) -> None:
    if jax.process_index() == 0:
      target_root = os.path.join(self.workdir, QUARANTINE_DIR)
      os.makedirs(target_root, exist_ok=True)
      for step in steps:
        target, n = os.path.join(target_root, str(step)), 1
        while os.path.exists(target):
          target, n = os.path.join(target_root, f"{step}.{n}"), n + 1
        os.rename(self.step_dir(step), target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("byol_jax_checkpoint_quarantine")
    self._manager.reload()


# ---------------------------------------------------------------- read-only restore


def intact_step(workdir: str) -> int:
  """The newest step under workdir/checkpoints whose files match its manifest. Writes nothing.

  Newer steps that fail verification are logged as errors and skipped (a restoring
  Checkpointer would quarantine them; a reader leaves them where they are).

  Raises:
    FileNotFoundError: no checkpoint directory or no saved step.
    RuntimeError: steps exist but none is intact (each problem is named).
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  # Orbax names a save in flight '<step>.orbax-checkpoint-tmp-*': only bare numbers count.
  steps = sorted((int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                  if n.isdigit()), reverse=True)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoints in {directory}: is {workdir} a pretraining workdir? Run `byol-jax "
        "pretrain --workdir=...` first, or pass the directory it wrote.")
  skipped = []
  for step in steps:
    problem = verify_manifest(os.path.join(directory, str(step)))
    if problem is None:
      return step
    logging.error("checkpoint step %d in %s is corrupt or incomplete and will not be used: "
                  "%s. Trying an older one.", step, directory, problem)
    skipped.append(f"step {step}: {problem}")
  raise RuntimeError(f"no intact checkpoint in {directory}:\n  " + "\n  ".join(skipped) +
                     "\nFix: restore the files from a backup.")


def _item_dir(workdir: str, step: int) -> str:
  # Orbax refuses relative paths; users pass --workdir=runs/x.
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step), "default")


def step_layout(workdir: str, step: int) -> PyTree:
  """The saved tree of step: orbax array metadata (shape, dtype) per leaf. Writes nothing."""
  # The handler reads the item's own metadata; the Checkpointer would also look for (and
  # warn about) a step-level metadata file the manager keeps elsewhere.
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(_item_dir(workdir, step))).tree
  finally:
    handler.close()


def restore_step(workdir: str, step: int, template_state: PyTree,
                 device: jax.Device | None = None) -> PyTree:
  """Reads one saved step onto a single device, without writing anything.

  Args:
    workdir: a pretraining workdir.
    step: a step under workdir/checkpoints (see `intact_step`; no verification here).
    template_state: unreplicated tree of arrays or ShapeDtypeStructs with the saved
      structure (e.g. `jax.eval_shape` of `train.init_state`), leaves [...].
    device: where the arrays land (default: the host CPU device).

  Returns:
    The saved state, leaves [...] on `device`, in the template's tree structure.

  Raises:
    ValueError: the saved leaves differ in presence, shape or dtype from the template.
  """
  device = device or jax.local_devices(backend="cpu")[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  targets = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template_state)
  check_layout(step_layout(workdir, step), targets,
               f"checkpoint step {step} in {workdir} does not fit the state its config.json "
               "describes", "Read it with the byol_jax version that wrote it.")
  with ocp.StandardCheckpointer() as reader:
    return reader.restore(_item_dir(workdir, step), targets)


def restore_latest(workdir: str, template_state: PyTree,
                   device: jax.Device | None = None) -> tuple[int, PyTree]:
  """(step, state) of the newest intact checkpoint, read-only (nothing written or moved).

  Args:
    workdir: a pretraining workdir.
    template_state: unreplicated template, leaves [...] (see `restore_step`).
    device: where the arrays land (default: the host CPU device).

  Raises:
    FileNotFoundError / RuntimeError: see `intact_step`. ValueError: see `restore_step`.
  """
  step = intact_step(workdir)
  return step, restore_step(workdir, step, template_state, device)
