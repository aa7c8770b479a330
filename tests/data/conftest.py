"""The data tests' tfds data sets: 'byol_test_images' (real JPEGs of varied sizes) and
'byol_test_bad' (truncated, garbage, CMYK, grayscale and PNG bytes among good JPEGs).
"""
import pytest
import tensorflow as tf

from tfds_images import CMYK_BLOCKS, TEST_N, TRAIN_N, cmyk_jpeg, jpeg, smooth_image, store


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
  """'byol_test_images': train 10 / test 7 real JPEGs of varied sizes, label = index."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  train = [jpeg(smooth_image(24 + 4 * i, 60 - 3 * i, i)) for i in range(TRAIN_N)]
  test = [jpeg(smooth_image(30 + 2 * i, 40, 100 + i)) for i in range(TEST_N)]
  store(data_dir, "byol_test_images", {"train": train, "test": test})
  return data_dir, test


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_bad"))
  good = [jpeg(smooth_image(40, 48, i)) for i in range(4)]
  items = good + [good[0][:len(good[0]) // 2], b"not an image at all",
                  cmyk_jpeg(CMYK_BLOCKS), jpeg(smooth_image(40, 48, 7, channels=1)),
                  tf.io.encode_png(smooth_image(40, 48, 8)).numpy()]
  store(data_dir, "byol_test_bad", {"train": items, "test": items})
  return data_dir
