"""Tests of byol_jax.data.prepare: Fashion-MNIST idx files and image folders become tfds data
sets that tfds and data.py read like any other."""
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fakes import write_fashion_mnist, write_idx
from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.data import prepare

tfds.disable_progress_bar()
REAL_FASHION_MNIST = pathlib.Path(prepare.FASHION_MNIST_DIR)


def load(name, data_dir, split):
  ds = tfds.load(name, data_dir=data_dir, split=split)
  items = list(tfds.as_numpy(ds))
  return np.stack([x["image"] for x in items]), np.array([x["label"] for x in items])


def as_multiset(images, labels):
  """(image bytes, label) pairs, sorted: tfds stores examples in its own order."""
  return sorted((i.tobytes(), int(l)) for i, l in zip(images.reshape(len(images), -1), labels))


# ------------------------------------------------------------------- Fashion-MNIST


def test_prepared_fashion_mnist_loads_with_tfds_features_and_the_idx_contents(tmp_path):
  source, data_dir = tmp_path / "idx", tmp_path / "tfds"
  source.mkdir()
  arrays = write_fashion_mnist(source)
  out = prepare.prepare_fashion_mnist(str(source), str(data_dir))
  assert out == str(data_dir)
  builder = tfds.builder("fashion_mnist", data_dir=out)
  # tfds's own builder, never prepared here, describes the features we must match.
  reference = tfds.builder("fashion_mnist", data_dir=str(tmp_path / "empty")).info.features
  ours = builder.info.features
  assert ours["image"].shape == reference["image"].shape == (28, 28, 1)
  assert ours["image"].np_dtype == reference["image"].np_dtype == np.uint8
  assert ours["label"].names == reference["label"].names
  assert {s: v.num_examples for s, v in builder.info.splits.items()} == {"train": 12, "test": 5}
  for split in ("train", "test"):  # .gz (train) and plain (test) files both read.
    assert as_multiset(*load("fashion_mnist", out, split)) == as_multiset(*arrays[split])

  info_file = pathlib.Path(builder.data_dir) / "dataset_info.json"
  stamp = info_file.stat().st_mtime_ns
  write_fashion_mnist(source, seed=1)  # Different files: a rebuild would change the data.
  assert prepare.prepare_fashion_mnist(str(source), str(data_dir)) == out
  assert info_file.stat().st_mtime_ns == stamp
  assert as_multiset(*load("fashion_mnist", out, "test")) == as_multiset(*arrays["test"])

  # The data.py pipelines read it unchanged: 1 channel, eval crops of the idx images.
  c = config_lib.base_config()
  c.image_size, c.batch_size = 28, 5
  c.dataset.update(dict(name="fashion_mnist", data_dir=out, eval_split="test"))
  assert pipelines.num_channels(c) == 1
  batch = next(pipelines.eval_dataset(c, local_device_count=1))
  assert batch["image"].shape == (1, 5, 28, 28, 1) and batch["mask"].all()
  side = int(0.875 * 28)  # Centre crop 24 at offset 2, resized back to 28.
  crops = arrays["test"][0][:, 2:2 + side, 2:2 + side, None]
  expected = np.clip(np.round(tf.image.resize(crops, [28, 28], "bicubic")), 0, 255)
  assert as_multiset(batch["image"][0], batch["label"][0]) == as_multiset(
      expected.astype(np.uint8), arrays["test"][1])
  view = next(pipelines.pretrain_dataset(c, local_device_count=1))["view1"]
  assert view.shape == (1, 5, 28, 28, 1)


@pytest.mark.parametrize("damage, message", [
    ("magic", "magic number 2049 is not 2051"),
    ("truncate", "truncated or corrupt"),
    ("count", "has 5 images but .* has 4 labels"),
    ("label", r"label 12 is not in \[0, 10\)"),
    ("missing", "neither t10k-labels-idx1-ubyte nor"),
])
def test_malformed_idx_files_raise_clear_errors(tmp_path, damage, message):
  write_fashion_mnist(tmp_path)
  labels = tmp_path / "t10k-labels-idx1-ubyte"
  images = tmp_path / "t10k-images-idx3-ubyte"
  if damage == "magic":  # A label file where the image file should be.
    images.write_bytes(labels.read_bytes())
  elif damage == "truncate":
    images.write_bytes(images.read_bytes()[:-100])
  elif damage == "count":
    write_idx(labels, np.zeros(4), compress=False)
  elif damage == "label":
    write_idx(labels, np.full(5, 12), compress=False)
  else:
    labels.unlink()
  error = FileNotFoundError if damage == "missing" else ValueError
  with pytest.raises(error, match=message):
    prepare.prepare_fashion_mnist(str(tmp_path), str(tmp_path / "tfds"))


def test_png_encoder_is_lossless():
  rng = np.random.default_rng(0)
  for shape in ((28, 28), (3, 17), (1, 1)):
    image = rng.integers(0, 256, shape).astype(np.uint8)
    decoded = tf.io.decode_png(prepare.encode_png_gray(image)).numpy()
    np.testing.assert_array_equal(decoded[..., 0], image)


