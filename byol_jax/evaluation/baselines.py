"""What `--pretrained` names in the evaluation commands, and the two baselines among it.

`resolve_encoder(c, spec)` gives an encoder (a Pretrained): `spec` itself if it is one,
for `random` (RANDOM) the recipe's encoder with random weights (`random_init`), otherwise
`pretrained.load(spec)` (a pretraining workdir, a byol_jax export, an authors' .pkl).
Fine-tuning and every evaluation command run on any of these.

`resolve_features(c, spec)` gives what the linear protocol and kNN run on, a
features.FeatureExtractor: an encoder's representation, or for `pixels` (PIXELS) the
standardised raw pixels (`pixels_features`): each image, flattened to H*W*C values in
[0, 1], minus the per-pixel mean and divided by the per-pixel standard deviation of the
training split. The pixels have no encoder, so fine-tuning and export refuse them.

The pixel representation is H*W*C wide (784 for Fashion-MNIST, 150,528 for 224-px RGB):
the features mode of the linear protocol holds all training features in memory, so on
large images use linear.mode='augmented'.
"""
import os

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax.data import pipelines
from byol_jax.evaluation import features
from byol_jax.model import networks
from byol_jax.weights import encoder_weights
from byol_jax.weights import pretrained as pretrained_lib

RANDOM = "random"  # The `--pretrained` word for the recipe's encoder with random weights.
PIXELS = "pixels"  # The `--pretrained` word for the raw pixels, and their source.
MODULE = "pixels"  # The Haiku module holding the statistics: params[MODULE]['mean'|'std'].
# A pixel whose std over the training split is below this is constant there: it carries
# nothing a classifier could learn, and dividing by a tiny std would turn any other value
# at test time into a huge feature. Its std is stored as +inf, so its feature is 0.
STD_FLOOR = 1e-6


def pixel_statistics(c: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-pixel mean and std of dataset.train_split as the evaluation pipeline delivers it.

  Images are the centre crops of `pipelines.eval_dataset` (uint8 / 255); the padding of the last
  batch (mask 0) is left out. Batches are combined with Chan et al.'s pairwise update in
  float64, so the result is NumPy's two-pass mean and (population) std up to rounding.

  Returns:
    mean [H*W*C], std [H*W*C] (float64, std not floored), number of images.
  """
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


def _pixels_network(dim: int) -> hk.TransformedWithState:
  def forward(images, is_training):
    del is_training  # No state: training and evaluation are the same map.
    with hk.name_scope(MODULE):
      mean = hk.get_parameter("mean", [dim], jnp.float32, init=jnp.zeros)
      std = hk.get_parameter("std", [dim], jnp.float32, init=jnp.ones)
    x = jnp.reshape(images, (images.shape[0], -1)).astype(jnp.float32)
    return (x - mean) / std

  return hk.transform_with_state(forward)


def pixels_features(c: ml_collections.ConfigDict) -> features.FeatureExtractor:
  """The raw-pixel baseline: the statistics of `pixel_statistics` (std < STD_FLOOR -> inf).

  Args:
    c: the run config (dataset.*, image_size, batch_size), resolved from its data set.

  Returns:
    FeatureExtractor with source 'pixels', step 0, dim H*W*C, params {'pixels': {'mean',
    'std'}} (float32 [H*W*C]) and state {}; its network is the same map in training and
    evaluation, always in float32.
  """
  mean, std, _ = pixel_statistics(c)
  channels = pipelines.num_channels(c)
  dim = int(c.image_size) ** 2 * channels
  params = {MODULE: dict(mean=mean.astype(np.float32),
                         std=np.where(std < STD_FLOOR, np.inf, std).astype(np.float32))}
  return features.FeatureExtractor(
      name=f"raw pixels ({dim} standardised values)", dim=dim, network=_pixels_network(dim),
      params=params, state={}, image_size=int(c.image_size), channels=channels, step=0,
      source=PIXELS)


def random_init(c: ml_collections.ConfigDict, bn_batches: int = 50) -> encoder_weights.Pretrained:
  """The recipe's encoder with random weights: the baseline a pretrained encoder must beat.

  Weights are drawn as pretraining draws them (seed `c.seed + 1`, so not the pretraining
  run's own initialisation). Batch-norm moving statistics are estimated on `bn_batches`
  centre-cropped training batches (training-mode forward passes, decay model.bn_decay), so
  the baseline is not crippled by the initial statistics (mean 0, variance 1).

  Args:
    c: the run config (model, data set, image size, batch size, seed).
    bn_batches: training batches for the batch-norm statistics (0: keep the initial ones).

  Returns:
    Pretrained with source 'random' and step 0.
  """
  net = networks.make_encoder_network(c.model)
  channels = pipelines.num_channels(c)
  dummy = np.zeros((2, c.image_size, c.image_size, channels), np.float32)
  params, state = net.init(jax.random.PRNGKey(c.seed + 1), dummy, is_training=True)
  update = jax.jit(lambda s, x: net.apply(params, s, None, x, is_training=True)[1])
  if bn_batches > 0:
    source = pipelines.eval_dataset(c, c.dataset.train_split, local_device_count=1)
    for i, batch in enumerate(source):
      if i == bn_batches:
        break
      state = update(state, np.asarray(batch["image"][0], np.float32) / 255.0)  # uint8 -> [0, 1].
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  return encoder_weights.Pretrained(model=c.model, params=host(params), state=host(state),
                                    image_size=int(c.image_size), channels=channels, step=0,
                                    source=RANDOM)


def resolve_encoder(c: ml_collections.ConfigDict,
                    spec: "str | os.PathLike | encoder_weights.Pretrained"
                    ) -> encoder_weights.Pretrained:
  """`--pretrained` where an encoder is needed: a Pretrained is returned as is, 'random'
  gives `random_init(c)`, anything else is a path for `pretrained.load` ('pixels' names no
  encoder: `resolve_features` reads it)."""
  if isinstance(spec, encoder_weights.Pretrained):
    return spec
  if os.fspath(spec) == RANDOM:
    return random_init(c)
  return pretrained_lib.load(spec)


def resolve_features(c: ml_collections.ConfigDict,
                     spec: "str | os.PathLike | encoder_weights.Pretrained",
                     axis_name: str | None = None,
                     precision: str = "float32") -> features.FeatureExtractor:
  """`--pretrained` as the linear protocol and kNN read it: 'pixels' gives
  `pixels_features(c)`, anything else the representation of `resolve_encoder(c, spec)`
  (`features.of_encoder` with `axis_name` and `precision`)."""
  if not isinstance(spec, encoder_weights.Pretrained) and os.fspath(spec) == PIXELS:
    return pixels_features(c)
  return features.of_encoder(resolve_encoder(c, spec), axis_name, precision)
