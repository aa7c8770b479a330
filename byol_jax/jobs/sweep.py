"""Sweeps: expand an experiments/ file over a recipe, run or resume each run, tabulate results.

A sweep file is plain Python with `get_sweep() -> list[dict]`, each dict
`{'name': 'tau_0.9', 'overrides': {'target.tau_base': 0.9, ...}}` (dotted config fields).
Each run's config is the recipe, then the command line's `--config.key=value` overrides,
then the run's own overrides (the run wins). Every run is built and validated before the
first one starts, so a misspelt field fails at once, naming it.

Run `name` lives in WORKDIR/name/: pretraining there (rerunning resumes it), linear
evaluation in WORKDIR/name/linear, `sweep_pretrained.json` once pretraining is done (a
rerun goes straight to the linear evaluation) and `sweep_run.json` once both are done (a
finished run is skipped on rerun). WORKDIR gets results.csv, results.md and results.png.

On a cluster each run is a job of its own: `--run=I` runs run I alone (the same directory,
the same resumption, no table: concurrent runs would race on it), `--print-commands` prints
those commands, and `--collect` tabulates whatever runs have finished, from their
directories, running nothing.
"""
import ast
import csv
import dataclasses
import importlib.util
import io
import os
import pathlib
import re
import shlex
import traceback
from typing import Any, Callable, Mapping, Sequence

from matplotlib.figure import Figure
import jax
import ml_collections

from byol_jax import config as config_lib
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from byol_jax.store import files
from byol_jax.store import run_config
from byol_jax.store import writers

PrintFn = Callable[[str], None]
PretrainFn = Callable[..., dict]  # (config, workdir, print_fn) -> result dict.
# (config, pretrained=, workdir=, print_fn=) -> {top1, top5, learning_rate (or lr)}.
EvalFn = Callable[..., dict]

DONE_FILE = "sweep_run.json"
PRETRAINED_FILE = "sweep_pretrained.json"
# Fields resolve_dataset fills in from the data where the recipe leaves them 0.
_RESOLVED_FIELDS = ("dataset.num_train_examples", "dataset.num_classes")
# Metrics of a run (writers.read_metrics) whose last value goes in the table (key -> column).
FINAL_METRICS = {"loss": "loss", "collapse_std": "collapse_std", "probe_top1": "probe_top1",
                 "eval_top1": "probe_eval_top1"}
COLUMNS = ("name", "status", "linear_top1", "linear_top5", "linear_lr", "probe_eval_top1",
           "probe_top1", "loss", "collapse_std", "step", "overrides", "error")
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


def _cli_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def run_commands(runs: Sequence[Run], sweep_path: str, base_spec: str,
                 base_overrides: Sequence[str], workdir: str,
                 launch_flags: Sequence[str] = ()) -> list[str]:
  """One shell line per run, line I running run I: `byol-jax sweep SWEEP --run=I ...`.

  The sweep's own command rather than `pretrain && linear-eval`: one command per job, which
  resumes pretraining, skips an evaluation already done and marks the run finished for
  `--collect`; a preempted pretraining stops it instead of evaluating a partial encoder.

  Args:
    runs: the expanded sweep (only its length is used; the sweep file names the runs).
    sweep_path, base_spec, workdir: as given to the sweep.
    base_overrides: the command line's '--config.key=value' strings, as given.
    launch_flags: further flags for every line (the multi-host ones), as given.
  """
  return [shlex.join(["byol-jax", "sweep", sweep_path, f"--run={index}", f"--base={base_spec}",
                      f"--workdir={workdir}", *base_overrides, *launch_flags])
          for index in range(len(runs))]


def read_metrics(run_dir: str) -> dict[int, dict]:
  """A run's metrics (writers.read_metrics) as {step: merged metrics}, later rows winning
  (a resume repeats steps)."""
  by_step: dict[int, dict] = {}
  for record in writers.read_metrics(run_dir):
    by_step.setdefault(int(record["step"]), {}).update(record)
  return dict(sorted(by_step.items()))


def final_metrics(by_step: Mapping[int, dict]) -> dict:
  """The last non-null value of each FINAL_METRICS key (by table column), and the last step."""
  out = {column: None for column in FINAL_METRICS.values()}
  out["step"] = max(by_step) if by_step else None
  for record in by_step.values():
    for key, column in FINAL_METRICS.items():
      if record.get(key) is not None:
        out[column] = record[key]
  return out


def _default_pretrain(c, workdir, print_fn):
  return loop.pretrain(c, workdir, print_fn)


