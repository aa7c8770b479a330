"""What the frozen-feature evaluations run on: a `FeatureExtractor`, from an encoder or not.

The linear protocol and kNN (linear_eval.py) score features of images, whatever computes
them: a pretrained encoder (`of_encoder`) or the raw-pixel baseline
(baselines.pixels_features), which has no encoder and no model config. Fine-tuning trains
an encoder itself, so it takes a Pretrained, never a FeatureExtractor.
"""
from typing import NamedTuple

import haiku as hk
import ml_collections

from byol_jax.data import pipelines
from byol_jax.model import networks
from byol_jax.weights import encoder_weights


class FeatureExtractor(NamedTuple):
  """Frozen features of images, ready to pmap (evaluate.make_pmapped_features).

  `network.apply(params, state, None, images [N, H, W, C] float32 in [0, 1],
  is_training=False)` returns (features [N, dim] float32, state).
  """
  name: str  # What the features are, for progress lines: 'encoder resnet18 x0.5'.
  dim: int  # D, the width of the features.
  network: hk.TransformedWithState
  params: hk.Params  # Host NumPy arrays.
  state: hk.State
  image_size: int  # The images it takes: image_size px, `channels` channels.
  channels: int
  step: int  # The pretraining step of the weights (0 for a baseline).
  source: str  # A Pretrained's source, or the baseline's name ('pixels').


def of_encoder(p: encoder_weights.Pretrained, axis_name: str | None = None,
               precision: str = "float32") -> FeatureExtractor:
  """The representation of a pretrained encoder as a FeatureExtractor.

  Args:
    p: the encoder.
    axis_name, precision: as `networks.make_encoder_network` takes them (cross-replica
      batch-norm axis when pmapped, compute precision).

  Returns:
    FeatureExtractor named 'encoder <model.encoder> x<model.width>', of the
    representation's width.
  """
  return FeatureExtractor(
      name=f"encoder {p.model.encoder} x{p.model.width}",
      dim=networks.representation_dim(p.model),
      network=networks.make_encoder_network(p.model, axis_name, precision),
      params=p.params, state=p.state, image_size=int(p.image_size), channels=int(p.channels),
      step=int(p.step), source=p.source)


def check_images(c: ml_collections.ConfigDict, image_size: int, channels: int,
                 what: str) -> None:
  """Raises ValueError unless config `c` delivers the images a pretrained network takes.

  Args:
    c: the run config (image_size, dataset.*), resolved from its data set.
    image_size, channels: the images the network was trained on.
    what: the network, for the message ('encoder resnet18 x1.0').
  """
  given = pipelines.num_channels(c)
  if int(image_size) != int(c.image_size) or int(channels) != given:
    raise ValueError(
        f"the pretrained {what} was trained on {image_size} px images with {channels} "
        f"channel(s), but this config gives {c.image_size} px images with {given} channel(s) "
        f"(data set {c.dataset.name!r}): use the recipe it was pretrained with, or set "
        f"--config.image_size={image_size} and --config.dataset.channels={channels}.")
