"""Sweeps: run or resume each run of a sweep, evaluate it, tabulate the results.

What a sweep file holds and how each run's config is built: sweep_spec.py. The table and
its files: sweep_results.py.

Run `name` lives in WORKDIR/name/: pretraining there (rerunning resumes it), linear
evaluation in WORKDIR/name/linear, `sweep_pretrained.json` once pretraining is done (a
rerun goes straight to the linear evaluation) and `sweep_run.json` once both are done (a
finished run is skipped on rerun). WORKDIR gets results.csv, results.md and results.png.

On a cluster each run is a job of its own: `--run=I` runs run I alone (the same directory,
the same resumption, no table: concurrent runs would race on it), `--print-commands` prints
those commands, and `--collect` tabulates whatever runs have finished, from their
directories, running nothing.
"""
import shlex
import traceback
from typing import Callable, Sequence

from byol_jax import config as config_lib
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from byol_jax.jobs import sweep_results
from byol_jax.jobs import sweep_spec
from byol_jax.store import files

PrintFn = Callable[[str], None]
PretrainFn = Callable[..., dict]  # (config, workdir, print_fn) -> result dict.
# (config, pretrained=, workdir=, print_fn=) -> {top1, top5, learning_rate (or lr)}.
EvalFn = Callable[..., dict]

PRETRAINED_FILE = "sweep_pretrained.json"


def run_commands(runs: Sequence[sweep_spec.Run], sweep_path: str, base_spec: str,
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


def _default_pretrain(c, workdir, print_fn):
  return loop.pretrain(c, workdir, print_fn)


def _default_linear_eval(c, pretrained, workdir, print_fn):
  return linear_eval.run(c, pretrained=pretrained, workdir=workdir, print_fn=print_fn)


def _run_one(run: sweep_spec.Run, run_dir: str, pretrain_fn: PretrainFn,
             eval_fn: EvalFn, print_fn: PrintFn) -> dict:
  """Pretrains (or resumes) and evaluates one run; returns its table row."""
  done_path = files.join(run_dir, sweep_results.DONE_FILE)
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
    if sweep_results.is_writer():
      files.write_json_atomic(pretrained_path, dict(config_hash=digest))
  print_fn(f"[sweep] {run.name}: linear evaluation in {run_dir}/linear")
  linear = eval_fn(run.config, pretrained=run_dir, workdir=files.join(run_dir, "linear"),
                   print_fn=print_fn)
  row = sweep_results.linear_row(run_dir, linear)
  if sweep_results.is_writer():
    files.write_json_atomic(done_path, dict(config_hash=digest, row=row))
  return row


def _attempt(run: sweep_spec.Run, workdir: str, pretrain_fn: PretrainFn,
             eval_fn: EvalFn, print_fn: PrintFn) -> dict:
  """`_run_one` in workdir/run.name, a raise recorded as status 'failed' with its error."""
  try:
    return _run_one(run, files.join(workdir, run.name), pretrain_fn, eval_fn, print_fn)
  except Exception as e:  # noqa: BLE001  One bad run must not stop the sweep.
    message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    print_fn(f"[sweep] {run.name}: FAILED: {message}\n{traceback.format_exc()}")
    return dict(status="failed", error=message)


def run_sweep(runs: Sequence[sweep_spec.Run], workdir: str, pretrain_fn: PretrainFn,
              eval_fn: EvalFn, print_fn: PrintFn = print) -> list[dict]:
  """Runs every run in order; a run that raises is recorded as failed and the sweep goes on.

  The results files are rewritten after every run, so a long sweep shows its progress. A
  preempted run (SIGTERM) stops the sweep: rerun the same command to resume it.

  Returns:
    One row per run (sweep_results.COLUMNS), in the sweep's order; runs not reached have
    status 'pending'.
  """
  rows = sweep_results.blank_rows(runs, "pending")
  for run, row in zip(runs, rows):
    row.update(_attempt(run, workdir, pretrain_fn, eval_fn, print_fn))
    sweep_results.write_results(rows, runs, workdir)
    if row["status"] == "preempted":
      print_fn("[sweep] stopped (preempted); rerun the same command to resume.")
      break
  return rows


def select_run(runs: Sequence[sweep_spec.Run], index: int, sweep_path: str) -> sweep_spec.Run:
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
  cli_overrides = sweep_spec.parse_cli_overrides(overrides)
  base_config = sweep_spec.apply_overrides(sweep_spec.load_recipe(base), cli_overrides,
                                           "--config override")
  runs = sweep_spec.expand(sweep_spec.load_sweep(sweep_path), base_config)
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
    rows = sweep_results.collect(runs, workdir, print_fn)
  else:
    rows = run_sweep(runs, workdir, pretrain_fn, eval_fn, print_fn)
  print_fn(f"[sweep] results: {workdir}/results.md, results.csv, results.png")
  return 0 if all(row["status"] == "done" for row in rows) else 1
