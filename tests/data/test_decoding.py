"""byol_jax.data.crops and .decoding: crop windows (ranges, fallback, seeds), JPEG crops
against tf.image references eagerly and in tf.data, DCT-scaled decoding, PNG bytes,
channels, CMYK JPEGs.
"""
import numpy as np
import tensorflow as tf

from byol_jax.data import crops
from byol_jax.data import pipelines
from tfds_images import (CMYK_BLOCKS, S, cmyk_jpeg, jpeg, make_config, reference_crop,
                         reference_jpeg_crops, smooth_image)


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
