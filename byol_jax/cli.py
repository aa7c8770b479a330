"""The `byol-jax` command: subcommands, flag parsing and dispatch.

The only module that defines flags. Each subcommand is a small function that reads
flags and calls the library; no maths here. Bad input exits non-zero with one line on
stderr.
"""
import json
import sys
from typing import Callable

from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/byol_imagenet.py[:arg]; fields are overridden "
    "with --config.key=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard.")
flags.DEFINE_integer("bench_steps", 5, "bench: timed steps per round.")
flags.DEFINE_integer("bench_rounds", 3, "bench: alternating timing rounds.")
flags.DEFINE_integer("channels", 3, "Image channels for benchmarks on synthetic data.")

USAGE = """usage: byol-jax COMMAND [--flags]

commands:
  bench step   --config=FILE [--config.key=value ...]   time the BYOL update (one JSON line)
"""


class UsageError(ValueError):
  """Bad command line; the message says what to change."""


def _config():
  if FLAGS.config is None:
    raise UsageError("--config is required, e.g. --config=configs/byol_imagenet.py")
  from byol_jax import config as config_lib
  return config_lib.validate(FLAGS.config)


def _bench(args: list[str]) -> None:
  what = args[0] if args else None
  if what == "step":
    from byol_jax import bench
    figures = bench.step_benchmark(_config(), FLAGS.bench_steps, FLAGS.bench_rounds, FLAGS.channels)
  else:
    raise UsageError(f"unknown benchmark {what!r}; valid: ['step'].")
  print(json.dumps(figures))


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "bench": _bench,
}


def run(argv: list[str]) -> None:
  """Parses `argv` (program name first) and runs the subcommand; raises on bad input."""
  try:
    positional = FLAGS(argv)
  except flags.Error as e:
    raise UsageError(str(e)) from None
  if len(positional) < 2 or positional[1] in ("help", "-h", "--help"):
    raise UsageError("no command given.\n" + USAGE)
  command = positional[1]
  if command not in COMMANDS:
    raise UsageError(f"unknown command {command!r}; valid: {sorted(COMMANDS)}.")
  COMMANDS[command](positional[2:])


def main(argv: list[str] | None = None) -> None:
  """Console entry point: exit 0 on success, 2 with one stderr line on bad input."""
  logging.set_verbosity(logging.WARNING)
  try:
    run(list(sys.argv if argv is None else argv))
  except (UsageError, ValueError, FileNotFoundError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"byol-jax: error: {first_line}", file=sys.stderr)
    sys.exit(2)
