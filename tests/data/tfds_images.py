"""Images the data tests write themselves: smooth test images, their real JPEG (and CMYK JPEG)
bytes, tf.image reference crops, and small tfds data sets stored with byol_jax's own writer.
"""
import struct

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax import config as config_lib
from byol_jax.data import prepare


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


# Bad inputs, label = index: 0-3 good, 4 truncated JPEG, 5 garbage, 6 CMYK JPEG,
# 7 grayscale JPEG, 8 PNG bytes (a PNG with a .jpg name reaches tfds like this).
CMYK_BLOCKS = np.random.default_rng(0).integers(0, 256, (5, 6, 4)).astype(np.uint8)
GOOD_LABELS = [0, 1, 2, 3, 6, 7, 8]

def take(iterator, n):
  return [next(iterator) for _ in range(n)]
