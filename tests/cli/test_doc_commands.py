"""Every byol-jax command line in the docs and scripts parses as the command itself parses it.

README.md, docs/*.md and scripts/*.sh are scanned for byol-jax command lines (`byol-jax`,
`.venv/bin/byol-jax`, `python -m byol_jax`): in a script's lines, and in a markdown file's
fenced code blocks and inline code. Backslash-continued lines are joined; `&&`, `;`, `|`
and `$(...)` split a line into its commands; a command inside a quoted string (`gcloud ...
--command='...'`, `bash -c '...'`) is found too. Each goes through `cli.parse`, which every
command line passes before its command runs (`cli.run`): the command exists, each flag is
one of its flags, the recipe file and its argument load, every --config.key=value names a
field and has a value of its type, every path has a scheme byol_jax handles. Paths are not
looked up, so placeholders (DIR, BUCKET) are fine. A shell variable takes the default its
script gives it (`NAME=${NAME:-default}`), else its example value in SHELL_EXAMPLES.

Also here, what `parse` refuses before any work: a path flag or field with a scheme no
filesystem here handles (exit 2, one line, nothing written), a flag of another command.
"""
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from byol_jax import cli
from byol_jax.cli import command_line

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(ROOT / "scripts").glob("*.sh")])
# Values the shell computes at run time, as examples for the variables of the docs' commands.
SHELL_EXAMPLES = {
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "0",
    "SLURM_ARRAY_TASK_ID": "0",
    "COORDINATOR": "node001:12345",
    "BATCH": "64",
    "MEMORY_BUDGET_GB": "79.1",
    "HOME": "/home/user",
}
_PROGRAM = re.compile(r"byol-jax|-m\s+byol_jax")
_OPERATOR = set("();<>|&")
_WRAPPERS = {"nohup", "srun", "mpirun", "exec", "time", "env", "sudo"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
_DEFAULT = re.compile(r"^\s*(?:export\s+)?(\w+)=\$\{\1:-([^}$`]*)\}\s*$", re.M)


@dataclasses.dataclass(frozen=True)
class DocCommand:
  where: str  # 'docs/usage.md:12' (#2 for the second command of a line).
  text: str  # The line as written (continuation lines joined).
  args: tuple[str, ...]  # What follows the program name, variables expanded.
  error: str = ""  # Why the variables could not be expanded.


def code_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line number, shell text) of a script's lines, or of a markdown file's fenced code
  lines and inline code spans; backslash-continued lines joined onto their first line."""
  lines = path.read_text().splitlines()
  markdown = path.suffix == ".md"
  out, fenced, pending = [], not markdown, None
  for number, line in enumerate(lines, 1):
    if markdown and re.match(r"^\s*(```|~~~)", line):
      fenced, pending = not fenced, None
      continue
    if not fenced:
      out += [(number, span) for span in re.findall(r"`([^`\n]+)`", line)]
      continue
    if pending is not None:
      start, text = pending
      line, number = text + " " + line.strip(), start
    if line.rstrip().endswith("\\"):
      pending = (number, line.rstrip()[:-1].rstrip())
      continue
    pending = None
    out.append((number, line))
  return out


def _program_args(simple: list[str]) -> list[list[str]]:
  """The arguments of byol-jax in one simple command, or of the byol-jax commands in the
  command strings it hands to a shell (`--command='...'`, `bash -c '...'`)."""
  words = list(simple)
  while words and re.fullmatch(r"\w+=.*", words[0]):  # NAME=value before the command.
    words.pop(0)
  # The program is the command, or comes after a program that runs one (with its options).
  wrapped = bool(words) and words[0].rsplit("/", 1)[-1] in _WRAPPERS
  for i, token in enumerate(words):
    if i > 0 and not wrapped:
      break
    name = token.rsplit("/", 1)[-1]
    if name == "byol-jax":
      return [words[i + 1:]]
    if re.fullmatch(r"python[0-9.]*", name) and words[i + 1:i + 3] == ["-m", "byol_jax"]:
      return [words[i + 3:]]
  nested = []
  for i, token in enumerate(simple):
    if token.startswith("--command="):
      nested += shell_commands(token.split("=", 1)[1])
    elif token == "-c" and i > 0 and re.fullmatch(r"(ba|z)?sh", simple[i - 1].rsplit("/", 1)[-1]):
      nested += shell_commands(simple[i + 1] if i + 1 < len(simple) else "")
  return nested


def shell_commands(line: str) -> list[list[str]]:
  """The argument lists of the byol-jax commands in one shell line (not yet expanded)."""
  if not _PROGRAM.search(line):
    return []
  line = re.sub(r"(^|\s)\d+(?=[<>])", r"\1", line)  # '2>&1': the 2 is no argument.
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  tokens, commands, simple = iter(list(lexer)), [], []
  for token in tokens:
    if token and set(token) <= _OPERATOR:
      if "<" in token or ">" in token:
        next(tokens, None)  # A redirection's target.
        continue
      commands += _program_args(simple)
      simple = []
    else:
      simple.append(token)
  return commands + _program_args(simple)


def expand(token: str, defaults: dict[str, str]) -> str:
  """`token` with $NAME, ${NAME} and ${NAME:-default} replaced by example values."""
  def value(match):
    name = match.group(1) or match.group(3)
    if match.group(2) is not None:
      return expand(match.group(2), defaults)
    if name in defaults:
      return expand(defaults[name], defaults)
    if name in SHELL_EXAMPLES:
      return SHELL_EXAMPLES[name]
    raise KeyError(f"shell variable ${name} has no default in its file and no example in "
                   "SHELL_EXAMPLES of tests/cli/test_doc_commands.py")
  return _VARIABLE.sub(value, token)


def doc_commands(paths=DOC_FILES) -> list[DocCommand]:
  found = []
  for path in paths:
    text = path.read_text()
    defaults = dict(_DEFAULT.findall(text))
    for number, line in code_lines(path):
      commands = [args for args in shell_commands(line) if args]  # Not the bare name.
      for i, args in enumerate(commands):
        where = f"{path.relative_to(ROOT)}:{number}" + (f"#{i + 1}" if len(commands) > 1 else "")
        try:
          found.append(DocCommand(where, line.strip(), tuple(expand(a, defaults) for a in args)))
        except KeyError as e:
          found.append(DocCommand(where, line.strip(), tuple(args), error=e.args[0]))
  return found


COMMANDS = doc_commands()


# ------------------------------------------------------------------ finding the commands


def test_commands_are_found_in_every_form_the_docs_use():
  assert shell_commands("bash scripts/setup.sh && .venv/bin/byol-jax prepare-data fashion_mnist "
                        "&& .venv/bin/byol-jax help") == [["prepare-data", "fashion_mnist"], ["help"]]
  assert shell_commands("python -m byol_jax knn --pretrained=pixels|random") == [
      ["knn", "--pretrained=pixels"]]
  assert shell_commands(
      "gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd byol_jax && nohup "
      ".venv/bin/byol-jax pretrain --workdir=gs://B/r > pretrain.log 2>&1 < /dev/null &'") == [
          ["pretrain", "--workdir=gs://B/r"]]
  assert shell_commands("srun bash -c 'byol-jax pretrain --process_id=$SLURM_PROCID'") == [
      ["pretrain", "--process_id=$SLURM_PROCID"]]
  assert shell_commands('F32=$(byol-jax bench step --config="$RECIPE" | tail -n 1)') == [
      ["bench", "step", "--config=$RECIPE"]]
  assert shell_commands("# byol-jax in a comment") == []
  assert shell_commands("if [ -x .venv/bin/byol-jax ]; then echo byol-jax; fi") == []
  assert shell_commands("JAX_PLATFORMS=cpu srun -N 2 byol-jax export --out=x") == [
      ["export", "--out=x"]]
  assert shell_commands("""ssh h --command='pkill -TERM -f "byol-jax pretrain"'""") == []
  assert expand("--x=${A:-1} --y=$B --z=${SLURM_PROCID}", {"B": "${C:-2}"}) == "--x=1 --y=2 --z=0"


def test_continuation_lines_are_joined_and_inline_code_is_read(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("Run `byol-jax help` first.\n\n```bash\nbyol-jax pretrain \\\n"
                 "    --config=c.py \\\n    --workdir=w\n```\n")
  assert code_lines(doc) == [(1, "byol-jax help"), (4, "byol-jax pretrain --config=c.py --workdir=w")]


def test_every_file_that_names_the_command_has_commands_found():
  files_with_commands = {c.where.split(":")[0] for c in COMMANDS}
  for path in DOC_FILES:
    if re.search(r"^\s*(\.venv/bin/)?byol-jax \w", path.read_text(), re.M):
      assert str(path.relative_to(ROOT)) in files_with_commands, path


# ------------------------------------------------------------------- parsing them


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_parses(command, monkeypatch):
  monkeypatch.chdir(ROOT)  # Recipes and sweep files are named relative to the repository.
  assert not command.error, f"{command.where}: {command.error}"
  try:
    cli.parse(["byol-jax", *command.args])
  except (cli.UsageError, ValueError, OSError) as e:
    pytest.fail(f"{command.where}: `{command.text}` does not parse: {e}")


def test_run_parses_with_parse(monkeypatch):
  seen = []
  monkeypatch.setattr(command_line, "parse",
                      lambda argv: seen.append(argv) or cli.CommandLine("", [], help=True))
  cli.run(["byol-jax", "pretrain"])
  assert seen == [["byol-jax", "pretrain"]]


def test_overrides_parse_afresh_on_every_call_in_one_process(monkeypatch):
  monkeypatch.chdir(ROOT)
  for batch in (64, 128):
    line = cli.parse(["byol-jax", "bench", "step", "--config=configs/byol_imagenet.py:r50",
                      f"--config.batch_size={batch}", "--config.profile.steps=(100, 110)"])
    assert line.config.batch_size == batch and tuple(line.config.profile.steps) == (100, 110)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--config=configs/byol_imagenet.py", "--workdir=w", "--out=x"],
     "pretrain does not take --out; its flags: --config, --workdir"),
    (["export", "--workdir=w", "--out=x", "--config=configs/byol_imagenet.py"],
     "export does not take --config"),
    (["bench", "--config=configs/byol_imagenet.py"], "bench needs a benchmark"),
    (["pretrain", "--config=configs/byol_imagenet.py:r51", "--workdir=w"],
     "--config=configs/byol_imagenet.py:r51: unknown part 'r51'"),
    (["pretrain", "--config=configs/nope.py", "--workdir=w"], "--config=configs/nope.py: no such file"),
    (["pretrain", "--config=configs/byol_imagenet.py", "--workdir=w", "--config.batch_size=big"],
     "--config.batch_size=big"),
    (["pretrain", "--config=configs/byol_imagenet.py", "--workdir=w", "--config.nope=1"],
     "unknown config field 'nope'"),
])
def test_parse_refuses_with_the_fix(argv, message, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(cli.UsageError) as error:
    cli.parse(["byol-jax", *argv])
  assert message in str(error.value)


# ------------------------------------------------------ paths with an unsupported scheme

BAD = "ram://nowhere/x"
SMOKE = f"--config={ROOT / 'configs' / 'byol_fashion_mnist.py'}:smoke"


@pytest.mark.parametrize("argv, name", [
    (["pretrain", SMOKE, "--workdir=run", f"--config.dataset.data_dir={BAD}"],
     "--config.dataset.data_dir"),
    (["linear-eval", SMOKE, "--pretrained=random", "--workdir=run",
      f"--config.dataset.data_dir={BAD}"], "--config.dataset.data_dir"),
    (["finetune", SMOKE, "--pretrained=random", "--workdir=run",
      f"--config.finetune.subset_file={BAD}"], "--config.finetune.subset_file"),
    (["knn", SMOKE, f"--pretrained={BAD}", "--workdir=run"], "--pretrained"),
    (["preview", SMOKE, f"--out={BAD}"], "--out"),
    (["export", f"--from_release={BAD}", "--out=x.safetensors"], "--from_release"),
    (["prepare-data", "image_folder", f"--source={BAD}", "--name=x"], "--source"),
    (["prepare-data", "fashion_mnist", f"--data_dir={BAD}"], "--data_dir"),
    (["sweep", str(ROOT / "experiments" / "predictor.py"),
      f"--base={ROOT / 'configs' / 'byol_fashion_mnist.py'}", "--workdir=run",
      f"--config.dataset.data_dir={BAD}"], "--config.dataset.data_dir"),
])
def test_a_path_with_an_unsupported_scheme_exits_2_naming_it(argv, name, tmp_path, monkeypatch,
                                                             capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as exit_:
    cli.main(["byol-jax", *argv])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"byol-jax: error: {name}={BAD}: the scheme 'ram://' is not supported")
  assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_bad_data_dir_scheme_through_the_real_entry_point(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax", "pretrain", SMOKE, "--workdir=run",
       "--config.dataset.data_dir=s3://bucket/tensorflow_datasets"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert ("byol-jax: error: --config.dataset.data_dir=s3://bucket/tensorflow_datasets: the "
          "scheme 's3://' is not supported") in proc.stderr
  assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []
