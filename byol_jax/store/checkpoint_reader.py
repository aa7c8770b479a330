"""Read-only access to a pretraining workdir's checkpoints, for evaluation and export.

Apart from checkpoint.py because a reader writes, moves and deletes nothing, needs no
replicated state or CheckpointManager, and lands the arrays on one device: it picks the
newest step whose manifest matches (integrity.py) and restores it into an unreplicated
template, refusing a template whose leaves differ from the saved ones.
"""
from typing import Any

from absl import logging
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
  steps = sorted((int(n) for n in files.listdir(directory) if n.isdigit()), reverse=True)
  if not steps:
    raise FileNotFoundError(
        f"no checkpoints in {directory}: is {workdir} a pretraining workdir? Run `byol-jax "
        "pretrain --workdir=...` first, or pass the directory it wrote.")
  skipped = []
  for step in steps:
    problem = integrity.verify_manifest(files.join(directory, str(step)))
    if problem is None:
      return step
    logging.error("checkpoint step %d in %s is corrupt or incomplete and will not be used: "
                  "%s. Trying an older one.", step, directory, problem)
    skipped.append(f"step {step}: {problem}")
  raise RuntimeError(f"no intact checkpoint in {directory}:\n  " + "\n  ".join(skipped) +
                     "\nFix: restore the files from a backup.")


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
  checkpoint.check_layout(step_layout(workdir, step), targets,
               f"checkpoint step {step} in {workdir} does not fit the state its config.json "
               "describes", "Read it with the byol_jax version that wrote it.")
  with ocp.StandardCheckpointer() as reader:
    return reader.restore(_item_dir(workdir, step), targets)

