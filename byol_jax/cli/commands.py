"""The `byol-jax` commands: each one a small function that reads its flags and calls the
library (no maths here), `run` for a command line, and `main`, the console entry point.

A command line is read and checked by command_line.parse before its command starts. Bad
input exits 2 with its whole message on stderr and no traceback; `byol-jax --help` and
`byol-jax COMMAND --help` print usage.
"""
import json
import logging as std_logging
import os
import pickle
import sys
import traceback
from typing import Callable

from absl import flags
from absl import logging
import jax

from byol_jax.cli import command_line
from byol_jax.data import prepare
from byol_jax.data import sources
from byol_jax.evaluation import finetune
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from byol_jax.jobs import sweep
from byol_jax.store import writers
from byol_jax.tools import bench
from byol_jax.tools import bench_input
from byol_jax.tools import bench_memory
from byol_jax.tools import preview
from byol_jax.weights import export

FLAGS = flags.FLAGS
# Bad input, as command_line raises it: main exits 2 on it with its message.
UsageError = command_line.UsageError


def _config_for_data():
  """The recipe with sizes and classes from its data set, its train split checked."""
  return sources.resolve_dataset(command_line.config(), reads=())


def _config_for_synthetic():
  """The recipe for benchmarks on synthetic data: resolved from its data set when that is
  prepared; else its sizes must be given, since the schedules and the probe need them."""
  c = command_line.config()
  try:
    return sources.resolve_dataset(c, reads=())
  except sources.DatasetNotPreparedError:
    pass
  if not c.dataset.num_classes:
    raise UsageError(f"data set {c.dataset.name!r} is not prepared, so the benchmark cannot take "
                     "the probe's class count from it: pass --config.dataset.num_classes=N.")
  if not c.num_steps and not c.dataset.num_train_examples:
    raise UsageError(f"data set {c.dataset.name!r} is not prepared, so the benchmark cannot take "
                     "the run length of its schedules from it: pass "
                     "--config.dataset.num_train_examples=N or --config.num_steps=N.")
  return c


def _maybe_initialize_distributed() -> None:
  """jax.distributed.initialize from flags, $JAX_* variables, or cluster auto-detection.

  The one start-up of the multi-host runtime: every command that computes on the devices
  (pretrain, linear-eval, knn, finetune, sweep) calls it once, after its own checks and
  before any device work; a sweep's runs then all run on every process.

  Failure handling (jax's coordination service): every process sends heartbeats to the
  service on process 0; one silent for --heartbeat_timeout seconds is declared dead and
  every other process is terminated (non-zero status, "Terminating process because the
  JAX distributed service detected fatal errors"); when process 0 itself dies, the others
  terminate as soon as their next heartbeat fails.
  """
  address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address is None and not FLAGS.distributed:
    return
  timeouts = dict(initialization_timeout=FLAGS.initialization_timeout,
                  heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
  if address is None:
    jax.distributed.initialize(**timeouts)
    return
  num = FLAGS.num_processes or os.environ.get("JAX_NUM_PROCESSES")
  pid = FLAGS.process_id if FLAGS.process_id is not None else os.environ.get("JAX_PROCESS_ID")
  if num is None or pid is None:
    raise UsageError("multi-host: with a coordinator address also give --num_processes and "
                     "--process_id (or $JAX_NUM_PROCESSES and $JAX_PROCESS_ID).")
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                             process_id=int(pid), **timeouts)


def _pretrain(args: list[str]) -> None:
  if args:
    raise UsageError(f"pretrain takes no positional arguments, got {args}.")
  if not FLAGS.workdir:
    raise UsageError("--workdir is required: where checkpoints and logs go.")
  c = command_line.config()
  _maybe_initialize_distributed()
  result = loop.pretrain(c, FLAGS.workdir)
  if jax.process_index() == 0:
    state = "stopped early (preempted); rerun the same command to resume" if result["preempted"] else "done"
    print(f"pretrain {state} at step {result['step']}.")
    for key in ("eval_top1", "eval_top5"):
      if key in result:
        print(f"  online probe {key[5:]} on {c.dataset.eval_split}: {result[key]:.2%}")
    print(f"  checkpoints: {FLAGS.workdir}/checkpoints\n  metrics:     {writers.metrics_url(FLAGS.workdir)}\n"
          f"  TensorBoard: tensorboard --logdir={FLAGS.workdir}")


def _prepare_data(args: list[str]) -> None:
  if args == ["fashion_mnist"]:
    kwargs = {"data_dir": FLAGS.data_dir}
    if FLAGS.source:
      kwargs["source_dir"] = FLAGS.source
    print(f"fashion_mnist ready in {prepare.prepare_fashion_mnist(**kwargs)}")
  elif args == ["image_folder"]:
    if not FLAGS.source or not FLAGS.name:
      raise UsageError("prepare-data image_folder needs --source=DIR (class subfolders) and "
                       "--name=NAME (the tfds name to use as --config.dataset.name).")
    report = prepare.prepare_image_folder(FLAGS.source, FLAGS.name, FLAGS.data_dir)
    print(f"{FLAGS.name} ready in {report.data_dir}: splits {report.split_sizes}, "
          f"{len(report.class_names)} classes, {len(report.skipped)} unreadable files skipped")
  else:
    raise UsageError(f"prepare-data takes one source; valid: ['fashion_mnist', 'image_folder'], "
                     f"got {args}.")


