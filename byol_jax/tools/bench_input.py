"""Host input benchmark: the pretrain pipeline against bare JPEG decoding and the authors'
host design, on the same ImageNet-like JPEGs, in one run.

The JPEGs are made here (about 500x375, 60-110 KB at quality 90, like ImageNet's train
set): smooth gradients, soft-edged shapes and mild multi-scale texture, not noise, so
their entropy and decode cost resemble photographs. They are written once as a tfds
data set; every variant reads those files through tfds with the same tf.data options.
"""
import gc
import os
import resource
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from byol_jax.data import crops
from byol_jax.data import decoding
from byol_jax.data import pipelines
from byol_jax.store import files
from byol_jax.data import prepare

BENCH_NAME = "byol_bench_jpegs"
PHOTO_SHAPE = (375, 500)  # ImageNet's most common size (h, w); some are turned portrait.


def synthetic_photo(rng: np.random.Generator, height: int, width: int,
                    texture: float) -> np.ndarray:
  """A photo-like [height, width, 3] uint8 image; `texture` scales its fine detail."""
  ys = np.arange(height, dtype=np.float32)[:, None]
  xs = np.arange(width, dtype=np.float32)[None, :]
  c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * xs + np.sin(angle) * ys + height + width) / (2 * (height + width))
  image = c0 + (c1 - c0) * ramp[..., None]
  for _ in range(rng.integers(4, 10)):  # Soft ellipses and boxes, drawn in their boxes.
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(15, height / 2), rng.uniform(15, width / 2)
    y0, y1 = int(max(0, cy - ry)), int(min(height, cy + ry + 1))
    x0, x1 = int(max(0, cx - rx)), int(min(width, cx + rx + 1))
    dy, dx = np.abs(ys[y0:y1] - cy) / ry, np.abs(xs[:, x0:x1] - cx) / rx
    dist = dy**2 + dx**2 if rng.random() < 0.5 else np.maximum(dy, dx)**2
    alpha = np.clip((1.0 - dist) * rng.uniform(3, 30), 0, 1)[..., None]
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch + (rng.uniform(0, 255, 3).astype(np.float32) - patch) * alpha
  luma = np.zeros((height, width), np.float32)
  for scale, amplitude in ((1, 4.0), (2, 6.0), (4, 6.0), (8, 5.0)):
    coarse = rng.normal(0, amplitude * texture, (-(-height // scale), -(-width // scale)))
    luma += np.repeat(np.repeat(coarse.astype(np.float32), scale, 0), scale, 1)[
        :height, :width]
  return np.clip(image + luma[..., None], 0, 255).astype(np.uint8)


def write_jpegs(data_dir: str, num_images: int, seed: int = 0) -> list[int]:
  """Writes `num_images` synthetic photos (JPEG, quality 90) as tfds data set BENCH_NAME.

  Returns:
    The byte size of each JPEG.
  """
  rng = np.random.default_rng(seed)
  encoded = []
  for _ in range(num_images):
    h, w = PHOTO_SHAPE if rng.random() < 0.8 else PHOTO_SHAPE[::-1]
    image = synthetic_photo(rng, h, w, texture=rng.uniform(1.1, 3.2))
    encoded.append(tf.io.encode_jpeg(image, quality=90).numpy())
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000)})
  examples = [(str(i), {"image": b, "label": i % 1000}) for i, b in enumerate(encoded)]
  prepare.store_dataset(BENCH_NAME, "1.0.0", features, {"train": examples}, data_dir)
  return [len(b) for b in encoded]


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(make_batches, num_batches: int, batch: int) -> tuple[float, float]:
  """Images per wall second and per CPU second over `num_batches` after one warm-up."""
  batches = make_batches()
  next(batches)  # Tracing, file opening and buffer filling are not throughput.
  cpu, start = _cpu_seconds(), time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  images = num_batches * batch
  figures = images / (time.perf_counter() - start), images / max(_cpu_seconds() - cpu, 1e-9)
  del batches  # Stops its prefetching threads before the next variant is timed.
  gc.collect()
  return figures


def _map_variant(config, fn, batch: int):
  """Reads the bench files as data.py does and maps `fn` over the bytes, batched."""
  builder = tfds.builder(BENCH_NAME, data_dir=config.dataset.data_dir)
  ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.repeat().map(lambda ex: fn(ex["image"]), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(pipelines.tf_data_options(config, False))))


