"""The byol-jax command: prepare-data for image folders, usage errors, help, and errors
shown whole; the help and the refused resume through the real entry points (subprocesses)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fakes
from byol_jax import cli
from byol_jax.cli import command_line
from byol_jax import config as config_lib
from byol_jax.store import run_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = f"--config={ROOT / 'configs' / 'byol_fashion_mnist.py'}:smoke"


def _command(*args, console_script=False):
  """The command as a user runs it: the `byol-jax` script or `python -m byol_jax`."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
             JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"))
  script = pathlib.Path(sys.executable).parent / "byol-jax"
  if console_script:
    assert script.exists(), f"{script} is missing: install the package with `pip install -e .`"
  argv = [str(script)] if console_script else [sys.executable, "-m", "byol_jax"]
  return subprocess.run([*argv, *args], cwd=str(ROOT), env=env, capture_output=True, text=True,
                        timeout=300)


def _write_jpeg(path, seed):
  rng = np.random.default_rng(seed)
  image = np.clip(np.linspace(0, 255, 24)[None, :, None] + rng.normal(0, 20, (20, 24, 3)), 0, 255)
  path.write_bytes(tf.io.encode_jpeg(image.astype(np.uint8)).numpy())


def test_prepare_data_image_folder_builds_a_loadable_tfds_data_set(tmp_path, capsys):
  for cls, n in (("cat", 3), ("dog", 2)):
    (tmp_path / "imgs" / cls).mkdir(parents=True)
    for i in range(n):
      _write_jpeg(tmp_path / "imgs" / cls / f"{i}.jpg", seed=i)
  (tmp_path / "imgs" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
  cli.run(["byol-jax", "prepare-data", "image_folder", f"--source={tmp_path / 'imgs'}",
           "--name=pets_test", f"--data_dir={tmp_path / 'tfds'}"])
  assert "1 unreadable files skipped" in capsys.readouterr().out
  labels = sorted(int(x["label"]) for x in tfds.as_numpy(
      tfds.load("pets_test", split="train", data_dir=str(tmp_path / "tfds"))))
  assert labels == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("argv,message", [
    ([], "no command"),
    (["train"], "unknown command 'train'"),
    (["prepare-data", "mnist"], "valid: ['fashion_mnist', 'image_folder']"),
    (["prepare-data", "image_folder"], "--source=DIR"),
    (["pretrain", "--config=configs/byol_fashion_mnist.py:smoke"], "--workdir is required"),
    (["bench", "gpu", "--config=configs/byol_fashion_mnist.py:smoke"], "unknown benchmark 'gpu'"),
    (["preview"], "--out=views.png"),
    (["linear-eval", "--config=configs/byol_fashion_mnist.py:smoke", "--workdir=x"],
     "--pretrained required"),
    (["knn", "--config=configs/byol_fashion_mnist.py:smoke", "--pretrained=x"],
     "--workdir required"),
    (["finetune", "--pretrained=x", "--workdir=y"], "--config is required"),
    (["export", "--out=x"], "exactly one of --workdir=DIR"),
    (["export", "--workdir=x", "--from-release=y.pkl", "--out=z"], "exactly one of"),
    (["export", "--workdir=x"], "--out required"),
    (["sweep", "experiments/predictor.py", "--workdir=x"], "--base required"),
    (["sweep", "--base=configs/byol_fashion_mnist.py", "--workdir=x"], "usage: byol-jax sweep"),
])
def test_usage_errors_name_the_fix(argv, message):
  with pytest.raises(cli.UsageError) as error:
    cli.run(["byol-jax", *argv])
  assert message in str(error.value)


def test_help_lists_every_command(capsys):
  cli.run(["byol-jax", "help"])
  out = capsys.readouterr().out
  for command in list(cli.COMMANDS) + ["sweep"]:
    assert f"  {command} " in out


def test_every_command_has_help_and_every_flag_belongs_to_a_command():
  assert set(cli.COMMAND_FLAGS) == set(cli.COMMANDS) | {"sweep"}
  defined = {flag.name for flag in cli.FLAGS.get_flags_for_module(command_line.__name__)}
  listed = set().union(*cli.COMMAND_FLAGS.values())
  assert listed == defined, f"flags in no command's help: {sorted(defined - listed)}"


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_help_flags_print_the_command_list(argv, capsys):
  cli.run(["byol-jax", *argv])
  assert capsys.readouterr().out.startswith("usage: byol-jax COMMAND")


@pytest.mark.parametrize("command", sorted(cli.COMMAND_FLAGS))
def test_command_help_shows_its_usage_and_each_flag_with_its_help(command, capsys):
  # An incomplete command line still gets its help: no flag it requires is checked.
  cli.run(["byol-jax", command, "--help"])
  out = capsys.readouterr().out
  assert out.startswith(f"usage: byol-jax {command} ") and "COMMAND" not in out
  for name in cli.COMMAND_FLAGS[command]:
    assert f"  --{name}: {cli.FLAGS[name].help.split()[0]}" in out


def test_help_for_an_unknown_command_names_the_valid_ones():
  with pytest.raises(cli.UsageError, match="unknown command 'train'; valid: "):
    cli.run(["byol-jax", "train", "-h"])


@pytest.mark.parametrize("argv, console_script, first_line", [
    (["--help"], True, "usage: byol-jax COMMAND"),
    (["pretrain", "-h"], False, "usage: byol-jax pretrain --config=FILE[:arg] --workdir=DIR"),
])
def test_help_through_the_entry_points_exits_0(argv, console_script, first_line):
  proc = _command(*argv, console_script=console_script)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[0].startswith(first_line)


def test_refused_resume_shows_the_field_both_values_and_the_fix(tmp_path):
  data_dir = fakes.fashion_mnist_tfds(tmp_path / "data")
  # The workdir of an earlier run at width 1/4 (its config.json as the run wrote it, with
  # the data's 10 classes); the smoke recipe now asks for width 1/8.
  saved = fakes.recipe("byol_fashion_mnist", "smoke")
  saved.unlock()
  fakes.set_fields(saved, {"model.width": 0.25, "dataset.num_classes": 10})
  workdir = tmp_path / "run"
  run_config.save_config(str(workdir), config_lib.validate(saved))
  proc = _command("pretrain", SMOKE, f"--workdir={workdir}",
                  f"--config.dataset.data_dir={data_dir}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = proc.stderr[proc.stderr.index("byol-jax: error: "):]
  assert "cannot be resumed" in error.splitlines()[0] and "Traceback" not in proc.stderr
  assert "model.width: saved 0.25, now 0.125" in error
  assert "Fix: pass another --workdir for the new config" in error


def test_sweep_print_commands_takes_config_overrides_and_dashed_flag(tmp_path, capsys):
  cli.run(["byol-jax", "sweep", "experiments/predictor.py",
           "--base=configs/byol_fashion_mnist.py", f"--workdir={tmp_path}", "--print-commands",
           "--config.num_epochs=1"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and not list(tmp_path.iterdir())  # Printed, ran nothing.
  assert all("--config.num_epochs=1" in line and
             "byol-jax sweep experiments/predictor.py --run=" in line for line in lines)
  assert "--run=1" in lines[1]
