"""The BYOL networks: the MLP heads, precision policies, input normalisation, the forwards.

`make_byol_network` puts the projector, predictor and online linear probe on the ResNet
encoder (resnet.py, built from layers.py's parts); `make_encoder_network` is the encoder
alone, under the same parameter names. Both are built inside `hk.transform_with_state`:
parameters and batch-norm statistics are plain pytrees. The PRECISIONS registry is keyed
by config's names.
"""
import contextlib
import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections
import numpy as np

from byol_jax import config as config_lib
from byol_jax.model import layers as layers_lib
from byol_jax.model import resnet

Array = jax.Array


class MLP(hk.Module):
  """Projector / predictor: Linear(hidden, bias) -> norm -> relu -> Linear(out, no bias)."""

  def __init__(self, hidden: int, output: int, layers: layers_lib.Layers, name: str):
    super().__init__(name=name)
    self._hidden, self._output, self._layers = hidden, output, layers

  def __call__(self, x: Array, is_training: bool) -> Array:
    """x [N, D] -> [N, output]."""
    x = hk.Linear(self._hidden, with_bias=True)(x)
    x = jax.nn.relu(self._layers.norm_layer(None, self._hidden)(x, is_training))
    return hk.Linear(self._output, with_bias=False)(x)


# Mixed precision: (module class, policy) pairs pushed for the duration of a forward.
# Normalisation keeps float32 statistics and parameters; everything else computes in bf16.
_BF16_COMPUTE = jmp.get_policy("params=float32,compute=bfloat16,output=bfloat16")
_F32_NORM = jmp.get_policy("params=float32,compute=float32,output=bfloat16")
PRECISIONS = {
    "float32": (),
    "bfloat16": ((resnet.ResNet, _BF16_COMPUTE), (MLP, _BF16_COMPUTE),
                 (hk.Linear, _BF16_COMPUTE), (hk.BatchNorm, _F32_NORM),
                 (hk.GroupNorm, _F32_NORM)),
}


@contextlib.contextmanager
def _precision_scope(policies):
  with contextlib.ExitStack() as stack:
    for cls, policy in policies:
      stack.enter_context(hk.mixed_precision.push_policy(cls, policy))
    yield


def _check_width(width: float) -> None:
  if not width > 0:
    raise ValueError(f"config.model.width={width!r} must be > 0 (e.g. 1, 2, 0.125).")


def _layers_from_config(model_cfg: ml_collections.ConfigDict, axis_name,
                        precision: str = "float32") -> layers_lib.Layers:
  layers_lib.lookup(layers_lib.NORMS, model_cfg.norm, "model.norm")
  layers_lib.lookup(layers_lib.PADDINGS, model_cfg.padding, "model.padding")
  layers_lib.lookup(layers_lib.CONV_IMPLS, model_cfg.conv_impl, "model.conv_impl")
  layers_lib.group_count(1, model_cfg.gn_groups)  # Validates gn_groups >= 1.
  _check_width(model_cfg.width)
  return layers_lib.Layers(norm=model_cfg.norm, padding=model_cfg.padding,
                           bn_decay=model_cfg.bn_decay, bn_eps=model_cfg.bn_eps,
                           gn_groups=model_cfg.gn_groups, conv_impl=model_cfg.conv_impl,
                           axis_name=axis_name, remat_norms=precision == "bfloat16")


def head_norm_layers(model_cfg: ml_collections.ConfigDict,
                     layers: layers_lib.Layers) -> layers_lib.Layers:
  """The Layers of the MLP heads: model.head_norm's norm, or the encoder's when ''."""
  name = model_cfg.get("head_norm", "") or layers.norm  # Configs from before the field: ''.
  layers_lib.lookup(layers_lib.NORMS, name, "model.head_norm")
  return dataclasses.replace(layers, norm=name)


def _encoder_builder(model_cfg: ml_collections.ConfigDict, layers: layers_lib.Layers):
  """Validates the encoder fields now; returns a function making the 'encoder' module."""
  spec = layers_lib.lookup(resnet.ENCODERS, model_cfg.encoder, "model.encoder")
  stem = layers_lib.lookup(resnet.STEMS, model_cfg.stem, "model.stem")
  zero_init = config_lib.resolve_zero_init(model_cfg.zero_init_residual)
  resnet.check_zero_init(zero_init, spec.bottleneck, model_cfg.resnet_v2, layers.norm)
  return lambda: resnet.ResNet(
      spec, stem, layers, width=model_cfg.width, resnet_v2=model_cfg.resnet_v2,
      zero_init_residual=zero_init,
      # Configs from before the field had today's default's layout.
      first_group_projection=model_cfg.get("first_group_projection", False), name="encoder")


def _training_at_init(is_training: bool) -> bool:
  # hk.BatchNorm creates its moving averages only on a training-mode call, and init
  # returns initial values whatever the mode, so init always takes the training path.
  return is_training or hk.running_init()


