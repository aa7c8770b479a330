"""The byol-jax command in-process: prepare-data for image folders, usage errors."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import cli


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


def test_sweep_print_commands_takes_config_overrides_and_dashed_flag(tmp_path, capsys):
  cli.run(["byol-jax", "sweep", "experiments/predictor.py",
           "--base=configs/byol_fashion_mnist.py", f"--workdir={tmp_path}", "--print-commands",
           "--config.num_epochs=1"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and not list(tmp_path.iterdir())  # Printed, ran nothing.
  assert all("--config.num_epochs=1" in line and "byol-jax linear-eval" in line for line in lines)
  assert "--config.model.use_predictor=false" in lines[1]
