"""What every encoder loader returns: `Pretrained`, the weights with the config that builds them.

The readers of each format (export_formats.py for byol_jax's safetensors exports,
release.py for the authors' .pkl, pretrained.py for workdirs) and the writers all speak
this type. It lives apart from pretrained.py, the loader that picks a reader, so the
dependency runs one way: pretrained -> {export_formats, release} -> encoder_weights.
"""
from typing import NamedTuple

import haiku as hk
import ml_collections

ENCODER_PREFIX = "encoder/"  # Top-level module of the encoder in every byol_jax network.
# Where a Pretrained came from: a workdir, a byol_jax export, an authors' release .pkl, or
# the random-encoder baseline of the evaluation commands (evaluation/baselines.py).
SOURCES = ("workdir", "byol_jax", "release", "random")


class Pretrained(NamedTuple):
  """A pretrained encoder, ready for `networks.make_encoder_network(model).apply`."""
  model: ml_collections.ConfigDict  # The `model` section it was trained with.
  params: hk.Params  # Encoder only, host NumPy arrays, 'encoder/~/...' module names.
  state: hk.State  # Encoder batch-norm moving statistics, same naming.
  image_size: int
  channels: int
  step: int  # Pretraining step it came from.
  source: str  # One of SOURCES.
