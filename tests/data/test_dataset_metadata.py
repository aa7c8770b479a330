"""Sizes and classes from the data set's metadata; bad sizes, splits and labels stopped at
start-up, before any step or file, with one line naming the field and the fix. On a small
image folder (3 classes, 20 JPEG/PNG images, prepared by byol_jax.data.prepare) and on the
offline Fashion-MNIST-format data (64 train, 12 test, 10 classes)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import fakes
from fakes import recipe
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.evaluation import finetune
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from byol_jax.data import prepare
from byol_jax.weights import encoder_weights
from byol_jax.store import run_config
from byol_jax.data import sources

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDER, FOLDER_SIZES = "byol_test_three", (7, 7, 6)  # 20 images in 3 classes.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A prepared image folder: class k has FOLDER_SIZES[k] images, JPEG and PNG bytes."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for label, count in enumerate(FOLDER_SIZES):
    (root / "images" / f"class_{label}").mkdir(parents=True)
    for i in range(count):
      image = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
      encode, ext = (tf.io.encode_png, "png") if i % 3 == 0 else (tf.io.encode_jpeg, "jpg")
      (root / "images" / f"class_{label}" / f"{i}.{ext}").write_bytes(encode(image).numpy())
  report = prepare.prepare_image_folder(str(root / "images"), FOLDER, str(root / "tfds"))
  assert report.split_sizes == {"train": 20}
  return report.data_dir


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
  return fakes.fashion_mnist_tfds(tmp_path_factory.mktemp("fmnist"))


def on_folder(data_dir, **fields):
  """The ImageNet recipe (:smoke) pointed at the image folder, as a new user would."""
  c = recipe("byol_imagenet", "smoke")
  c.dataset.update(dict(name=FOLDER, data_dir=data_dir, eval_split="train"))
  return fakes.set_fields(c, fields)


def on_fmnist(data_dir, **fields):
  c = recipe("byol_fashion_mnist", "smoke")
  c.dataset.data_dir = data_dir
  return fakes.set_fields(c, fields)


# ------------------------------------------------------------------- derived values


def test_sizes_and_classes_come_from_the_data(folder, fmnist):
  c = sources.resolve_dataset(on_folder(folder, **{"dataset.num_classes": 0}))
  assert (c.dataset.num_train_examples, c.dataset.num_classes) == (20, 3)
  c = sources.resolve_dataset(on_fmnist(fmnist))
  assert (c.dataset.num_train_examples, c.dataset.num_classes) == (64, 10)
  # A deliberate subset is a slice of the split; its size is derived as well.
  c = sources.resolve_dataset(on_fmnist(fmnist, **{"dataset.train_split": "train[:25%]"}))
  assert c.dataset.num_train_examples == 16
  # Values that agree with the data are kept; the input config is not modified.
  given = on_fmnist(fmnist, **{"dataset.num_train_examples": 64})
  assert sources.resolve_dataset(given).dataset.num_train_examples == 64
  unresolved = on_fmnist(fmnist)
  sources.resolve_dataset(unresolved)
  assert unresolved.dataset.num_train_examples == 0 and unresolved.is_locked


def test_a_recipe_pointed_at_other_data_schedules_epochs_of_that_data(fmnist):
  c = recipe("byol_imagenet")  # 300 epochs of ImageNet at batch 4096, 10 warm-up epochs.
  c.dataset.update(dict(name="fashion_mnist", data_dir=fmnist, eval_split="test",
                        num_classes=0))
  c.batch_size, c.num_epochs = 16, 3.0
  resolved = sources.resolve_dataset(c)
  assert config_lib.steps_per_epoch(resolved) == 64 // 16
  assert config_lib.total_steps(resolved) == 3 * 4
  assert config_lib.warmup_steps(resolved) == 12  # 10 epochs of 4 steps, capped at the run.


def test_resolved_numbers_resume_a_run_saved_with_them(fmnist):
  saved = run_config.config_to_dict(on_fmnist(fmnist, **{"dataset.num_train_examples": 64}))
  current = run_config.config_to_dict(sources.resolve_dataset(
      on_fmnist(fmnist, **{"dataset.num_classes": 0})))
  assert saved["dataset"]["num_classes"] == current["dataset"]["num_classes"] == 10
  assert run_config.config_mismatches(saved, current) == []


def test_imagenet_recipe_numbers_are_what_tfds_knows_of_imagenet2012(tmp_path):
  module = fakes.recipe_module("byol_imagenet")
  c = module.get_config()
  assert c.dataset.num_classes == module.NUM_CLASSES == 1000
  assert c.dataset.num_train_examples == 0  # From the data: the schedules follow it.
  # tfds ships imagenet2012's label list and validation labels with its builder, but not
  # its split sizes (info.splits is empty until the data is prepared): the class count and
  # the validation size are checked here, the train size only against the paper's figure.
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
  assert builder.info.features["label"].num_classes == module.NUM_CLASSES
  assert not builder.info.splits
  folder = pathlib.Path(sys.modules[type(builder).__module__].__file__).parent
  lines = (folder / "validation_labels.txt").read_text().split()
  assert len(lines) == module.SPLIT_SIZES["validation"] == 50_000
  assert module.SPLIT_SIZES["train"] == 1_281_167  # BYOL paper / tfds catalogue.


# ------------------------------------------------------------------- errors, library


@pytest.mark.parametrize("fields, message", [
    ({"dataset.num_train_examples": 1_281_167},
     r"^config.dataset.num_train_examples=1281167 contradicts the data: split 'train' of "
     r"'byol_test_three' has 20; set --config.dataset.num_train_examples=0"),
    ({"dataset.num_classes": 2},
     r"^config.dataset.num_classes=2 contradicts the data: the label feature of "
     r"'byol_test_three' has 3; set --config.dataset.num_classes=0"),
    ({"dataset.num_classes": 0, "dataset.eval_split": "validation"},
     r"^config.dataset.eval_split='validation' is not a split of 'byol_test_three' .*; set "
     r"--config.dataset.eval_split='train' \(its splits: \['train'\]"),
    ({"dataset.num_classes": 0, "dataset.train_split": "train[5:5]"},
     r"^config.dataset.train_split='train\[5:5\]' selects no examples"),
    ({"dataset.num_classes": 0, "dataset.train_split": "train[30:]"},
     r"^config.dataset.train_split='train\[30:\]' is not a split .*incompatible with 20"),
])
def test_contradictions_and_bad_splits_name_the_field_and_the_fix(folder, fields, message):
  with pytest.raises(ValueError, match=message) as error:
    sources.resolve_dataset(on_folder(folder, **fields))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("held, message", [
    (10_000, "validation_examples=10000 exceeds the 20 examples of split 'train' of "
             "'byol_test_three'; set --config.dataset.validation_examples=2 (10%)"),
    (20, "validation_examples=20 leaves nothing to train on of the 20 examples"),
    (0, "validation_examples=0 must be > 0"),
])
def test_linear_holdout_must_fit_the_train_split(folder, held, message):
  c = on_folder(folder, **{"dataset.num_classes": 0, "dataset.validation_examples": held})
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sources.resolve_dataset(c, reads=("eval", "holdout"))
  sources.resolve_dataset(c, reads=("eval",))  # Pretraining does not read the carve-out.


def test_knn_bank_must_fit_the_train_split(fmnist):
  c = on_fmnist(fmnist, **{"knn.train_examples": 65})
  with pytest.raises(ValueError, match=r"knn.train_examples=65 exceeds the 64 examples.*"
                                       r"--config.knn.train_examples=64 or fewer"):
    sources.resolve_dataset(c, reads=("eval", "knn"))


def test_jobs_stop_before_creating_the_workdir(folder, fmnist, tmp_path):
  workdir = tmp_path / "run"
  bad_eval = on_fmnist(fmnist, **{"dataset.eval_split": "validation"})
  with pytest.raises(ValueError, match="dataset.eval_split='validation'.*'test'"):
    loop.pretrain(bad_eval, str(workdir), print_fn=pytest.fail)
  c = on_folder(folder, **{"dataset.num_classes": 0})  # validation_examples: 10000.
  with pytest.raises(ValueError, match="validation_examples=10000 exceeds the 20"):
    linear_eval.run(c, "random", str(workdir), print_fn=pytest.fail)
  with pytest.raises(ValueError, match="num_classes=2 contradicts"):
    linear_eval.knn_run(on_folder(folder, **{"dataset.num_classes": 2}), "random",
                        str(workdir), print_fn=pytest.fail)
  encoder = encoder_weights.Pretrained(config_lib.base_config().model, {}, {}, 32, 3, 0, "x")
  with pytest.raises(ValueError, match="num_train_examples=1281167 contradicts"):
    finetune.finetune(on_folder(folder, **{"dataset.num_train_examples": 1_281_167}),
                      encoder, str(workdir), print_fn=pytest.fail)
  assert not workdir.exists()


# ------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def unlabelled_classes(tmp_path_factory):
  """A data set whose label feature is a plain integer (no class count), labels 0..5."""
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.Tensor(shape=(), dtype=np.int64)})
  image = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()
  examples = [(str(i), {"image": image, "label": i % 6}) for i in range(12)]
  return prepare.store_dataset("byol_test_plain_labels", "1.0.0", features,
                               {"train": examples}, str(tmp_path_factory.mktemp("plain")),
                               disable_shuffling=True)


def plain(data_dir, num_classes):
  c = config_lib.base_config()
  c.image_size, c.batch_size, c.num_steps = 8, 4, 1
  c.dataset.update(dict(name="byol_test_plain_labels", data_dir=data_dir, train_split="train",
                        eval_split="train", num_classes=num_classes))
  return c


def test_labels_without_metadata_need_the_class_count(unlabelled_classes):
  with pytest.raises(ValueError, match="does not record its class count.*"
                                       "--config.dataset.num_classes"):
    sources.resolve_dataset(plain(unlabelled_classes, 0))
  assert sources.resolve_dataset(plain(unlabelled_classes, 3)).dataset.num_classes == 3


def test_labels_outside_the_class_count_stop_the_pipelines(unlabelled_classes):
  c = plain(unlabelled_classes, 3)  # The data holds labels 0..5.
  message = r"label [345], outside \[0, 3\) \(dataset.num_classes=3\)"
  with pytest.raises(ValueError, match=message):
    list(pipelines.eval_dataset(c, local_device_count=1))
  with pytest.raises(ValueError, match=message):
    for _ in range(4):
      next(pipelines.pretrain_dataset(c, local_device_count=1))
  with pytest.raises(ValueError, match=r"label 3, outside \[0, 3\)"):
    pipelines.split_labels(c)
  c = plain(unlabelled_classes, 6)
  assert sorted(pipelines.split_labels(c).tolist()) == sorted([i % 6 for i in range(12)])
  batches = list(pipelines.eval_dataset(c, local_device_count=1))
  assert sorted(np.concatenate([b["label"].reshape(-1) for b in batches]).tolist()) == sorted(
      [i % 6 for i in range(12)])


# ------------------------------------------------------------------- the command


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "byol_jax", *args], cwd=str(ROOT), env=env,
                        capture_output=True, text=True, timeout=300)


def _error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("byol-jax: error:")]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  assert "step" not in proc.stdout
  return lines[0]


@pytest.mark.parametrize("command, overrides, expected", [
    ("pretrain", ["--config.dataset.num_classes=2", "--config.dataset.eval_split=train"],
     "config.dataset.num_classes=2 contradicts the data: the label feature of "
     "'byol_test_three' has 3; set --config.dataset.num_classes=0"),
    ("linear-eval", ["--config.dataset.num_classes=0", "--config.dataset.eval_split=train",
                     "--pretrained=random"],
     "config.dataset.validation_examples=10000 exceeds the 20 examples of split 'train' of "
     "'byol_test_three'; set --config.dataset.validation_examples=2 (10%)"),
])
def test_command_exits_2_with_one_line_before_any_step(folder, tmp_path, command, overrides,
                                                       expected):
  workdir = tmp_path / "run"
  proc = _cli(command, f"--config={ROOT / 'configs' / 'byol_imagenet.py'}:smoke",
              f"--workdir={workdir}", f"--config.dataset.name={FOLDER}",
              f"--config.dataset.data_dir={folder}", "--config.num_epochs=1", *overrides)
  assert expected in _error_line(proc)
  assert not workdir.exists()


def test_pretrain_with_a_missing_eval_split_stops_before_training(fmnist, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli("pretrain", f"--config={ROOT / 'configs' / 'byol_fashion_mnist.py'}:smoke",
              f"--workdir={workdir}", f"--config.dataset.data_dir={fmnist}",
              "--config.dataset.eval_split=validation")
  assert ("config.dataset.eval_split='validation' is not a split of 'fashion_mnist'"
          in _error_line(proc))
  assert "--config.dataset.eval_split='test'" in proc.stderr and not workdir.exists()


def test_prepare_data_output_is_whole_lines(tmp_path):
  for label in ("a", "b"):
    (tmp_path / "images" / label).mkdir(parents=True)
    image = np.full((8, 8, 3), 100, np.uint8)
    (tmp_path / "images" / label / "0.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "byol_jax", "prepare-data", "image_folder",
       f"--source={tmp_path / 'images'}", "--name=byol_test_lines",
       f"--data_dir={tmp_path / 'tfds'}"], cwd=str(ROOT), env=env, timeout=300,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # One stream, as in a log file.
  assert proc.returncode == 0, proc.stdout[-3000:]
  # tfds's progress bars end with a carriage return, no newline: off a terminal they must
  # not be drawn, or the next line continues theirs.
  assert b"\r" not in proc.stdout
  lines = proc.stdout.decode().splitlines(keepends=True)
  summary = [l for l in lines if "byol_test_lines ready in" in l]
  assert len(summary) == 1 and summary[0].startswith("byol_test_lines ready in")
  assert summary[0].endswith("\n")