def _preview(args: list[str]) -> None:
  if args or not FLAGS.out:
    raise UsageError("usage: byol-jax preview --config=FILE --out=views.png [--num_images=8]")
  path = preview.write_preview(_config_for_data(), FLAGS.out, FLAGS.num_images)
  print(f"wrote {path}: rows of [crop 1 | view 1 | crop 2 | view 2]")


def _bench(args: list[str]) -> None:
  what = args[0] if args else None
  if what == "step":
    figures = bench.step_benchmark(_config_for_synthetic(), FLAGS.bench_steps, FLAGS.bench_rounds,
                                   FLAGS.channels)
  elif what == "input":
    figures = bench_input.input_benchmark(command_line.config())
  elif what == "memory":
    figures = bench_memory.memory_benchmark(_config_for_synthetic(), FLAGS.memory_budget_gb,
                                            FLAGS.channels)
  else:
    raise UsageError(f"unknown benchmark {what!r}; valid: ['input', 'memory', 'step'].")
  print(json.dumps(figures))


def _require(**named) -> None:
  missing = [f"--{name}" for name, value in named.items() if not value]
  if missing:
    raise UsageError(f"{' and '.join(missing)} required; see `byol-jax help`.")


def _evaluation(module, function: str):
  def command(args: list[str]) -> None:
    if args:
      raise UsageError(f"unexpected positional arguments {args}.")
    _require(pretrained=FLAGS.pretrained, workdir=FLAGS.workdir)
    c = command_line.config()
    _maybe_initialize_distributed()
    # Looked up per call, so a test's stand-in for the function is the one that runs.
    getattr(module, function)(c, FLAGS.pretrained, FLAGS.workdir)
  return command


def _export(args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected positional arguments {args}.")
  if bool(FLAGS.workdir) == bool(FLAGS.from_release):
    raise UsageError("export needs exactly one of --workdir=DIR (a pretraining run) and "
                     "--from_release=FILE.pkl (an authors' release checkpoint).")
  _require(out=FLAGS.out)
  path = export.export(FLAGS.workdir or FLAGS.from_release, FLAGS.out, FLAGS.format)
  print(f"wrote {path} ({FLAGS.format} format)")


def _sweep(args: list[str], overrides: list[str]) -> None:
  if len(args) != 1:
    raise UsageError("usage: byol-jax sweep experiments/FILE.py --base=configs/RECIPE.py "
                     "--workdir=DIR [--run=I | --collect | --print_commands] "
                     "[--config.key=value ...]")
  _require(base=FLAGS.base, workdir=FLAGS.workdir)
  if not (FLAGS.print_commands or FLAGS.collect):  # Those compute nothing on devices.
    _maybe_initialize_distributed()
  # The multi-host flags as given, for the printed commands (a default stays implicit).
  launch_flags = [FLAGS[name].serialize() for name in command_line.MULTIHOST
                  if FLAGS[name].present]
  status = sweep.main_like(args[0], FLAGS.base, FLAGS.workdir, overrides=overrides,
                           print_commands=FLAGS.print_commands, run=FLAGS.run,
                           collect_only=FLAGS.collect, launch_flags=launch_flags)
  if status:
    raise SystemExit(status)


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "linear-eval": _evaluation(linear_eval, "run"),
    "knn": _evaluation(linear_eval, "knn_run"),
    "finetune": _evaluation(finetune, "run"),
    "export": _export,
    "pretrain": _pretrain,
    "prepare-data": _prepare_data,
    "preview": _preview,
    "bench": _bench,
}


def run(argv: list[str]) -> None:
  """Parses `argv` (program name first) and runs the subcommand; raises on bad input."""
  line = command_line.parse(argv)
  if line.help:
    print(command_line.command_usage(line.command) if line.command else command_line.USAGE)
  elif line.command == "sweep":
    _sweep(line.args, list(line.overrides))
  else:
    COMMANDS[line.command](line.args)


class _DropDeprecationNotices(std_logging.Filter):
  """tfds logs a deprecation notice per feature access; they bury the progress lines."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "is deprecated" not in record.getMessage()


def _exit_multiprocess_job(status: int) -> None:
  """Exits at once when this is one process of several: a normal exit would wait in
  jax.distributed.shutdown's barrier for peers that may be stuck in a collective; this
  way the coordination service sees the process gone and stops the peers too."""
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> None:
  """Console entry point: exit 0 on success, 2 on bad input (its whole message on stderr,
  no traceback: a refused resume names each field, both values and the fix on lines of
  their own), 1 on any other error (with its traceback)."""
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").addFilter(_DropDeprecationNotices())
  try:
    run(list(sys.argv if argv is None else argv))
  except (UsageError, ValueError, FileNotFoundError, pickle.UnpicklingError) as e:
    print(f"byol-jax: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
    _exit_multiprocess_job(2)
    sys.exit(2)
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    _exit_multiprocess_job(1)
    sys.exit(1)
