"""The `byol-jax` command line: every flag, the usage text, and `parse`, which reads and
checks a command line without running anything.

The only module that defines flags. Bad input raises UsageError (or ValueError,
FileNotFoundError) with a message that says what to change; commands.py runs the command.
"""
import dataclasses
import os
import sys
import textwrap

from absl import flags
import ml_collections
from ml_collections import config_flags

from byol_jax import config as config_lib
from byol_jax.evaluation import baselines
from byol_jax.jobs import sweep_spec
from byol_jax.store import files

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/byol_imagenet.py[:arg]; fields are overridden "
    "with --config.key=value.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: pretrain writes checkpoints, metrics.jsonl "
                    "and TensorBoard events here, linear-eval/knn/finetune their results, sweep "
                    "one subdirectory per run; export reads the pretraining run in it.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (else $JAX_COORDINATOR_ADDRESS; on "
                    "Cloud TPU leave unset and pass --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process (else $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with no arguments "
                  "(Cloud TPU and SLURM/Open MPI detect the cluster themselves).")
flags.DEFINE_integer("initialization_timeout", 300,
                     "Multi-host: seconds to wait for all processes to join.")
flags.DEFINE_integer("heartbeat_timeout", 60,
                     "Multi-host: seconds without a heartbeat after which a process counts as "
                     "dead; then every other process is stopped with a non-zero status "
                     "instead of waiting forever in a collective.")
flags.DEFINE_string("source", None, "prepare-data: directory with the raw files.")
flags.DEFINE_string("data_dir", None, "prepare-data: tfds data directory to write (default: "
                    "tfds's, ~/tensorflow_datasets or $TFDS_DATA_DIR).")
flags.DEFINE_string("name", None, "prepare-data image_folder: tfds name for the data set.")
flags.DEFINE_string("out", None, "The file to write: preview's PNG, export's encoder.")
flags.DEFINE_integer("num_images", 8, "preview: training images (rows) to show.")
flags.DEFINE_integer("bench_steps", 5, "bench: timed steps per round.")
flags.DEFINE_integer("bench_rounds", 3, "bench: alternating timing rounds.")
flags.DEFINE_integer("channels", 3, "Image channels for benchmarks on synthetic data.")
flags.DEFINE_string("pretrained", None, "linear-eval/knn/finetune: a pretraining workdir, a "
                    "byol_jax export (.safetensors), an authors' release checkpoint (.pkl), "
                    "'random' (the recipe's encoder with random weights: the baseline), or, "
                    "for linear-eval and knn only, 'pixels' (the standardised raw pixels: the "
                    "no-encoder baseline).")
flags.DEFINE_string("from_release", None, "export: an authors' release checkpoint (.pkl) "
                    "to convert instead of --workdir.")
flags.DEFINE_enum("format", "byol_jax", ["byol_jax", "torchvision"],
                  "export: byol_jax (safetensors + config, for byol_jax.weights.export.load_encoder) "
                  "or torchvision (ResNet state dict, safetensors).")
flags.DEFINE_string("base", None, "sweep: the recipe every run starts from, "
                    "configs/<recipe>.py[:arg].")
flags.DEFINE_bool("print_commands", False, "sweep: print one shell command per run, line I "
                  "`byol-jax sweep ... --run=I` with this command's --config.* and multi-host "
                  "flags (for a cluster launcher), and run nothing.")
flags.DEFINE_integer("run", None, "sweep: run only run I (0-based, in the sweep file's order; "
                     "one job of a scheduler's array), resumably, in DIR/<run name>; no table.")
flags.DEFINE_bool("collect", False, "sweep: tabulate the finished runs from their directories "
                  "(results.csv/.md/.png) and list the missing and unfinished ones; runs nothing.")
flags.DEFINE_float("memory_budget_gb", None, "bench memory: per-device budget in GiB (default: "
                   "this host's available memory / local devices).")

