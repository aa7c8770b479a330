"""A workdir's config.json: the record of a run's config and the guard on resuming it.

Apart from checkpoint.py because it concerns the config, not the arrays: the Checkpointer
applies the guard before a restore, the loop compares processes' configs in the form saved
here (`config_to_dict`), and the encoder loader (weights/pretrained.py) reads config.json
back (`read_config`) to rebuild the network. Writing and reading config.json live here
together, so the two stay one format.
"""
import json
from typing import Any, Mapping

import jax
import ml_collections

from byol_jax import config as config_lib
from byol_jax.store import files as file_io

CONFIG_FILE = "config.json"

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
# Fields under a state-defining prefix that leave the saved state's meaning unchanged: a run
# may resume on another platform with the other way of computing convolutions, and the
# initialisation of residual branches matters only before the first step (so a workdir
# whose config.json holds the legacy false/true resumes under today's default).
FREE_FIELDS = frozenset({"model.conv_impl", "model.zero_init_residual"})


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (what config.json holds), so saved and new compare equal."""
  return json.loads(config.to_json_best_effort())


def _merge(base: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
  for key, value in values.items():
    current = base.get(key) if key in base else None
    if isinstance(value, Mapping):
      if not isinstance(current, ml_collections.ConfigDict):
        base[key] = ml_collections.ConfigDict()
      _merge(base[key], value)
    elif isinstance(value, list) and isinstance(current, tuple):
      base[key] = tuple(value)
    else:
      base[key] = value


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config from its config.json dict (`config_to_dict`'s form), on today's defaults.

  JSON turns tuples into lists: a list where the schema holds a tuple becomes a tuple
  again. Fields the saved run predates keep their defaults; fields the schema no longer has
  are kept as saved; legacy values are kept as saved (the schema takes them, e.g.
  config.resolve_zero_init reads model.zero_init_residual's false / true).

  Args:
    saved: the parsed config.json of a workdir (or an export's 'config' header).

  Returns:
    An unlocked ConfigDict.
  """
  c = config_lib.base_config()
  c.unlock()
  _merge(c, saved)
  return c


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`, from its config.json (`config_from_json`).

  Raises:
    FileNotFoundError: no config.json: `workdir` is not a pretraining workdir.
  """
  path = file_io.join(workdir, CONFIG_FILE)
  if not file_io.is_file(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a pretraining workdir "
                            "(byol-jax pretrain writes config.json beside checkpoints/).")
  return config_from_json(file_io.read_json(path))


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """A nested dict as one level: {"optim": {"base_lr": 1.0}} -> {"optim.base_lr": 1.0}.

  Args:
    tree: nested mappings (a config as `config_to_dict` gives it).
    prefix: put before every key (the path of `tree` itself; '' at the top).

  Returns:
    Dotted field name -> leaf value.
  """
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def config_mismatches(saved: Mapping, current: Mapping) -> list[str]:
  """State-defining fields (STATE_DEFINING_FIELDS) whose values differ.

  Args:
    saved, current: configs as nested dicts (`config_to_dict`).

  Returns:
    Lines "field: saved X, now Y (what the field defines)" sorted by field; a field the
    saved config lacks counts as its schema default, one the current config lacks as a
    difference. Empty when the saved state can be resumed.
  """
  old, new = flatten(saved), flatten(current)
  # A field the saved run predates had the behaviour of its schema default (fields are added
  # with a default that keeps the old behaviour), so an absent saved field compares as that.
  defaults = flatten(config_to_dict(config_lib.base_config()))
  absent = object()
  lines = []
  for field in sorted(set(old) | set(new)):
    rule = None if field in FREE_FIELDS else next(
        (k for k in STATE_DEFINING_FIELDS
         if (field.startswith(k) if k.endswith(".") else field == k)), None)
    was, now = old.get(field, defaults.get(field, absent)), new.get(field, absent)
    if rule and (was is absent or now is absent or was != now):
      shown_was = repr(old[field]) if field in old else (
          "<absent>" if was is absent else f"<absent: default {was!r}>")
      lines.append(f"{field}: saved {shown_was}, now "
                   f"{'<absent>' if now is absent else repr(now)} ({STATE_DEFINING_FIELDS[rule]})")
  return lines


def check_config_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when workdir's config.json differs in a state-defining field.

  Writes nothing. A workdir without config.json passes.
  """
  path = file_io.join(workdir, CONFIG_FILE)
  if not file_io.exists(path):
    return
  saved = file_io.read_json(path)
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
    file_io.write_json_atomic(file_io.join(workdir, CONFIG_FILE), config_to_dict(config))