def _variants(config):
  """name -> per-image function of the JPEG bytes, for the bare map variants."""
  size = config.image_size
  area, aspect = decoding.crop_ranges(config)

  def window(hw):
    return crops.random_crop_window(hw, area, aspect)[None]

  def decode_only(image_bytes):
    return tf.shape(tf.io.decode_jpeg(image_bytes, channels=3))  # Decoded, not copied out.

  def authors(image_bytes):
    views = []
    for _ in range(2):  # Two fused decode-and-crops, float32 bicubic, [0, 1] floats.
      shape = tf.image.extract_jpeg_shape(image_bytes)
      crop = tf.io.decode_and_crop_jpeg(image_bytes, window(shape[:2])[0], channels=3)
      resized = tf.image.resize(crop, [size, size], tf.image.ResizeMethod.BICUBIC)
      views.append(tf.clip_by_value(resized / 255.0, 0.0, 1.0))
    return views

  def two_decode_and_crop(image_bytes):  # uint8 out, one fused decode per view.
    return [crops.decode_and_crop(image_bytes, window, size, 3) for _ in range(2)]

  def full_decode_two_crops(image_bytes):  # uint8 out, one full decode for both views.
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    views = []
    for _ in range(2):
      y, x, h, w = tf.unstack(window(tf.shape(image)[:2])[0])
      views.append(crops.resize_uint8(image[y:y + h, x:x + w], size))
    return views

  def box_decode_two_crops(image_bytes):  # crops.decode_and_crop: one decode of the box.
    return crops.decode_and_crop(
        image_bytes, lambda hw: tf.concat([window(hw), window(hw)], 0), size, 3)

  return dict(decode_only=decode_only, authors=authors,
              two_decode_and_crop=two_decode_and_crop,
              full_decode_two_crops=full_decode_two_crops,
              box_decode_two_crops=box_decode_two_crops)


def input_benchmark(config, num_images: int = 512, workdir: str | None = None,
                    repeats: int = 3, batch: int = 32) -> dict:
  """Measures host input throughput; every variant runs `repeats` times, interleaved.

  Args:
    config: run config; image_size and augment.crop_* are used, the data set is ours.
    num_images: JPEGs written, and images timed per variant and repeat.
    workdir: where the tfds data set is written (default: a temporary folder).
    repeats: rounds over all variants; figures are medians (other jobs share the CPU).
    batch: images per timed batch.

  Returns:
    A dict of figures: images_per_sec (the pretrain pipeline, two views),
    images_per_sec_per_core, decode_only_images_per_sec, authors_images_per_sec, and
    for our uint8 crops three decode strategies' images_per_sec (two_decode_and_crop:
    a fused decode per view; full_decode_two_crops; box_decode_two_crops: one fused
    decode of the views' bounding box, what data.py does), the ratios, images per
    CPU-second of each variant (steadier than wall time on a shared machine), the JPEG
    sizes, and every run's (wall, cpu) figures under 'runs'.
  """
  owned = None if workdir else tempfile.TemporaryDirectory()
  data_dir = files.join(workdir or owned.name, "tfds")
  sizes = write_jpegs(data_dir, num_images)
  bench = config.copy_and_resolve_references()
  bench.unlock()
  bench.batch_size = batch
  bench.dataset.update(dict(name=BENCH_NAME, data_dir=data_dir, train_split="train",
                            deterministic=False, cache_max_bytes=0))
  num_batches = max(1, num_images // batch)
  runs = {name: [] for name in ("pipeline", *_variants(bench))}
  for _ in range(repeats):
    runs["pipeline"].append(_timed(
        lambda: pipelines.pretrain_dataset(bench, local_device_count=1), num_batches, batch))
    for name, fn in _variants(bench).items():
      runs[name].append(_timed(lambda: _map_variant(bench, fn, batch), num_batches, batch))
  if owned:
    owned.cleanup()
  wall = {k: float(np.median([r[0] for r in v])) for k, v in runs.items()}
  cpu = {k: float(np.median([r[1] for r in v])) for k, v in runs.items()}
  cores = len(os.sched_getaffinity(0))
  return {
      "image_size": int(config.image_size), "num_images": num_images, "cpu_cores": cores,
      "jpeg_kb_mean": float(np.mean(sizes) / 1e3), "jpeg_kb_min": min(sizes) / 1e3,
      "jpeg_kb_max": max(sizes) / 1e3,
      "images_per_sec": wall["pipeline"], "images_per_sec_per_core": wall["pipeline"] / cores,
      "decode_only_images_per_sec": wall["decode_only"],
      "authors_images_per_sec": wall["authors"],
      "two_decode_and_crop_images_per_sec": wall["two_decode_and_crop"],
      "full_decode_two_crops_images_per_sec": wall["full_decode_two_crops"],
      "box_decode_two_crops_images_per_sec": wall["box_decode_two_crops"],
      "speedup_vs_authors": wall["pipeline"] / wall["authors"],
      "fraction_of_decode_only": wall["pipeline"] / wall["decode_only"],
      "authors_fraction_of_decode_only": wall["authors"] / wall["decode_only"],
      "images_per_cpu_sec": cpu,
      "runs": {k: [[round(x, 1) for x in r] for r in v] for k, v in runs.items()},
  }
