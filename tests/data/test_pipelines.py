"""byol_jax.data.pipelines end to end on tfds data sets the tests write (real JPEG bytes) and
on mocked imagenet2012: evaluation coverage across processes, deterministic resumes, caching,
flips, the validation hold-out, corrupt images, prefetch to devices, clear errors.
"""
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import config as config_lib
from byol_jax.data import pipelines
from byol_jax.data import sources
from byol_jax.tools import bench_input
from tfds_images import (CMYK_BLOCKS, GOOD_LABELS, S, TEST_N, TRAIN_N, centre_window, jpeg,
                         make_config, reference_crop, reference_jpeg_crop, smooth_image, take)


def test_eval_sees_every_example_once_across_processes_and_pads_with_mask(images_dir):
  data_dir, test_images = images_dir
  c = make_config("byol_test_images", data_dir, cache_max_bytes=0)
  seen, batches = [], []
  for p in range(2):
    it = pipelines.eval_dataset(c, process_index=p, process_count=2, local_device_count=2,
                           batch_size=4)
    out = list(it)
    batches.append(len(out))
    assert len(out) == it.num_batches == 2  # ceil(ceil(7 / 2) / 2): same on both.
    for b in out:
      assert b["image"].shape == (2, 1, S, S, 3) and b["image"].dtype == np.uint8
      seen += b["label"][b["mask"] == 1].tolist()
      assert (b["image"][b["mask"] == 0] == 0).all()
  assert sorted(seen) == list(range(TEST_N))
  # Centre crop 224/256 of the short side, against the reference on the same bytes.
  it = pipelines.eval_dataset(c, local_device_count=1, batch_size=7)
  batch = next(it)
  for image, label in zip(batch["image"][0], batch["label"][0]):
    h, w = tf.image.extract_jpeg_shape(test_images[label]).numpy()[:2]
    np.testing.assert_array_equal(image, reference_jpeg_crop(test_images[label],
                                                             centre_window(h, w)))


def test_deterministic_pretrain_resumes_exactly_and_reshuffles_each_epoch(images_dir):
  c = make_config("byol_test_images", images_dir[0])
  c.batch_size = 4
  run = pipelines.pretrain_dataset(c, local_device_count=2)  # b = 2, 4 per step.
  first = take(run, 6)
  resumed = take(pipelines.pretrain_dataset(c, local_device_count=2, start_step=3), 3)
  for a, b in zip(first[3:], resumed):  # Step 3 starts mid-epoch 1 (position 12).
    for key in ("view1", "view2", "label"):
      np.testing.assert_array_equal(a[key], b[key])
  b0 = first[0]
  assert b0["view1"].shape == (2, 2, S, S, 3) and b0["view1"].dtype == np.uint8
  assert b0["label"].shape == (2, 2) and b0["label"].dtype == np.int32
  assert not np.array_equal(b0["view1"], b0["view2"])
  labels = np.concatenate([b["label"].ravel() for b in first[:5]])
  assert sorted(labels[:10]) == sorted(labels[10:]) == list(range(TRAIN_N))
  assert labels[:10].tolist() != labels[10:].tolist()


