"""Integrity of a checkpoint: no NaN/Inf in the state written, no changed byte in its files.

Apart from checkpoint.py because neither check needs orbax: `nonfinite_leaves` reads a tree
of arrays before it is saved, and the sha256 manifest reads a step's files after orbax has
written them. `newest_intact` is the one scan for the step to read: the restoring
Checkpointer and the read-only reader (checkpoint_reader.py) both pick their step with it.

  <step_dir>/byol_jax_manifest.json
      sha256 and size of every other file of the step. Orbax restores a file with a flipped
      byte silently, so only a step whose manifest exists and matches is restored; a step
      whose save was in flight when the process died has none.
"""
from typing import Any, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.store import files as file_io

PyTree = Any

MANIFEST_FILE = "byol_jax_manifest.json"
_MANIFEST_FORMAT = "byol_jax.sha256.v1"


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


def _files_under(directory: str) -> list[str]:
  return [f for f in file_io.files_under(directory) if f != MANIFEST_FILE]


def write_manifest(step_dir: str) -> None:
  """Writes MANIFEST_FILE: relative path -> {sha256, bytes} for every other file of step_dir."""
  files = {rel: {"sha256": file_io.sha256(file_io.join(step_dir, rel)),
                 "bytes": file_io.size(file_io.join(step_dir, rel))}
           for rel in _files_under(step_dir)}
  file_io.write_json_atomic(file_io.join(step_dir, MANIFEST_FILE),
                           {"format": _MANIFEST_FORMAT, "files": files})


def verify_manifest(step_dir: str) -> str | None:
  """Checks step_dir against its manifest.

  Returns:
    None when every file is present with its recorded digest and no file was added; else
    one line naming the problem and the file.
  """
  try:
    expected = file_io.read_json(file_io.join(step_dir, MANIFEST_FILE))["files"]
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
    full = file_io.join(step_dir, rel)
    size = file_io.size(full)
    if size != expected[rel]["bytes"]:
      return f"file {rel} has {size} bytes, the manifest says {expected[rel]['bytes']} (truncated?)"
    if file_io.sha256(full) != expected[rel]["sha256"]:
      return f"file {rel} does not match its sha256 in the manifest (modified on disk)"
  return None


def newest_intact(directory: str, steps: Iterable[int], fix: str) -> tuple[int, list[int]] | None:
  """The newest of `steps` (subdirectories of `directory`) whose files match its manifest.

  Newer steps that fail verification are logged as errors and passed over; what is done
  with them (left in place, quarantined) is the caller's. Writes nothing.

  Args:
    directory: the checkpoints directory holding one subdirectory per step.
    steps: the saved steps, in any order.
    fix: the sentence that ends the error when no step is intact.

  Returns:
    (step, the newer steps passed over, newest first), or None when `steps` is empty.

  Raises:
    RuntimeError: steps exist but none is intact (each problem is named).
  """
  skipped = []
  for step in sorted(steps, reverse=True):
    problem = verify_manifest(file_io.join(directory, str(step)))
    if problem is None:
      return step, [s for s, _ in skipped]
    logging.error("checkpoint step %d in %s is corrupt or incomplete and will not be used: "
                  "%s. Trying an older one.", step, directory, problem)
    skipped.append((step, problem))
  if not skipped:
    return None
  details = "\n  ".join(f"step {s}: {p}" for s, p in skipped)
  raise RuntimeError(f"no intact checkpoint in {directory}:\n  {details}\nFix: {fix}")