# Channel statistics of ImageNet pixels in [0, 1]; the authors' release standardises the
# network's input with them. One-channel images use their means.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Array) -> Array:
  """(images - mean) / std per channel, for images [N, H, W, C] in [0, 1], C in {1, 3}."""
  channels = images.shape[-1]
  if channels == 3:
    mean, std = jnp.asarray(IMAGE_MEAN), jnp.asarray(IMAGE_STD)
  elif channels == 1:
    mean, std = jnp.mean(jnp.asarray(IMAGE_MEAN))[None], jnp.mean(jnp.asarray(IMAGE_STD))[None]
  else:
    raise ValueError(f"images have {channels} channels; expected 1 (grayscale) or 3 (RGB).")
  return (images - mean.astype(images.dtype)) / std.astype(images.dtype)


def _network_input(model_cfg: ml_collections.ConfigDict, images: Array) -> Array:
  return normalize_images(images) if model_cfg.get("normalize_inputs", True) else images


def representation_dim(model_cfg: ml_collections.ConfigDict) -> int:
  """D of the encoder's output: 512 * width (ResNet-18/34) or 2048 * width (50 and up)."""
  spec = layers_lib.lookup(resnet.ENCODERS, model_cfg.encoder, "model.encoder")
  _check_width(model_cfg.width)
  return layers_lib.scaled_channels(spec.channels_per_group[-1], model_cfg.width)


def make_encoder_network(model_cfg: ml_collections.ConfigDict, axis_name: str | None = None,
                         precision: str = "float32") -> hk.TransformedWithState:
  """The encoder alone, with the same parameter names as the BYOL network's 'encoder'.

  Args:
    model_cfg: config.model.
    axis_name: pmapped axis for cross-replica batch norm (`parallel.DEVICE_AXIS`), or None.
    precision: 'float32' or 'bfloat16' (bf16 compute, float32 params and norms).

  Returns:
    transformed; apply(params, state, rng_or_None, images [N, H, W, C] float32 in [0, 1],
    is_training) -> (representation [N, D] float32, new_state).
  """
  policies = layers_lib.lookup(PRECISIONS, precision, "precision")
  build_encoder = _encoder_builder(model_cfg, _layers_from_config(model_cfg, axis_name, precision))

  def forward(images, is_training):
    is_training = _training_at_init(is_training)
    with _precision_scope(policies):
      y = build_encoder()(_network_input(model_cfg, images), is_training)
    return y.astype(jnp.float32)

  return hk.transform_with_state(forward)


def make_byol_network(model_cfg: ml_collections.ConfigDict, num_classes: int,
                      axis_name: str | None = None,
                      precision: str = "float32") -> hk.TransformedWithState:
  """The online (or target) BYOL network: encoder, projector, predictor, linear probe.

  Args:
    model_cfg: config.model.
    num_classes: outputs of the online linear classifier.
    axis_name: pmapped axis for cross-replica batch norm (`parallel.DEVICE_AXIS`), or None.
    precision: 'float32' or 'bfloat16' (bf16 compute, float32 params and norms).

  Returns:
    transformed; apply(params, state, rng_or_None, images [N, H, W, C] float32 in [0, 1],
    is_training) -> (outputs, new_state), outputs a dict of float32 arrays:
    representation [N, D], projection [N, projector_out], prediction [N, projector_out]
    (the projection itself when model.use_predictor is False), logits [N, num_classes].
    Top-level modules: 'encoder', 'projector', 'predictor', 'classifier'.
  """
  if not (isinstance(num_classes, (int, np.integer)) and num_classes > 0):
    raise ValueError(f"num_classes={num_classes!r} must be a positive integer.")
  policies = layers_lib.lookup(PRECISIONS, precision, "precision")
  layers = _layers_from_config(model_cfg, axis_name, precision)
  build_encoder = _encoder_builder(model_cfg, layers)
  head_layers = head_norm_layers(model_cfg, layers)
  m = model_cfg

  def forward(images, is_training):
    is_training = _training_at_init(is_training)
    with _precision_scope(policies):
      y = build_encoder()(_network_input(m, images), is_training)
      z = MLP(m.projector_hidden, m.projector_out, head_layers, name="projector")(y, is_training)
      p = z
      if m.use_predictor:
        p = MLP(m.predictor_hidden, m.projector_out, head_layers, name="predictor")(z,
                                                                                  is_training)
      # The online probe learns from labels without shaping the representation.
      logits = hk.Linear(num_classes, name="classifier")(jax.lax.stop_gradient(y))
    outputs = dict(representation=y, projection=z, prediction=p, logits=logits)
    return {k: v.astype(jnp.float32) for k, v in outputs.items()}

  return hk.transform_with_state(forward)