def test_real_fashion_mnist_files_prepare_into_the_full_data_set(tmp_path):
  assert REAL_FASHION_MNIST.is_dir(), (
      f"{REAL_FASHION_MNIST} is missing: apt-get install dataset-fashion-mnist")
  arrays = prepare.read_fashion_mnist(str(REAL_FASHION_MNIST))
  # Published facts: 60k/10k images, each of the 10 classes 6000/1000 times.
  np.testing.assert_array_equal(np.bincount(arrays["train"][1]), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(arrays["test"][1]), [1000] * 10)
  out = prepare.prepare_fashion_mnist(str(REAL_FASHION_MNIST), str(tmp_path))
  builder = tfds.builder("fashion_mnist", data_dir=out)
  assert builder.info.splits["train"].num_examples == 60000
  assert builder.info.splits["test"].num_examples == 10000
  assert as_multiset(*load("fashion_mnist", out, "test")) == as_multiset(*arrays["test"])


# ------------------------------------------------------------------- image folders


def write_image(path, seed, fmt="jpeg", size=(20, 24)):
  image = np.random.default_rng(seed).integers(0, 256, size + (3,)).astype(np.uint8)
  encoded = tf.io.encode_jpeg(image) if fmt == "jpeg" else tf.io.encode_png(image)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(encoded.numpy())
  return path.read_bytes()


def test_image_folder_with_train_and_test_becomes_a_tfds_data_set(tmp_path):
  root = tmp_path / "images"
  files = {
      ("train", "cat", "a.jpg"): write_image(root / "train/cat/a.jpg", 0),
      ("train", "cat", "b.png"): write_image(root / "train/cat/b.png", 1, "png"),
      ("train", "dog", "c.JPEG"): write_image(root / "train/dog/c.JPEG", 2),
      ("train", "dog", "png_named.jpg"): write_image(root / "train/dog/png_named.jpg", 3, "png"),
      ("test", "dog", "d.jpg"): write_image(root / "test/dog/d.jpg", 4),
  }
  broken = root / "train/cat/broken.jpg"
  broken.write_bytes(files[("train", "cat", "a.jpg")][:200])
  (root / "train/dog/notes.txt").write_text("not an image")
  report = prepare.prepare_image_folder(str(root), "byol_test_folder", str(tmp_path / "tfds"))
  assert report.class_names == ["cat", "dog"]
  assert report.split_sizes == {"train": 4, "test": 1}
  assert sorted(p for p, _ in report.skipped) == [str(broken), str(root / "train/dog/notes.txt")]

  builder = tfds.builder("byol_test_folder", data_dir=report.data_dir)
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    stored = sorted((int(x["label"]), x["image"]) for x in tfds.as_numpy(ds))
    expected = sorted((report.class_names.index(c), b) for (s, c, _), b in files.items()
                      if s == split)
    assert stored == expected  # Bytes kept as they are: JPEGs stay JPEG.

  c = config_lib.base_config()
  c.image_size, c.batch_size = 8, 4
  c.dataset.update(dict(name="byol_test_folder", data_dir=report.data_dir))
  it = pipelines.eval_dataset(c, "train", local_device_count=1)
  batch = next(it)
  assert batch["mask"].sum() == 4 and it.skipped_images == 0  # PNG-named .jpg decodes.
  again = prepare.prepare_image_folder(str(root), "byol_test_folder", str(tmp_path / "tfds"))
  assert again.split_sizes == report.split_sizes and again.skipped == []


def test_flat_image_folder_gives_a_train_split(tmp_path):
  for i, label in enumerate(["b_class", "a_class", "b_class"]):
    write_image(tmp_path / "flat" / label / f"{i}.jpg", i)
  report = prepare.prepare_image_folder(str(tmp_path / "flat"), "byol_test_flat",
                                        str(tmp_path / "tfds"))
  assert report.class_names == ["a_class", "b_class"]
  assert report.split_sizes == {"train": 3}
  labels = sorted(load("byol_test_flat", report.data_dir, "train")[1])
  assert labels == [0, 1, 1]


def test_image_folder_errors_name_the_problem(tmp_path):
  root = tmp_path / "images"
  write_image(root / "full" / "x.jpg", 0)
  (root / "empty").mkdir()
  with pytest.raises(ValueError, match=r"\['empty'\] .* have no readable images"):
    prepare.prepare_image_folder(str(root), "byol_test_empty", str(tmp_path / "tfds"))
  (root / "empty" / "bad.jpg").write_bytes(b"corrupt")
  with pytest.raises(ValueError, match="no readable images"):  # All skipped: empty too.
    prepare.prepare_image_folder(str(root), "byol_test_empty", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="snake_case"):
    prepare.prepare_image_folder(str(root), "Bad-Name", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="tfds catalogue"):
    prepare.prepare_image_folder(str(root), "imagenette", str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prepare.prepare_image_folder(str(tmp_path / "nope"), "byol_test_x", str(tmp_path / "tfds"))
