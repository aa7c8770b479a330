"""What the network is trained on: a PNG grid of host crops and their augmented views.

Each row is one training image: [crop 1 | view 1 | crop 2 | view 2], where the crops
come from the pretraining pipeline and the views are those crops after the on-device
augmentation of the config's view presets, exactly as the update step makes them.
"""

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from byol_jax.training import augment
from byol_jax.data import pipelines
from byol_jax.store import files

_GAP = 2  # Pixels of white between tiles.


def preview_rows(c: ml_collections.ConfigDict, num_images: int = 8, seed: int = 0) -> np.ndarray:
  """[num_images, 4, S, S, C] float32 in [0, 1]: crop 1, view 1, crop 2, view 2."""
  source = pipelines.pretrain_dataset(c, local_device_count=1)
  batch = next(source)
  crops1, crops2 = batch["view1"][0][:num_images], batch["view2"][0][:num_images]
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(crops1))
  view1 = augment.augment_view(crops1, keys[:len(crops1)], c.augment.view1.to_dict())
  view2 = augment.augment_view(crops2, keys[len(crops1):], c.augment.view2.to_dict())
  to_float = lambda x: np.asarray(augment.to_unit_range(x))
  return np.stack([to_float(crops1), np.asarray(view1), to_float(crops2), np.asarray(view2)], 1)


def grid_png(rows: np.ndarray) -> bytes:
  """PNG bytes of a [R, K, S, S, C] array in [0, 1] laid out as R rows of K tiles."""
  r, k, s, _, c = rows.shape
  canvas = np.ones((r * (s + _GAP) + _GAP, k * (s + _GAP) + _GAP, c), np.float32)
  for i in range(r):
    for j in range(k):
      y, x = _GAP + i * (s + _GAP), _GAP + j * (s + _GAP)
      canvas[y:y + s, x:x + s] = rows[i, j]
  pixels = np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)
  return tf.io.encode_png(pixels).numpy()


def write_preview(c: ml_collections.ConfigDict, out: str, num_images: int = 8) -> str:
  """Writes the grid to `out` (a .png path) and returns the path."""
  if num_images < 1 or num_images > c.batch_size:
    raise ValueError(f"num_images={num_images} must be between 1 and batch_size={c.batch_size}.")
  rows = preview_rows(c, num_images)
  scale = max(1, 96 // c.image_size)  # Small images are enlarged (nearest) to be seen.
  png = grid_png(np.repeat(np.repeat(rows, scale, axis=2), scale, axis=3))
  files.write_bytes_atomic(out, png)
  return out
