"""Feature extractors that are not pretrained encoders: the baselines of the results tables.

`--pretrained=pixels` (`PIXELS`) evaluates the standardised raw pixels: each image,
flattened to H*W*C values in [0, 1], minus the per-pixel mean and divided by the
per-pixel standard deviation of the training split (`pixels_baseline`). It is returned as
a `Pretrained` (source 'pixels', model.encoder 'pixels', params {'pixels': {mean, std}}),
so the linear protocol and kNN run on it exactly as on an encoder: `feature_network` and
`feature_dim` are what the evaluation commands build their feature extractor from.
Fine-tuning and export need an encoder and refuse it.

The representation is H*W*C wide (784 for Fashion-MNIST, 150,528 for 224-px RGB): the
features mode of the linear protocol holds all training features in memory, so on large
images use linear.mode='augmented'.
"""
import haiku as hk
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax.weights import encoder_weights
from byol_jax.model import networks

PIXELS = "pixels"  # The `--pretrained` value, the Pretrained's source and model.encoder.
MODULE = "pixels"  # The Haiku module holding the statistics: params[MODULE]['mean'|'std'].
# A pixel whose std over the training split is below this is constant there: it carries
# nothing a classifier could learn, and dividing by a tiny std would turn any other value
# at test time into a huge feature. Its std is stored as +inf, so its feature is 0.
STD_FLOOR = 1e-6


def is_pixels(p: encoder_weights.Pretrained) -> bool:
  return p.source == PIXELS


def pixel_statistics(c: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-pixel mean and std of dataset.train_split as the evaluation pipeline delivers it.

  Images are the centre crops of `pipelines.eval_dataset` (uint8 / 255); the padding of the last
  batch (mask 0) is left out. Batches are combined with Chan et al.'s pairwise update in
  float64, so the result is NumPy's two-pass mean and (population) std up to rounding.

  Returns:
    mean [H*W*C], std [H*W*C] (float64, std not floored), number of images.
  """
  from byol_jax.data import pipelines  # Local: data pulls in TensorFlow.
  count, mean, m2 = 0, None, None
  for batch in pipelines.eval_dataset(c, c.dataset.train_split, local_device_count=1):
    images = np.asarray(batch["image"])
    keep = np.asarray(batch["mask"]).reshape(-1).astype(bool)
    x = images.reshape((keep.size, -1))[keep].astype(np.float64) / 255.0
    if not len(x):
      continue
    n, batch_mean = len(x), x.mean(axis=0)
    batch_m2 = np.sum(np.square(x - batch_mean), axis=0)
    if mean is None:
      count, mean, m2 = n, batch_mean, batch_m2
      continue
    delta, total = batch_mean - mean, count + n
    mean = mean + delta * (n / total)
    m2 = m2 + batch_m2 + np.square(delta) * (count * n / total)
    count = total
  if mean is None:
    raise ValueError(f"split {c.dataset.train_split!r} of {c.dataset.name!r} has no examples: "
                     "the pixels baseline takes its statistics from it.")
  return mean, np.sqrt(m2 / count), count


def pixels_baseline(c: ml_collections.ConfigDict) -> encoder_weights.Pretrained:
  """The raw-pixel baseline: the statistics of `pixel_statistics` (std < STD_FLOOR -> inf).

  Args:
    c: the run config (dataset.*, image_size, batch_size), resolved from its data set.

  Returns:
    Pretrained with source 'pixels', step 0, model = a copy of c.model with encoder
    'pixels', params {'pixels': {'mean', 'std'}} (float32 [H*W*C]) and state {}.
  """
  from byol_jax.data import pipelines  # Local: data pulls in TensorFlow.
  mean, std, _ = pixel_statistics(c)
  model = ml_collections.ConfigDict(c.model.to_dict())  # Not ConfigDict(c.model): shared refs.
  model.encoder = PIXELS
  params = {MODULE: dict(mean=mean.astype(np.float32),
                         std=np.where(std < STD_FLOOR, np.inf, std).astype(np.float32))}
  return encoder_weights.Pretrained(model=model, params=params, state={},
                                    image_size=int(c.image_size), channels=pipelines.num_channels(c),
                                    step=0, source=PIXELS)


def _pixels_network(dim: int) -> hk.TransformedWithState:
  def forward(images, is_training):
    del is_training  # No state: training and evaluation are the same map.
    with hk.name_scope(MODULE):
      mean = hk.get_parameter("mean", [dim], jnp.float32, init=jnp.zeros)
      std = hk.get_parameter("std", [dim], jnp.float32, init=jnp.ones)
    x = jnp.reshape(images, (images.shape[0], -1)).astype(jnp.float32)
    return (x - mean) / std

  return hk.transform_with_state(forward)


def feature_network(p: encoder_weights.Pretrained, axis_name: str | None = None,
                    precision: str = "float32") -> hk.TransformedWithState:
  """The frozen feature extractor of `p`, as `networks.make_encoder_network` builds one.

  Args:
    p: a Pretrained; for the pixels baseline, the standardisation of the flattened image
      (always float32: `axis_name` and `precision` do not apply), otherwise
      exactly `networks.make_encoder_network(p.model, axis_name, precision)`.

  Returns:
    transformed; apply(params, state, rng_or_None, images [N, H, W, C] float32 in [0, 1],
    is_training) -> (features [N, feature_dim(p)] float32, state).
  """
  if is_pixels(p):
    return _pixels_network(feature_dim(p))
  return networks.make_encoder_network(p.model, axis_name, precision)


def feature_dim(p: encoder_weights.Pretrained) -> int:
  """D of `feature_network(p)`'s output: H*W*C for pixels, else the representation's."""
  if is_pixels(p):
    return int(p.image_size) ** 2 * int(p.channels)
  return networks.representation_dim(p.model)


def describe(p: encoder_weights.Pretrained) -> str:
  """What the features are, for progress lines: 'encoder resnet18 x0.5' or the pixels."""
  if is_pixels(p):
    return f"raw pixels ({feature_dim(p)} standardised values)"
  return f"encoder {p.model.encoder} x{p.model.width}"
