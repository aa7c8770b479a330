"""The preview grid: layout of the PNG and the views it shows."""
import numpy as np
import tensorflow as tf

import fakes
import tolerances
from byol_jax import config as config_lib
from byol_jax.data import prepare
from byol_jax.tools import preview


def test_grid_png_places_every_tile_at_its_row_and_column():
  rows = np.random.default_rng(0).uniform(size=(3, 4, 5, 5, 1)).astype(np.float32)
  image = tf.io.decode_png(preview.grid_png(rows)).numpy()
  gap, s = preview._GAP, 5
  assert image.shape == (3 * (s + gap) + gap, 4 * (s + gap) + gap, 1)
  for i in range(3):
    for j in range(4):
      y, x = gap + i * (s + gap), gap + j * (s + gap)
      np.testing.assert_array_equal(image[y:y + s, x:x + s], np.round(rows[i, j] * 255))
  assert np.all(image[:gap] == 255)


def test_preview_rows_show_the_crops_and_their_augmented_views(tmp_path):
  fakes.write_fashion_mnist(tmp_path / "idx", n_train=16, n_test=4)
  prepare.prepare_fashion_mnist(str(tmp_path / "idx"), str(tmp_path / "tfds"))
  c = config_lib.base_config()
  c.dataset.update(dict(name="fashion_mnist", data_dir=str(tmp_path / "tfds"), num_classes=10,
                        num_train_examples=16, train_split="train", eval_split="test"))
  c.batch_size, c.image_size = 8, 28
  # View 2 always solarizes and does nothing else, so it is exactly 1 - x above 0.5.
  for key in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob"):
    c.augment.view2[key] = 0.0
  c.augment.view2.solarize_prob = 1.0
  rows = preview.preview_rows(config_lib.validate(c), num_images=3)
  assert rows.shape == (3, 4, 28, 28, 1)
  assert rows.min() >= 0.0 and rows.max() <= 1.0
  crop2, view2 = rows[:, 2], rows[:, 3]
  # The same float32 crop values (uint8 / 255), then 1 - x rounded once: one ulp of 1.
  tolerances.assert_close(view2, np.where(crop2 < 0.5, crop2, 1.0 - crop2), tolerances.ulps(1))
  out = preview.write_preview(c, str(tmp_path / "out" / "views.png"), num_images=3)
  assert tf.io.decode_png(open(out, "rb").read()).shape[0] == 3 * (3 * 28 + 2) + 2  # x3 enlarged.
