"""A sweep's table: each run's row from its directory, and results.csv, .md and .png.

A finished run's row is in WORKDIR/name/sweep_run.json; a run finished by the `pretrain`
and `linear-eval` commands instead has its linear evaluation's result in
WORKDIR/name/linear. Every row also carries the last values of the run's metrics.
"""
import csv
import io
from typing import Any, Callable, Mapping, Sequence

from matplotlib.figure import Figure
import jax

from byol_jax import config as config_lib
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import sweep_spec
from byol_jax.store import files
from byol_jax.store import run_config
from byol_jax.store import writers

PrintFn = Callable[[str], None]

DONE_FILE = "sweep_run.json"
# Fields resolve_dataset fills in from the data where the recipe leaves them 0.
_RESOLVED_FIELDS = ("dataset.num_train_examples", "dataset.num_classes")
# Metrics of a run (writers.read_metrics) whose last value goes in the table (key -> column).
FINAL_METRICS = {"loss": "loss", "collapse_std": "collapse_std", "probe_top1": "probe_top1",
                 "eval_top1": "probe_eval_top1"}
COLUMNS = ("name", "status", "linear_top1", "linear_top5", "linear_lr", "probe_eval_top1",
           "probe_top1", "loss", "collapse_std", "step", "overrides", "error")


def is_writer() -> bool:
  """Whether this process writes the sweep's files: process 0 of a multi-host job (asked
  only when jax.distributed is initialised, so a single process never starts a backend)."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


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


def linear_row(run_dir: str, linear: Mapping[str, Any]) -> dict:
  """A finished run's table row from its metrics and its linear evaluation's result."""
  return dict(final_metrics(read_metrics(run_dir)), status="done", linear_top1=linear["top1"],
              linear_top5=linear["top5"],
              # linear_eval.run names the chosen base lr 'learning_rate'.
              linear_lr=linear.get("lr", linear.get("learning_rate")))


def _linear_result_row(run: sweep_spec.Run, run_dir: str) -> tuple[dict | None, str]:
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
  return linear_row(run_dir, result), ""


def collect_row(run: sweep_spec.Run, workdir: str) -> dict:
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


def collect(runs: Sequence[sweep_spec.Run], workdir: str,
            print_fn: PrintFn = print) -> list[dict]:
  """Tabulates (results.csv, .md, .png) the runs finished in workdir, running nothing.

  Returns:
    One row per run (COLUMNS), in the sweep's order (see `collect_row`).
  """
  rows = blank_rows(runs, "missing")
  for run, row in zip(runs, rows):
    row.update(collect_row(run, workdir))
  lines = _not_finished(rows)
  write_results(rows, runs, workdir, not_finished=lines)
  print_fn(f"[sweep] collected {len(rows) - len(lines)} of {len(rows)} runs.")
  if lines:
    print_fn(f"[sweep] not finished ({len(lines)}):\n  " + "\n  ".join(lines))
  return rows


def _cli_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def _overrides_text(overrides: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={_cli_value(v)}" for k, v in overrides.items()) or "(recipe)"


def blank_rows(runs: Sequence[sweep_spec.Run], status: str) -> list[dict]:
  return [dict(name=r.name, status=status, overrides=_overrides_text(r.overrides)) for r in runs]


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def write_results(rows: Sequence[dict], runs: Sequence[sweep_spec.Run], workdir: str,
                  not_finished: Sequence[str] = ()) -> None:
  """results.csv (every column), results.md (a table; then the `not_finished` lines as a
  list) and results.png in `workdir` (process 0 of a multi-host job only)."""
  if not is_writer():
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