USAGE = """usage: byol-jax COMMAND [--flags]

commands:
  pretrain --config=FILE[:arg] --workdir=DIR [--config.key=value ...]
                                       train (or resume) BYOL; checkpoints and logs in DIR
  prepare-data fashion_mnist [--source=DIR] [--data_dir=DIR]
  prepare-data image_folder --source=DIR --name=NAME [--data_dir=DIR]
                                       build a tfds data set from local files
  preview --config=FILE --out=views.png [--num_images=8]
                                       PNG grid: each image's two crops and augmented views
  bench step --config=FILE [--config.key=value ...]   time the BYOL update (one JSON line)
  bench input --config=FILE [--config.key=value ...]  time the input pipeline (one JSON line)
  bench memory --config=FILE [--memory_budget_gb=G]   per-device bytes of the update and the
                                       largest per-device batch that fits (one JSON line)
  linear-eval --config=FILE --pretrained=PATH --workdir=DIR
                                       linear protocol on the frozen encoder -> DIR/results.json
                                       (--pretrained=random: the random-encoder baseline;
                                       --pretrained=pixels: the standardised raw pixels)
  knn --config=FILE --pretrained=PATH --workdir=DIR   kNN (k=20, cosine) -> DIR/knn.json
                                       (--pretrained=random or pixels: the same baselines)
  finetune --config=FILE --pretrained=PATH --workdir=DIR [--config.finetune.label_fraction=0.1]
                                       semi-supervised fine-tuning on a labelled subset
  export (--workdir=DIR | --from_release=FILE.pkl) --out=PATH [--format=byol_jax|torchvision]
                                       the online encoder for transfer
  sweep experiments/FILE.py --base=configs/RECIPE.py[:arg] --workdir=DIR [--config.key=value ...]
        [--run=I | --collect | --print_commands]
                                       run or resume every run of a sweep (or run I alone),
                                       evaluate, tabulate (--collect: tabulate only)

`byol-jax COMMAND --help` lists a command's flags.
"""


# The flags each command reads, in the order its --help lists them.
MULTIHOST = ("coordinator_address", "num_processes", "process_id", "distributed",
             "initialization_timeout", "heartbeat_timeout")
_EVALUATION_FLAGS = ("config", "pretrained", "workdir", *MULTIHOST)
COMMAND_FLAGS = {
    "pretrain": ("config", "workdir", *MULTIHOST),
    "prepare-data": ("source", "name", "data_dir"),
    "preview": ("config", "out", "num_images"),
    "bench": ("config", "bench_steps", "bench_rounds", "channels", "memory_budget_gb"),
    "linear-eval": _EVALUATION_FLAGS,
    "knn": _EVALUATION_FLAGS,
    "finetune": _EVALUATION_FLAGS,
    "export": ("workdir", "from_release", "out", "format"),
    "sweep": ("base", "workdir", "run", "collect", "print_commands", *MULTIHOST),
}


class UsageError(ValueError):
  """Bad command line; the message says what to change."""


def config():
  """The --config recipe with its --config.key=value overrides, validated."""
  if FLAGS.config is None:
    raise UsageError("--config is required, e.g. --config=configs/byol_imagenet.py")
  return config_lib.validate(FLAGS.config)


# The --pretrained words that are no path.
_BASELINES = (baselines.RANDOM, baselines.PIXELS)


# Every path a command line names, as a flag or a config field: a URL whose scheme must be
# one byol_jax handles (local or gs://, store/files.py), checked before any work.
PATH_FLAGS = ("workdir", "out", "from_release", "pretrained", "source", "data_dir")
PATH_FIELDS = ("dataset.data_dir", "finetune.subset_file")


