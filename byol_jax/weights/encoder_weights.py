"""What every encoder loader returns: `Pretrained`, the weights with the config that builds them.

The readers of each format (export_formats.py for byol_jax's safetensors exports,
release.py for the authors' .pkl, pretrained.py for workdirs) and the writers all speak
this type. It lives apart from pretrained.py, the loader that picks a reader, so the
dependency runs one way: pretrained -> {export_formats, release} -> encoder_weights.
"""
from typing import Any, Mapping, NamedTuple

import haiku as hk
import ml_collections

from byol_jax import config as config_lib

ENCODER_PREFIX = "encoder/"  # Top-level module of the encoder in every byol_jax network.
# "random" and "pixels" are the baselines of pretrained.resolve; "pixels" is no encoder
# (its params are pixel statistics, baselines.feature_network builds its features).
SOURCES = ("workdir", "byol_jax", "release", "random", "pixels")


class Pretrained(NamedTuple):
  """A pretrained encoder, ready for `networks.make_encoder_network(model).apply` (or the
  pixels baseline, source 'pixels': `baselines.feature_network` builds its features)."""
  model: ml_collections.ConfigDict  # The `model` section it was trained with.
  params: hk.Params  # Encoder only, host NumPy arrays, 'encoder/~/...' module names.
  state: hk.State  # Encoder batch-norm moving statistics, same naming.
  image_size: int
  channels: int
  step: int  # Pretraining step it came from.
  source: str  # One of SOURCES.


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config from its config.json dict, on top of today's defaults.

  JSON turns tuples into lists: a list where the schema holds a tuple becomes a tuple
  again. Fields the saved run predates keep their defaults; fields the schema no longer has
  are kept as saved.

  Args:
    saved: the parsed config.json of a workdir (or an export's 'config' header).

  Returns:
    An unlocked ConfigDict.
  """
  def merge(base: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
      current = base.get(key) if key in base else None
      if isinstance(value, Mapping):
        if not isinstance(current, ml_collections.ConfigDict):
          base[key] = ml_collections.ConfigDict()
        merge(base[key], value)
      elif isinstance(value, list) and isinstance(current, tuple):
        base[key] = tuple(value)
      else:
        base[key] = value
  c = config_lib.base_config()
  c.unlock()
  merge(c, saved)
  return c