def test_caching_does_not_change_deterministic_batches(images_dir):
  cached = make_config("byol_test_images", images_dir[0])
  uncached = make_config("byol_test_images", images_dir[0], cache_max_bytes=0)
  a = take(pipelines.linear_train_dataset(cached, local_device_count=2), 3)
  b = take(pipelines.linear_train_dataset(uncached, local_device_count=2), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_linear_train_flips_some_images_horizontally(images_dir):
  # Area fixed at 100% is a failed sample, so every window is the centre crop: each
  # output is the reference centre crop or its mirror image, and both occur.
  c = make_config("byol_test_images", images_dir[0], cache_max_bytes=0)
  c.augment.crop_area_min = 1.0
  batch = next(pipelines.linear_train_dataset(c, local_device_count=1, batch_size=10))
  train = [jpeg(smooth_image(24 + 4 * i, 60 - 3 * i, i)) for i in range(TRAIN_N)]
  flips = []
  for image, label in zip(batch["image"][0], batch["label"][0]):
    h, w = tf.image.extract_jpeg_shape(train[label]).numpy()[:2]
    ref = reference_jpeg_crop(train[label], centre_window(h, w))
    plain, mirror = (np.abs(image.astype(int) - r).max() for r in (ref, ref[:, ::-1]))
    assert min(plain, mirror) == 0
    flips.append(mirror < plain)
  assert any(flips) and not all(flips)


def test_validation_split_is_held_out_of_train(images_dir):
  c = make_config("byol_test_images", images_dir[0])
  labels = {}
  for split in ("val_from_train", "train_minus_val"):
    batches = list(pipelines.eval_dataset(c, split, local_device_count=1, batch_size=4))
    labels[split] = [l for b in batches for l in b["label"][b["mask"] == 1]]
  assert sources.resolve_split(c, "val_from_train") == "train[:3]"
  assert sources.resolve_split(c, "train_minus_val") == "train[3:]"
  assert len(labels["val_from_train"]) == 3 and len(labels["train_minus_val"]) == 7
  assert sorted(labels["val_from_train"] + labels["train_minus_val"]) == list(range(TRAIN_N))


def test_corrupt_images_are_skipped_and_counted_other_formats_decoded(bad_dir):
  c = make_config("byol_test_bad", bad_dir)
  it = pipelines.eval_dataset(c, local_device_count=1, batch_size=3)
  batches = list(it)
  mask = np.concatenate([b["mask"].ravel() for b in batches])
  labels = np.concatenate([b["label"].ravel() for b in batches])[mask == 1]
  images = np.concatenate([b["image"][0] for b in batches])[mask == 1]
  assert sorted(labels) == GOOD_LABELS and it.skipped_images == 2
  assert len(batches) == 3  # ceil(9 / 3): sized for the split, corrupt ones padded.
  by_label = dict(zip(labels.tolist(), images))
  np.testing.assert_array_equal(by_label[7][..., 0], by_label[7][..., 1])  # Gray -> RGB.
  png_ref = reference_crop(smooth_image(40, 48, 8), centre_window(40, 48))
  np.testing.assert_array_equal(by_label[8], png_ref)
  c_, m, y, k = np.moveaxis(CMYK_BLOCKS.astype(float), -1, 0)
  cmyk_rgb = np.repeat(np.repeat(np.stack([c_ * k, m * k, y * k], -1) / 255, 8, 0), 8, 1)
  # The centre side 35 >= 2 S: decoded at DCT scale 1/2, which maps flat 8x8 blocks
  # to flat 4x4 blocks, i.e. to the full-size image subsampled by 2.
  half_window = [v // 2 for v in centre_window(40, 48)]
  expected = reference_crop(cmyk_rgb[::2, ::2], half_window)
  assert np.abs(by_label[6].astype(int) - expected).max() <= 2
  # Pretraining goes on past them: 16 good images span epochs 0-2, so 4 to 6 skips.
  pre = pipelines.pretrain_dataset(c, local_device_count=2)
  for batch in take(pre, 2):
    assert set(batch["label"].ravel()) <= set(GOOD_LABELS)
  assert 4 <= pre.skipped_images <= 6


def test_mocked_imagenet_reads_jpeg_bytes_through_the_jpeg_path():
  c = make_config("imagenet2012", "", eval_split="validation")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    # The mock draws examples from the requested features: ask for the pipeline's.
    decoders = tfds.decode.PartialDecoding(
        {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()})
    raw = list(tfds.builder("imagenet2012").as_dataset(split="validation", decoders=decoders))
    assert all(bool(tf.io.is_jpeg(ex["image"])) for ex in raw)  # Really JPEG bytes.
    batch = next(pipelines.eval_dataset(c, local_device_count=2, batch_size=6))
    pre = next(pipelines.pretrain_dataset(c, local_device_count=2))
  assert pre["view1"].shape == (2, 4, S, S, 3) and pre["label"].shape == (2, 4)
  for image, ex in zip(batch["image"].reshape(-1, S, S, 3), raw):
    h, w = tf.image.extract_jpeg_shape(ex["image"]).numpy()[:2]
    ref = reference_jpeg_crop(ex["image"].numpy(), centre_window(h, w))
    np.testing.assert_array_equal(image, ref)
  np.testing.assert_array_equal(batch["label"].ravel(), [int(ex["label"]) for ex in raw])


def test_stateful_mode_yields_valid_random_batches(images_dir):
  c = make_config("byol_test_images", images_dir[0], deterministic=False)
  a, b = take(pipelines.pretrain_dataset(c, local_device_count=2), 2)
  assert a["view1"].shape == (2, 4, S, S, 3) and a["view1"].dtype == np.uint8
  assert set(np.concatenate([a["label"].ravel(), b["label"].ravel()])) <= set(range(TRAIN_N))
  assert not np.array_equal(a["view1"], a["view2"])


def test_device_prefetch_places_batches_on_local_devices(images_dir):
  c = make_config("byol_test_images", images_dir[0])
  host = list(pipelines.eval_dataset(c, local_device_count=4, batch_size=4))
  prefetched = pipelines.device_prefetch(pipelines.eval_dataset(c, local_device_count=4, batch_size=4))
  on_device = list(prefetched)
  assert len(on_device) == len(host) == 2 and prefetched.skipped_images == 0
  for h, d in zip(host, on_device):
    assert isinstance(d["image"], jax.Array) and len(d["image"].sharding.device_set) == 4
    np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])


def test_bad_batch_size_and_split_and_missing_data_sets_raise_clear_errors(images_dir, tmp_path):
  c = make_config("byol_test_images", images_dir[0], deterministic=False)
  c.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size=6 .*device count 4"):
    pipelines.pretrain_dataset(c, local_device_count=4)
  with pytest.raises(ValueError, match="train_minus_val"):
    pipelines.eval_dataset(make_config("byol_test_images", images_dir[0]), "nonexistent",
                      local_device_count=1)
  empty = str(tmp_path)
  cases = {"fashion_mnist": "byol-jax prepare-data fashion_mnist",
           "imagenet2012": "downloads/manual",
           "no_such_images": "prepare_image_folder"}
  for name, hint in cases.items():
    with pytest.raises(sources.DatasetNotPreparedError, match=hint):
      pipelines.eval_dataset(make_config(name, empty), local_device_count=1)


def test_benchmark_jpegs_are_imagenet_like_and_every_figure_is_reported(tmp_path):
  rng = np.random.default_rng(0)
  sizes = [len(jpeg(bench_input.synthetic_photo(rng, 375, 500, t), quality=90))
           for t in (1.1, 2.0, 3.2)]  # The texture range write_jpegs draws from.
  assert 60e3 <= min(sizes) and max(sizes) <= 110e3
  c = config_lib.base_config()
  c.image_size = S
  out = bench_input.input_benchmark(c, num_images=8, workdir=str(tmp_path), repeats=1, batch=4)
  rates = [k for k in out if k.endswith("images_per_sec")]
  assert len(rates) == 6 and all(out[k] > 0 for k in rates)
  assert out["speedup_vs_authors"] == out["images_per_sec"] / out["authors_images_per_sec"]
  assert 60 <= out["jpeg_kb_min"] <= out["jpeg_kb_mean"] <= out["jpeg_kb_max"] <= 110