def _check_urls(c: ml_collections.ConfigDict | None) -> None:
  """Refuses a path flag or config field whose URL scheme no filesystem here handles."""
  named = {f"--{name}": getattr(FLAGS, name) for name in PATH_FLAGS}
  for field in PATH_FIELDS if c is not None else ():
    value = c
    for part in field.split("."):
      value = value[part]
    named[f"--config.{field}"] = value
  for name, value in named.items():
    if value and not (name == "--pretrained" and value in _BASELINES):
      try:
        files.check_url(value)
      except ValueError as e:
        raise UsageError(f"{name}={e}") from None


def _underscored(arg: str) -> str:
  """'--from-release=x' -> '--from_release=x': absl flag names use underscores."""
  if not arg.startswith("--") or arg.startswith("--config"):
    return arg
  name, eq, value = arg[2:].partition("=")
  return "--" + name.replace("-", "_") + eq + value


def _help_request(argv: list[str]) -> str | None:
  """What `argv` asks help for: None (no help), '' (the command list) or a command's name.

  Read before absl parses the flags: absl defines no --help flag of its own here, and a
  command's help must print even when its other flags are incomplete.
  """
  args = argv[1:]
  if args[:1] == ["help"]:
    return args[1] if len(args) > 1 else ""
  if not any(a in ("-h", "--help") for a in args):
    return None
  words = [a for a in args if not a.startswith("-")]
  return words[0] if words else ""


def command_usage(command: str) -> str:
  """A command's usage lines from USAGE, then each flag it reads with its help."""
  if command not in COMMAND_FLAGS:
    raise UsageError(f"unknown command {command!r}; valid: {sorted(COMMAND_FLAGS)}.")
  lines, mine = [], False
  for line in USAGE.splitlines():
    if not line.startswith(" "):  # A heading or a note: no command's line.
      mine = False
    elif not line.startswith("   "):  # A command's first line (two spaces).
      mine = line.split()[0] == command
    if mine and line.strip():
      lines.append(line)
  lines = ["usage: byol-jax " + lines[0].strip(), *lines[1:], "", "flags:"]
  for name in COMMAND_FLAGS[command]:
    flag = FLAGS[name]
    default = "" if flag.default in (None, False) else f" (default: {flag.default})"
    lines.append(textwrap.fill(f"--{name}: {flag.help}{default}", width=92,
                               initial_indent="  ", subsequent_indent="      "))
  return "\n".join(lines)


# The commands whose first positional argument picks what they do: (what it names, its values).
SUBCOMMANDS = {"bench": ("benchmark", ("input", "memory", "step")),
               "prepare-data": ("source", ("fashion_mnist", "image_folder"))}


@dataclasses.dataclass(frozen=True)
class CommandLine:
  """A command line as `parse` read and checked it; its flag values are in FLAGS."""
  command: str  # A key of COMMAND_FLAGS; '' with help=True: the command list.
  args: list[str]  # The positional arguments after the command.
  help: bool = False  # `--help`, `-h` or `help`: nothing else was parsed.
  config: ml_collections.ConfigDict | None = None  # The recipe with its overrides, if any.
  overrides: tuple[str, ...] = ()  # sweep: its --config.key=value flags, for every run.


