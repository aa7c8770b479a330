"""Tests of byol_jax.data.crops and byol_jax.data.pipelines: crops against tf.image references, pipelines
end to end on tfds data sets the tests write (real JPEG bytes) and on mocked imagenet2012."""
import struct

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import config as config_lib
from byol_jax.data import crops
from byol_jax.data import pipelines
from byol_jax.data import prepare
from byol_jax.data import sources

tfds.disable_progress_bar()
S = 16
TRAIN_N, TEST_N = 10, 7


# --------------------------------------------------------------------------- helpers


def smooth_image(h, w, seed, channels=3, rectangle=True):
  """Gradients and one bright rectangle: JPEG keeps such images close to lossless."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  planes = [rng.uniform(40, 120) * yy / h + rng.uniform(40, 120) * xx / w + rng.uniform(0, 15)
            for _ in range(channels)]
  image = np.stack(planes, -1)
  y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
  if rectangle:
    image[y0:y0 + h // 3, x0:x0 + w // 3] = 230
  return image.astype(np.uint8)


def jpeg(image, quality=95):
  fmt = "grayscale" if image.shape[-1] == 1 else "rgb"
  return tf.io.encode_jpeg(image, format=fmt, quality=quality).numpy()


def reference_crop(image, window, size=S):
  """Independent reference: slice the decoded image, tf.image bicubic, round, clip."""
  y, x, h, w = window
  out = tf.image.resize(image[y:y + h, x:x + w], [size, size], method="bicubic")
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def reference_jpeg_crops(encoded, windows, size=S):
  """The documented JPEG rule, step by step: tf.io.decode_and_crop_jpeg over the
  windows' bounding box (rounded outwards) at DCT scale 1/r, r the largest of 1, 2, 4, 8
  with every crop side >= r * size; then each window divided by r, sliced, resized."""
  r = max(r for r in (1, 2, 4, 8) if r == 1 or min(min(w[2:]) for w in windows) >= r * size)
  height, width = tf.image.extract_jpeg_shape(encoded).numpy()[:2]
  y0, x0 = min(w[0] for w in windows) // r, min(w[1] for w in windows) // r
  y1 = min(-(-max(w[0] + w[2] for w in windows) // r), -(-height // r))
  x1 = min(-(-max(w[1] + w[3] for w in windows) // r), -(-width // r))
  region = tf.io.decode_and_crop_jpeg(encoded, [y0, x0, y1 - y0, x1 - x0], channels=3,
                                      ratio=r).numpy()
  return np.stack([reference_crop(region, [w[0] // r - y0, w[1] // r - x0,
                                           max(1, w[2] // r), max(1, w[3] // r)], size)
                   for w in windows])


def reference_jpeg_crop(encoded, window, size=S):
  return reference_jpeg_crops(encoded, [window], size)[0]


def centre_window(h, w):
  side = int(0.875 * min(h, w))
  return [(h - side + 1) // 2, (w - side + 1) // 2, side, side]


_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)  # JPEG Annex K.3 DC table.


def cmyk_jpeg(blocks):
  """A baseline 4-component (Adobe CMYK) JPEG whose 8x8 blocks are flat.

  blocks: [BH, BW, 4] uint8 component values per block. Only DC coefficients are coded
  (quantiser 1, every block's AC run is a single end-of-block), so a decoder returns
  exactly these values. tf.io.encode_jpeg cannot write CMYK, hence this encoder.
  """
  codes, code, k = {}, 0, 0
  for length, count in enumerate(_DC_BITS, start=1):
    for _ in range(count):
      codes[k], code, k = (code, length), code + 1, k + 1
    code <<= 1
  bits, prev = [], [0] * 4

  def put(value, length):
    bits.extend((value >> (length - 1 - i)) & 1 for i in range(length))

  for row in blocks:
    for block in row:
      for c in range(4):
        dc = 8 * (int(block[c]) - 128)  # Flat block: DC = 8 x level-shifted value.
        diff, prev[c] = dc - prev[c], dc
        size = abs(diff).bit_length()
        put(*codes[size])
        if size:
          put(diff if diff > 0 else diff + (1 << size) - 1, size)
        put(0, 1)  # AC table holds one symbol, end-of-block, coded '0'.
  bits += [1] * (-len(bits) % 8)
  scan = bytearray()
  for i in range(0, len(bits), 8):
    scan.append(int("".join(map(str, bits[i:i + 8])), 2))
    if scan[-1] == 0xFF:
      scan.append(0)

  def seg(marker, body):
    return struct.pack(">HH", marker, len(body) + 2) + body

  sof = struct.pack(">BHHB", 8, 8 * blocks.shape[0], 8 * blocks.shape[1], 4) + b"".join(
      bytes([i + 1, 0x11, 0]) for i in range(4))
  dht = bytes([0x00, *_DC_BITS, *range(12), 0x10, 1, *[0] * 15, 0x00])
  sos = bytes([4, *[b for i in range(4) for b in (i + 1, 0)], 0, 63, 0])
  return (b"\xff\xd8" + seg(0xFFEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)) +
          seg(0xFFDB, bytes([0] + [1] * 64)) + seg(0xFFC0, sof) + seg(0xFFC4, dht) +
          seg(0xFFDA, sos) + bytes(scan) + b"\xff\xd9")


def make_config(name, data_dir, **dataset):
  c = config_lib.base_config()
  c.image_size, c.batch_size, c.seed = S, 8, 3
  c.dataset.update(dict(name=name, data_dir=data_dir, train_split="train",
                        eval_split="test", validation_examples=3, deterministic=True))
  c.dataset.update(dataset)
  return c


def store(data_dir, name, splits):
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=16)})
  prepare.store_dataset(name, "1.0.0", features, {
      split: [(str(i), {"image": b, "label": i}) for i, b in enumerate(items)]
      for split, items in splits.items()}, data_dir)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  """'byol_test_images': train 10 / test 7 real JPEGs of varied sizes, label = index."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  train = [jpeg(smooth_image(24 + 4 * i, 60 - 3 * i, i)) for i in range(TRAIN_N)]
  test = [jpeg(smooth_image(30 + 2 * i, 40, 100 + i)) for i in range(TEST_N)]
  store(data_dir, "byol_test_images", {"train": train, "test": test})
  return data_dir, test


# Bad inputs, label = index: 0-3 good, 4 truncated JPEG, 5 garbage, 6 CMYK JPEG,
# 7 grayscale JPEG, 8 PNG bytes (a PNG with a .jpg name reaches tfds like this).
CMYK_BLOCKS = np.random.default_rng(0).integers(0, 256, (5, 6, 4)).astype(np.uint8)
GOOD_LABELS = [0, 1, 2, 3, 6, 7, 8]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_bad"))
  good = [jpeg(smooth_image(40, 48, i)) for i in range(4)]
  items = good + [good[0][:len(good[0]) // 2], b"not an image at all",
                  cmyk_jpeg(CMYK_BLOCKS), jpeg(smooth_image(40, 48, 7, channels=1)),
                  tf.io.encode_png(smooth_image(40, 48, 8)).numpy()]
  store(data_dir, "byol_test_bad", {"train": items, "test": items})
  return data_dir


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------ crop ops


def test_random_crop_windows_respect_area_and_aspect_ranges_or_fall_back_to_centre():
  hw = tf.constant([60, 80])
  centre = crops.centre_crop_window(hw, 224 / 256).numpy()
  areas = []
  for i in range(150):
    y, x, h, w = crops.random_crop_window(hw, (0.08, 1.0), (3 / 4, 4 / 3),
                                          seed=tf.constant([i, 7])).numpy()
    assert 0 <= y and y + h <= 60 and 0 <= x and x + w <= 80
    if not np.array_equal([y, x, h, w], centre):
      areas.append(h * w / 4800)
      assert 0.08 - 0.02 <= areas[-1] <= 1.0
      assert 3 / 4 - 0.06 <= w / h <= 4 / 3 + 0.06
  # Area is uniform in [0.08, 1] among accepted tries: a wide spread, not one size.
  assert len(areas) > 100 and min(areas) < 0.2 and max(areas) > 0.7


def test_impossible_crop_falls_back_to_the_centre_crop_hand_worked():
  # Aspect 10:1 at >= 50% area cannot fit a 100x80 image: centre 70x70 at (15, 5).
  window = crops.random_crop_window(tf.constant([100, 80]), (0.5, 1.0), (10.0, 11.0),
                                    seed=tf.constant([0, 0]))
  np.testing.assert_array_equal(window, [15, 5, 70, 70])  # side int(0.875 * 80) = 70.


def test_stateless_windows_are_functions_of_the_seed():
  hw = tf.constant([60, 80])

  def win(seed):
    return crops.random_crop_window(hw, (0.08, 1), (0.75, 4 / 3), tf.constant(seed)).numpy()

  np.testing.assert_array_equal(win([1, 2]), win([1, 2]))
  assert len({tuple(win([i, 2])) for i in range(10)}) > 5


def test_two_window_jpeg_crops_equal_tf_image_reference_eagerly_and_in_tf_data():
  encoded = jpeg(smooth_image(48, 64, 0))
  windows = [[3, 5, 30, 28], [10, 2, 25, 20]]  # Shortest side < 2 S: no DCT scaling.

  def fn(image_bytes):
    return crops.decode_and_crop(image_bytes, lambda hw: tf.constant(windows), S, 3)

  eager = fn(tf.constant(encoded)).numpy()
  in_graph = next(iter(tf.data.Dataset.from_tensors(encoded).map(fn))).numpy()
  for got in (eager, in_graph):
    assert got.shape == (2, S, S, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, reference_jpeg_crops(encoded, windows))
  # Against a full decode: libjpeg upsamples chroma inside the decoded box only, so
  # pixels at the box's edges may differ by a level or two.
  full = tf.io.decode_jpeg(encoded, channels=3).numpy()
  diff = np.abs(eager.astype(int) - np.stack([reference_crop(full, w) for w in windows]))
  assert diff.max() <= 3 and diff.mean() < 0.5


def test_single_window_jpeg_uses_decode_and_crop_and_matches_reference():
  encoded = jpeg(smooth_image(48, 64, 1))
  window = [7, 9, 25, 31]  # Shortest side < 2 S: no DCT scaling.
  got = crops.decode_and_crop(tf.constant(encoded), lambda hw: tf.constant([window]), S, 3)[0]
  expected = reference_crop(tf.io.decode_jpeg(encoded, channels=3).numpy(), window)
  # libjpeg upsamples chroma from the cropped region only: a level or two at the edges.
  diff = np.abs(got.numpy().astype(int) - expected)
  assert diff.max() <= 3 and diff.mean() < 0.5


def test_large_crops_use_dct_scaled_decoding_close_to_full_resolution():
  # No sharp edges: there, non-antialiased bicubic from full size aliases, DCT scaling not.
  encoded = jpeg(smooth_image(160, 200, 2, rectangle=False))
  windows = tf.constant([[10, 20, 100, 120], [0, 0, 160, 200]])  # Shortest 100 >= 4 * S.
  got = crops.decode_and_crop(tf.constant(encoded), lambda hw: windows, S, 3).numpy()
  quarter = tf.io.decode_jpeg(encoded, channels=3, ratio=4).numpy()  # Box: whole image.
  scaled = [reference_crop(quarter, w) for w in [(2, 5, 25, 30), (0, 0, 40, 50)]]
  np.testing.assert_array_equal(got, scaled)  # The ratio-4 path, windows scaled by 4.
  offset = [[30, 41, 66, 70], [50, 60, 90, 99]]  # Shortest 66 >= 2 S: ratio 4, odd box.
  got_offset = crops.decode_and_crop(tf.constant(encoded), lambda hw: tf.constant(offset), S, 3)
  np.testing.assert_array_equal(got_offset, reference_jpeg_crops(encoded, offset))
  full = tf.io.decode_jpeg(encoded, channels=3).numpy()
  for view, w in zip(got, windows.numpy()):
    assert np.abs(view.astype(int) - reference_crop(full, w)).mean() < 1.5


def test_png_bytes_decode_then_crop_exactly():
  image = smooth_image(30, 44, 3)
  window = [2, 4, 20, 30]
  got = crops.decode_and_crop(tf.io.encode_png(image), lambda hw: tf.constant([window] * 2),
                              S, 3).numpy()
  np.testing.assert_array_equal(got[0], reference_crop(image, window))


def test_num_channels_follows_the_data_set_unless_configured(images_dir, tmp_path):
  c = make_config("byol_test_images", images_dir[0])
  assert pipelines.num_channels(c) == 3
  c.dataset.channels = 1
  assert pipelines.num_channels(c) == 1
  assert next(pipelines.eval_dataset(c, local_device_count=1))["image"].shape[-1] == 1


def test_grayscale_and_rgb_jpegs_convert_to_the_configured_channels():
  gray = jpeg(smooth_image(32, 32, 4, channels=1))

  def window(hw):
    return tf.constant([[0, 0, 32, 32]])

  rgb_out = crops.decode_and_crop(tf.constant(gray), window, S, 3).numpy()[0]
  assert rgb_out.shape == (S, S, 3)
  np.testing.assert_array_equal(rgb_out[..., 0], rgb_out[..., 2])
  colour = smooth_image(32, 32, 5)
  gray_out = crops.decode_and_crop(tf.constant(jpeg(colour)), window, S, 1).numpy()[0]
  luma = tf.image.rgb_to_grayscale(colour).numpy()  # ITU-R 601 weights, as libjpeg's Y.
  assert gray_out.shape == (S, S, 1)
  assert np.abs(gray_out.astype(int) - reference_crop(luma, [0, 0, 32, 32])).mean() < 3


def test_cmyk_jpeg_decodes_to_rgb_by_the_adobe_formula():
  encoded = cmyk_jpeg(CMYK_BLOCKS)
  got = crops.decode_and_crop(tf.constant(encoded), lambda hw: tf.constant([[0, 0, 40, 40]]),
                              40, 3).numpy()[0]  # Same size: the resize is the identity.
  c, m, y, k = np.moveaxis(CMYK_BLOCKS.astype(float), -1, 0)
  rgb = np.stack([c * k, m * k, y * k], -1) / 255  # Inverted (Adobe) CMYK: R = C * K / 255.
  expected = np.repeat(np.repeat(rgb, 8, 0), 8, 1)[:, :40]
  assert np.abs(got - expected).max() <= 1.5


# ---------------------------------------------------------------------- pipelines


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
  from byol_jax.tools import bench_input  # Here, not at the top: only this test needs it.
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
