"""What a sweep is: an experiments/ file's runs over a recipe, each config built and validated.

A sweep file is plain Python with `get_sweep() -> list[dict]`, each dict
`{'name': 'tau_0.9', 'overrides': {'target.tau_base': 0.9, ...}}` (dotted config fields).
Each run's config is the recipe, then the command line's `--config.key=value` overrides,
then the run's own overrides (the run wins). Every run is built and validated before the
first one starts, so a misspelt field fails at once, naming it.
"""
import ast
import dataclasses
import importlib.util
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import ml_collections

from byol_jax import config as config_lib

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, its own overrides and its full, validated config."""
  name: str
  overrides: Mapping[str, Any]
  config: ml_collections.ConfigDict


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_recipe(spec: str) -> ml_collections.ConfigDict:
  """'configs/recipe.py[:arg]' -> the recipe's locked config, as `--config=` would load it."""
  path, _, arg = spec.partition(":")
  module = _load_module(path, "recipe")
  if not hasattr(module, "get_config"):
    raise ValueError(f"recipe {path!r} has no get_config(arg=None) function.")
  return module.get_config(arg) if arg else module.get_config()


def load_sweep(path: str) -> list[dict]:
  """Reads a sweep file's `get_sweep()` and checks its shape (names unique and path-safe).

  Returns:
    [{'name': str, 'overrides': {dotted field: value}}], in the file's order.
  """
  module = _load_module(path, "sweep")
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"sweep file {path!r} has no get_sweep() function returning "
                     "[{'name': ..., 'overrides': {...}}, ...].")
  runs, seen = list(module.get_sweep()), set()
  if not runs:
    raise ValueError(f"sweep file {path!r}: get_sweep() returned no runs.")
  for run in runs:
    if not isinstance(run, Mapping) or set(run) != {"name", "overrides"}:
      raise ValueError(f"sweep file {path!r}: each run must be a dict with exactly the keys "
                       f"'name' and 'overrides', got {run!r}.")
    name = run["name"]
    if not isinstance(name, str) or not _NAME.match(name):
      raise ValueError(f"sweep file {path!r}: run name {name!r} must be letters, digits, "
                       "'_', '.' or '-' (it names the run's directory).")
    if name in seen:
      raise ValueError(f"sweep file {path!r}: run name {name!r} appears twice.")
    seen.add(name)
  return runs


def parse_cli_overrides(args: Sequence[str]) -> dict[str, str]:
  """['--config.optim.base_lr=0.5', ...] -> {'optim.base_lr': '0.5'} (values still strings)."""
  out = {}
  for arg in args:
    match = re.match(r"^--config\.([A-Za-z0-9_.]+)=(.*)$", arg)
    if not match:
      raise ValueError(f"override {arg!r} is not of the form --config.key=value.")
    out[match.group(1)] = match.group(2)
  return out


def _from_string(text: str, current: Any, key: str) -> Any:
  """A command-line string as the type of the field's current value."""
  if isinstance(current, bool):
    if text.lower() in ("true", "1"):
      return True
    if text.lower() in ("false", "0"):
      return False
    raise ValueError(f"config field {key!r} is a bool; got {text!r} (use true or false).")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"config field {key!r}: cannot read {text!r} as a "
                     f"{type(current).__name__}.") from None
  return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    source: str) -> ml_collections.ConfigDict:
  """A copy of `c` with dotted-field overrides; strings are read as the field's type.

  Raises:
    ValueError: naming `source`, the field and the fix (unknown field, wrong type).
  """
  c = c.copy_and_resolve_references()
  for key, value in overrides.items():
    parts = key.split(".")
    node = c
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(parts[:depth]) or "the top level"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ValueError(f"{source}: unknown config field {key!r}; valid fields under "
                         f"{where}: {valid}.")
      if depth < len(parts) - 1:
        node = node[part]
    leaf = parts[-1]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ValueError(f"{source}: {key!r} is a section, not a field; override its fields "
                       f"({sorted(current.keys())}) one by one.")
    if isinstance(value, str) and not isinstance(current, str):
      value = _from_string(value, current, key)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ValueError(f"{source}: config field {key!r} cannot take {value!r}: {e}") from None
  c.lock()
  return c


def expand(sweep: Sequence[Mapping], base: ml_collections.ConfigDict) -> list[Run]:
  """Every run's config (base + run overrides), each validated; fails before any run starts."""
  runs = []
  for run in sweep:
    source = f"sweep run {run['name']!r}"
    c = apply_overrides(base, run["overrides"], source)
    try:
      config_lib.validate(c)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
    runs.append(Run(run["name"], dict(run["overrides"]), c))
  return runs