def _parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv) -> the positional arguments, with absl's and ml_collections' errors as
  UsageErrors.

  ml_collections defines one flag per --config.key=value it finds in sys.argv while the
  --config flag is parsed: sys.argv is `argv` meanwhile (as for the console script), and
  the override flags of an earlier parse in this process are dropped first (absl refuses a
  flag defined twice), so that in-process callers get what the command line gets.
  """
  for name in [n for n in FLAGS if n.startswith("config.")]:
    delattr(FLAGS, name)
  saved, sys.argv = sys.argv, list(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    head, sep, trace = text.partition(": Error whilst parsing config file")
    if sep:  # The recipe's get_config raised: its message, not ml_collections' traceback.
      text = f"{head.removeprefix('flag ')}: {trace.strip().splitlines()[-1].partition(': ')[2]}"
    raise UsageError(text) from None
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.key that does not exist.
    raise UsageError(f"unknown config field {str(e).strip(chr(34) + chr(39))!r} in a --config.* override; the valid fields are "
                     "those of the recipe (see byol_jax/config.py).") from None
  except TypeError as e:  # ml_collections: a value of the wrong type for its field.
    raise UsageError(f"bad --config.* value: {e}") from None
  finally:
    sys.argv = saved


def _check_flags(command: str) -> None:
  """Refuses a byol-jax flag given to a command that does not read it."""
  mine = COMMAND_FLAGS[command]
  foreign = [n for n in sorted(set().union(*COMMAND_FLAGS.values()))
             if FLAGS[n].present and n not in mine]
  if foreign:
    raise UsageError(f"{command} does not take {', '.join('--' + n for n in foreign)}; its "
                     f"flags: {', '.join('--' + n for n in mine)} (`byol-jax {command} --help`).")


def _recipe() -> ml_collections.ConfigDict:
  """--config's recipe with its overrides, validated; a file that cannot be loaded named."""
  try:
    return config()
  except OSError as e:  # ml_collections defers a failed load to the first access.
    spec = FLAGS["config"].config_filename
    reason = ("no such file" if not os.path.isfile(spec.split(":", 1)[0])
              else " ".join(str(e).split()))
    raise UsageError(f"--config={spec}: {reason}; a recipe is a local .py file, e.g. "
                     "configs/byol_imagenet.py[:ARG].") from None


def parse(argv: list[str]) -> CommandLine:
  """Parses and checks `argv` (program name first) without running anything.

  Every command line passes here before its command starts (`run`), and
  tests/cli/test_doc_commands.py passes every command of the docs through it. Checked: the
  command exists; each byol-jax flag given is one of its flags (COMMAND_FLAGS); the first
  positional argument of the SUBCOMMANDS; the recipe (--config=FILE[:ARG], or sweep's
  --base with its sweep file) loads and validates with every --config.key=value applied,
  each naming an existing field with a value of its type; every path (PATH_FLAGS,
  PATH_FIELDS) has a scheme byol_jax handles. Recipe and sweep files are read, nothing else
  is read or written; which flags a command requires, the command checks.

  Raises:
    UsageError, ValueError, FileNotFoundError: what to change.
  """
  FLAGS.unparse_flags()  # Each parse starts from the defaults (it may run repeatedly).
  argv = [_underscored(a) for a in argv]
  help_for = _help_request(argv)
  if help_for is not None:
    if help_for:
      command_usage(help_for)  # Refuses an unknown command.
    return CommandLine(help_for, [], help=True)
  sweep_overrides = []
  if "sweep" in argv[1:2]:
    # A sweep has no --config file of its own: its --config.key=value flags apply to every
    # run and go to the sweep, not to absl.
    sweep_overrides = [a for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
  positional = _parse_flags(argv)
  if len(positional) < 2:
    raise UsageError("no command given; `byol-jax help` lists the commands.")
  command, args = positional[1], positional[2:]
  if command not in COMMAND_FLAGS:
    raise UsageError(f"unknown command {command!r}; valid: {sorted(COMMAND_FLAGS)}.")
  _check_flags(command)
  if command in SUBCOMMANDS:
    what, valid = SUBCOMMANDS[command]
    if not args:
      raise UsageError(f"{command} needs a {what}; valid: {list(valid)}.")
    if args[0] not in valid:
      raise UsageError(f"unknown {what} {args[0]!r} for {command}; valid: {list(valid)}.")
  config = None
  if command == "sweep" and FLAGS.base:
    config = sweep_spec.apply_overrides(sweep_spec.load_recipe(FLAGS.base),
                                        sweep_spec.parse_cli_overrides(sweep_overrides),
                                        "--config override")
    if len(args) == 1:
      sweep_spec.expand(sweep_spec.load_sweep(args[0]), config)  # Every run's config, validated.
  elif FLAGS.config is not None:
    config = _recipe()
  _check_urls(config)
  return CommandLine(command, args, config=config, overrides=tuple(sweep_overrides))
