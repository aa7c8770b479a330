"""Read-only access to a pretraining workdir's checkpoints, for evaluation and export.

Apart from checkpoint.py because a reader writes, moves and deletes nothing, needs no
replicated state or CheckpointManager, and lands the arrays on one device: it picks the
newest step whose manifest matches (integrity.py) and restores it into an unreplicated
template (or the part of it a reader needs), refusing a template whose leaves differ from
the saved ones.
"""
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp

from byol_jax.store import checkpoint
from byol_jax.store import files
from byol_jax.store import integrity

PyTree = Any


def intact_step(workdir: str) -> int:
  """The newest step under workdir/checkpoints whose files match its manifest. Writes nothing.

  Newer steps that fail verification are logged as errors and skipped (a restoring
  Checkpointer would quarantine them; a reader leaves them where they are).

  Raises:
    FileNotFoundError: no checkpoint directory or no saved step.
    RuntimeError: steps exist but none is intact (each problem is named).
  """
  directory = files.join(workdir, checkpoint.CHECKPOINT_DIR)
  # Orbax names a save in flight '<step>.orbax-checkpoint-tmp-*': only bare numbers count.
  found = integrity.newest_intact(
      directory, [int(n) for n in files.listdir(directory) if n.isdigit()],
      fix="restore the files from a backup.")
  if found is None:
    raise FileNotFoundError(
        f"no checkpoints in {directory}: is {workdir} a pretraining workdir? Run `byol-jax "
        "pretrain --workdir=...` first, or pass the directory it wrote.")
  return found[0]


def _item_dir(workdir: str, step: int) -> str:
  # Orbax refuses relative paths; users pass --workdir=runs/x.
  return files.join(files.absolute(workdir), checkpoint.CHECKPOINT_DIR, str(step), "default")


def step_layout(workdir: str, step: int) -> PyTree:
  """The saved tree of step: orbax array metadata (shape, dtype) per leaf. Writes nothing."""
  # The handler reads the item's own metadata; the Checkpointer would also look for (and
  # warn about) a step-level metadata file the manager keeps elsewhere.
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(_item_dir(workdir, step))).tree
  finally:
    handler.close()


def restore_step(workdir: str, step: int, template: PyTree, device: jax.Device | None = None,
                 saved: PyTree | None = None) -> PyTree:
  """Reads one saved step, or the part of it that `template` names, onto a single device.

  Writes nothing. Only the leaves of `template` are read, so a reader that needs the online
  encoder alone reads neither the target network nor the optimiser state.

  Args:
    workdir: a pretraining workdir.
    step: a step under workdir/checkpoints (see `intact_step`; no verification here).
    template: unreplicated tree of arrays or ShapeDtypeStructs, leaves [...]: the saved
      tree (e.g. `jax.eval_shape` of `train.init_state`), or a part of it as nested dicts
      that keep the saved keys (e.g. {'online_params': {module: {name: leaf}}}).
    device: where the arrays land (default: the host CPU device).
    saved: the saved leaves `template` must equal exactly, as `step_layout` gives them:
      default the whole step, so `template` must be the whole tree; for a part, pass the
      same part of `step_layout`, so that a saved leaf the template lacks is refused too.

  Returns:
    The saved values, leaves [...] on `device`, in the template's tree structure.

  Raises:
    ValueError: the saved leaves differ in presence, shape or dtype from the template.
  """
  device = device or jax.local_devices(backend="cpu")[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  targets = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template)
  checkpoint.check_layout(step_layout(workdir, step) if saved is None else saved, targets,
                          f"checkpoint step {step} in {workdir} does not fit the state its "
                          "config.json describes", "Read it with the byol_jax version that "
                          "wrote it.")
  restore = ocp.args.PyTreeRestore(
      item=targets, restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
      partial_restore=True)  # The leaves the template names; the whole tree for a full one.
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(_item_dir(workdir, step), args=restore)