def _default_linear_eval(c, pretrained, workdir, print_fn):
  return linear_eval.run(c, pretrained=pretrained, workdir=workdir, print_fn=print_fn)


def _is_writer() -> bool:
  """Whether this process writes the sweep's files: process 0 of a multi-host job (asked
  only when jax.distributed is initialised, so a single process never starts a backend)."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def _linear_row(run_dir: str, linear: Mapping[str, Any]) -> dict:
  """A finished run's table row from its metrics and its linear evaluation's result."""
  return dict(final_metrics(read_metrics(run_dir)), status="done", linear_top1=linear["top1"],
              linear_top5=linear["top5"],
              # linear_eval.run names the chosen base lr 'learning_rate'.
              linear_lr=linear.get("lr", linear.get("learning_rate")))


def _run_one(run: Run, run_dir: str, pretrain_fn: PretrainFn, eval_fn: EvalFn,
             print_fn: PrintFn) -> dict:
  """Pretrains (or resumes) and evaluates one run; returns its table row."""
  done_path = files.join(run_dir, DONE_FILE)
  pretrained_path = files.join(run_dir, PRETRAINED_FILE)
  digest = config_lib.config_hash(run.config)
  if files.exists(done_path):
    done = files.read_json(done_path)
    if done["config_hash"] != digest:
      raise ValueError(f"{run_dir} holds a finished run of a different config; use another "
                       "--workdir or delete that run directory.")
    print_fn(f"[sweep] {run.name}: finished earlier, skipped.")
    return dict(done["row"], status="done")
  if (files.exists(pretrained_path)
      and files.read_json(pretrained_path)["config_hash"] == digest):
    print_fn(f"[sweep] {run.name}: pretrained earlier, not evaluated yet.")
  else:
    print_fn(f"[sweep] {run.name}: pretraining in {run_dir}")
    result = pretrain_fn(run.config, run_dir, print_fn)
    if result.get("preempted"):
      return dict(status="preempted")
    if _is_writer():
      files.write_json_atomic(pretrained_path, dict(config_hash=digest))
  print_fn(f"[sweep] {run.name}: linear evaluation in {run_dir}/linear")
  linear = eval_fn(run.config, pretrained=run_dir, workdir=files.join(run_dir, "linear"),
                   print_fn=print_fn)
  row = _linear_row(run_dir, linear)
  if _is_writer():
    files.write_json_atomic(done_path, dict(config_hash=digest, row=row))
  return row


def _attempt(run: Run, workdir: str, pretrain_fn: PretrainFn, eval_fn: EvalFn,
             print_fn: PrintFn) -> dict:
  """`_run_one` in workdir/run.name, a raise recorded as status 'failed' with its error."""
  try:
    return _run_one(run, files.join(workdir, run.name), pretrain_fn, eval_fn, print_fn)
  except Exception as e:  # noqa: BLE001  One bad run must not stop the sweep.
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    print_fn(f"[sweep] {run.name}: FAILED: {message}\n{traceback.format_exc()}")
    return dict(status="failed", error=message)


def _blank_rows(runs: Sequence[Run], status: str) -> list[dict]:
  return [dict(name=r.name, status=status, overrides=_overrides_text(r.overrides)) for r in runs]


def run_sweep(runs: Sequence[Run], workdir: str, pretrain_fn: PretrainFn, eval_fn: EvalFn,
              print_fn: PrintFn = print) -> list[dict]:
  """Runs every run in order; a run that raises is recorded as failed and the sweep goes on.

  The results files are rewritten after every run, so a long sweep shows its progress. A
  preempted run (SIGTERM) stops the sweep: rerun the same command to resume it.

  Returns:
    One row per run (COLUMNS), in the sweep's order; runs not reached have status 'pending'.
  """
  rows = _blank_rows(runs, "pending")
  for run, row in zip(runs, rows):
    row.update(_attempt(run, workdir, pretrain_fn, eval_fn, print_fn))
    write_results(rows, runs, workdir)
    if row["status"] == "preempted":
      print_fn("[sweep] stopped (preempted); rerun the same command to resume.")
      break
  return rows


def _linear_result_row(run: Run, run_dir: str) -> tuple[dict | None, str]:
  """A run finished by `pretrain` and `linear-eval` commands (no DONE_FILE): its row from
  linear/results.json when that evaluated this run's config after its last step, else
  (None, why not)."""
  path = files.join(run_dir, "linear", linear_eval.RESULTS_FILE)
  if not files.exists(path):
    return None, ""
  result = files.read_json(path)
  mine = run_config.flatten(run_config.config_to_dict(run.config))
  theirs = run_config.flatten(result.get("config", {}))
  differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                  and not (k in _RESOLVED_FIELDS and mine.get(k) == 0))
  if differ:
    return None, (f"{path} evaluated another config (fields {', '.join(differ[:5])}); "
                  "delete it or use another --workdir.")
  total = config_lib.total_steps(run_config.config_from_json(result["config"]))
  if result.get("pretrained_step") != total:
    return None, (f"{path} evaluated step {result.get('pretrained_step')} of {total}: "
                  "pretraining had not finished.")
  return _linear_row(run_dir, result), ""


def collect_row(run: Run, workdir: str) -> dict:
  """Run `run`'s row from its directory, running nothing.

  'done' (from sweep_run.json, or from linear/results.json for a run finished by the
  pretrain and linear-eval commands), 'missing' (no run directory) or 'unfinished' (its
  last step and metrics so far; the error column says why when a finished run there is
  of another config).
  """
  run_dir = files.join(workdir, run.name)
  if not files.exists(run_dir):
    return dict(status="missing")
  done_path = files.join(run_dir, DONE_FILE)
  why = ""
  if files.exists(done_path):
    done = files.read_json(done_path)
    if done["config_hash"] == config_lib.config_hash(run.config):
      return dict(done["row"], status="done")
    why = f"{done_path} is a finished run of a different config; use another --workdir."
  else:
    row, why = _linear_result_row(run, run_dir)
    if row is not None:
      return row
  return dict(final_metrics(read_metrics(run_dir)), status="unfinished", error=why or None)


def _not_finished(rows: Sequence[dict]) -> list[str]:
  """'NAME: missing (no run directory)' / 'NAME: unfinished (last step S)' per open run."""
  lines = []
  for row in rows:
    if row["status"] == "missing":
      lines.append(f"{row['name']}: missing (no run directory)")
    elif row["status"] != "done":
      step = "no step logged" if row.get("step") is None else f"last step {row['step']}"
      error = f"; {row['error']}" if row.get("error") else ""
      lines.append(f"{row['name']}: {row['status']} ({step}{error})")
  return lines


def collect(runs: Sequence[Run], workdir: str, print_fn: PrintFn = print) -> list[dict]:
  """Tabulates (results.csv, .md, .png) the runs finished in workdir, running nothing.

  Returns:
    One row per run (COLUMNS), in the sweep's order (see `collect_row`).
  """
  rows = _blank_rows(runs, "missing")
  for run, row in zip(runs, rows):
    row.update(collect_row(run, workdir))
  lines = _not_finished(rows)
  write_results(rows, runs, workdir, not_finished=lines)
  print_fn(f"[sweep] collected {len(rows) - len(lines)} of {len(rows)} runs.")
  if lines:
    print_fn(f"[sweep] not finished ({len(lines)}):\n  " + "\n  ".join(lines))
  return rows


def _overrides_text(overrides: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={_cli_value(v)}" for k, v in overrides.items()) or "(recipe)"


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def write_results(rows: Sequence[dict], runs: Sequence[Run], workdir: str,
                  not_finished: Sequence[str] = ()) -> None:
  """results.csv (every column), results.md (a table; then the `not_finished` lines as a
  list) and results.png in `workdir` (process 0 of a multi-host job only)."""
  if not _is_writer():
    return
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=COLUMNS)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in COLUMNS})
  files.write_text_atomic(files.join(workdir, "results.csv"), table.getvalue())
  md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  md += ["| " + " | ".join(_cell(row.get(k)).replace("|", "\\|") for k in COLUMNS) + " |"
         for row in rows]
  if not_finished:
    md += ["", f"Not finished ({len(not_finished)} of {len(rows)} runs):", "",
           *(f"- {line}" for line in not_finished)]
  files.write_text_atomic(files.join(workdir, "results.md"), "\n".join(md) + "\n")
  curves = {run.name: read_metrics(files.join(workdir, run.name)) for run in runs}
  plot_results(rows, curves, files.join(workdir, "results.png"))


def plot_results(rows: Sequence[dict], curves: Mapping[str, Mapping[int, dict]],
                 path: str) -> None:
  """PNG: linear top-1 per run (bars), and loss and probe top-1 against step per run."""
  # A bare Figure, not pyplot: it draws to a file with no display (clusters have none) and
  # sets no process-wide backend, so importing this module changes nothing for its caller.
  fig = Figure(figsize=(16, 4.5))
  axes = fig.subplots(1, 3)
  names = [row["name"] for row in rows]
  top1 = [row.get("linear_top1") or 0.0 for row in rows]
  bars = axes[0].bar(range(len(names)), [100 * t for t in top1], color="tab:blue")
  for bar, row in zip(bars, rows):
    label = f"{100 * row['linear_top1']:.1f}" if row.get("linear_top1") is not None else row["status"]
    axes[0].annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=8)
  axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  axes[0].set(title="linear evaluation", ylabel="top-1 (%)")
  for ax, key, title in ((axes[1], "loss", "BYOL loss"), (axes[2], "probe_top1",
                                                           "online probe top-1 (train)")):
    for name in names:
      points = [(s, m[key]) for s, m in curves.get(name, {}).items() if m.get(key) is not None]
      if points:
        ax.plot(*zip(*points), label=name)
    ax.set(title=title, xlabel="step")
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=80)
  files.write_bytes_atomic(path, png.getvalue())


def select_run(runs: Sequence[Run], index: int, sweep_path: str) -> Run:
  """runs[index] for `--run=index` (0-based, no negative indices).

  Raises:
    ValueError: index out of range, naming the valid range and the runs.
  """
  if not 0 <= index < len(runs):
    names = ", ".join(f"{i}={r.name}" for i, r in enumerate(runs))
    raise ValueError(f"--run={index} is out of range: {sweep_path} has {len(runs)} runs, so "
                     f"--run takes 0 to {len(runs) - 1} ({names}).")
  return runs[index]


def main_like(sweep_path: str, base: str, workdir: str, overrides: Sequence[str] = (),
              print_commands: bool = False, run: int | None = None, collect_only: bool = False,
              launch_flags: Sequence[str] = (), pretrain_fn: PretrainFn | None = None,
              eval_fn: EvalFn | None = None, print_fn: PrintFn = print) -> int:
  """`byol-jax sweep SWEEP --base=RECIPE[:arg] --workdir=DIR [--run=I | --collect |
  --print-commands] [--config.k=v]`.

  Args:
    sweep_path: experiments/<sweep>.py.
    base: the recipe, 'configs/<recipe>.py[:arg]'.
    workdir: the sweep's directory; run NAME goes to workdir/NAME.
    overrides: command-line '--config.key=value' strings, applied to every run.
    print_commands: print one shell command per run (`--run=I`) and run nothing.
    run: run only run `run` (0-based, the sweep file's order) and write no table; its
      errors propagate.
    collect_only: tabulate the runs finished in workdir and run nothing.
    launch_flags: flags that `print_commands` adds to every line (the multi-host ones).
    pretrain_fn, eval_fn: injectable for tests (default: loop.pretrain, linear_eval.run).
    print_fn: console output.

  Returns:
    The exit status: 0 when every run (with `run`: that run) finished, 1 when one failed
    or was preempted, or (with `collect_only`) is missing or unfinished.

  Raises:
    ValueError, FileNotFoundError: bad sweep, recipe, override or `run` index, or more than
      one of print_commands, run and collect_only, before any run starts.
  """
  modes = [name for name, on in (("--print-commands", print_commands),
                                 ("--run", run is not None), ("--collect", collect_only)) if on]
  if len(modes) > 1:
    raise ValueError(f"{' and '.join(modes)} exclude each other: give one of them.")
  cli_overrides = parse_cli_overrides(overrides)
  base_config = apply_overrides(load_recipe(base), cli_overrides, "--config override")
  runs = expand(load_sweep(sweep_path), base_config)
  if print_commands:
    for line in run_commands(runs, sweep_path, base, overrides, workdir, launch_flags):
      print_fn(line)
    return 0
  pretrain_fn, eval_fn = pretrain_fn or _default_pretrain, eval_fn or _default_linear_eval
  if run is not None:
    # One run is one job: its errors propagate as `byol-jax pretrain`'s do (bad input exits
    # 2 with its message, any other error 1 with its traceback).
    chosen = select_run(runs, run, sweep_path)
    status = _run_one(chosen, files.join(workdir, chosen.name), pretrain_fn, eval_fn,
                      print_fn)["status"]
    print_fn(f"[sweep] run {run} ({chosen.name}): " + (
        "done; `--collect` tabulates the finished runs." if status == "done" else
        "stopped (preempted); rerun the same command to resume."))
    return 0 if status == "done" else 1
  if collect_only:
    rows = collect(runs, workdir, print_fn)
  else:
    rows = run_sweep(runs, workdir, pretrain_fn, eval_fn, print_fn)
  print_fn(f"[sweep] results: {workdir}/results.md, results.csv, results.png")
  return 0 if all(row["status"] == "done" for row in rows) else 1
