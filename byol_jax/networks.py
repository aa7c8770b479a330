"""The Haiku networks of BYOL: the ResNet encoder family, the MLP heads, the BYOL forward.

Built inside `hk.transform_with_state`: parameters and batch-norm statistics are plain
pytrees. Module and parameter names follow `hk.nets.ResNet` (initial_conv,
block_group_{i}/~/block_{j}/~/conv_{k}, batchnorm_{k}, shortcut_conv, ...) wherever the
architecture is the same, so Haiku and authors' release weights map across by name.
Registries (ENCODERS, STEMS, NORMS, PADDINGS, PRECISIONS) are keyed by config's names.
"""
import contextlib
import dataclasses
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections
import numpy as np

Array = jax.Array
NormFn = Callable[[Array, bool], Array]

# Standardised kernels are divided by sqrt(var + eps); small enough that the result has
# unit variance to ~1e-6 for any kernel the default initialiser can produce.
WS_EPS = 1e-10


class ResNetSpec(NamedTuple):
  """One depth of the ResNet family (He et al. 2016), as in `hk.nets.ResNet.CONFIGS`."""
  blocks_per_group: tuple[int, int, int, int]
  bottleneck: bool
  channels_per_group: tuple[int, int, int, int]
  use_projection: tuple[bool, bool, bool, bool]


_BASIC = dict(bottleneck=False, channels_per_group=(64, 128, 256, 512),
              use_projection=(False, True, True, True))
_BOTTLENECK = dict(bottleneck=True, channels_per_group=(256, 512, 1024, 2048),
                   use_projection=(True, True, True, True))
ENCODERS = {
    "resnet18": ResNetSpec((2, 2, 2, 2), **_BASIC),
    "resnet34": ResNetSpec((3, 4, 6, 3), **_BASIC),
    "resnet50": ResNetSpec((3, 4, 6, 3), **_BOTTLENECK),
    "resnet101": ResNetSpec((3, 4, 23, 3), **_BOTTLENECK),
    "resnet152": ResNetSpec((3, 8, 36, 3), **_BOTTLENECK),
    "resnet200": ResNetSpec((3, 24, 36, 3), **_BOTTLENECK),
}


class StemSpec(NamedTuple):
  """The first conv (kernel, stride) and whether a max-pool follows it."""
  kernel: int
  stride: int
  max_pool: bool  # 3x3 stride-2 max-pool after the first conv.


STEMS = {
    "imagenet": StemSpec(kernel=7, stride=2, max_pool=True),
    "small": StemSpec(kernel=3, stride=1, max_pool=False),  # For 28-32 px images.
}

# Conv padding per kernel size: 'SAME' is Haiku/TF's (extra pixel at the end when the
# total is odd); 'symmetric' pads k//2 on both sides, torchvision's arithmetic.
PADDINGS = {
    "same": lambda kernel: "SAME",
    "symmetric": lambda kernel: ((kernel // 2, kernel // 2),) * 2,
}


def lookup(registry: dict, name: str, field: str):
  """registry[name], or ValueError naming the config field and the valid names."""
  if name not in registry:
    raise ValueError(f"unknown config.{field}={name!r}; valid: {sorted(registry)}.")
  return registry[name]


def scaled_channels(channels: int, width: float) -> int:
  """Channels of a layer under the width multiplier: max(1, round(channels * width))."""
  return max(1, int(round(channels * width)))


def group_count(channels: int, max_groups: int) -> int:
  """GroupNorm groups for a layer: the largest divisor of `channels` <= `max_groups`.

  Narrow networks (width < 1) have layers with fewer channels than `model.gn_groups`, or a
  count the groups do not divide; clipping to a divisor keeps every layer valid.
  """
  if max_groups < 1:
    raise ValueError(f"config.model.gn_groups={max_groups} must be >= 1.")
  return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


@jax.jit  # One compiled op per kernel shape when run eagerly; inlined under jit.
def standardize_kernel(w: Array) -> Array:
  """Weight Standardisation (Qiao et al. 2019): zero mean, unit variance per output channel.

  Args:
    w: kernel [..., C_out] (HWIO for convolutions).

  Returns:
    the standardised kernel, same shape, computed in float32 and cast back to w's dtype.
  """
  w32 = w.astype(jnp.float32)
  axes = tuple(range(w.ndim - 1))
  mean = jnp.mean(w32, axis=axes, keepdims=True)
  var = jnp.var(w32, axis=axes, keepdims=True)
  return ((w32 - mean) * jax.lax.rsqrt(var + WS_EPS)).astype(w.dtype)


class Conv2D(hk.Module):
  """NHWC convolution with `hk.Conv2D`'s parameters ('w' HWIO, 'b') and initialiser.

  Adds the two things hk.Conv2D lacks here: torchvision-style symmetric padding and
  weight standardisation of the kernel before use.
  """

  def __init__(self, channels: int, kernel: int, stride: int = 1, padding: str = "same",
               standardize: bool = False, with_bias: bool = False,
               zero_init: bool = False, name: str | None = None):
    super().__init__(name=name)
    if standardize and zero_init:
      raise ValueError("a weight-standardised kernel cannot start at zero (its variance "
                       "is 0); use zero_init_residual with norm 'batch' or ResNet v1.")
    self._channels, self._kernel, self._stride = channels, kernel, stride
    self._padding = lookup(PADDINGS, padding, "model.padding")(kernel)
    self._standardize, self._with_bias, self._zero_init = standardize, with_bias, zero_init

  def __call__(self, x: Array) -> Array:
    """x [N, H, W, C_in] -> [N, H', W', channels]."""
    k = self._kernel
    fan_in = k * k * x.shape[-1]
    w_init = (jnp.zeros if self._zero_init else
              hk.initializers.TruncatedNormal(stddev=1.0 / np.sqrt(fan_in)))
    w = hk.get_parameter("w", [k, k, x.shape[-1], self._channels], x.dtype, init=w_init)
    if self._standardize:
      w = standardize_kernel(w)
    out = jax.lax.conv_general_dilated(
        x, w, window_strides=(self._stride,) * 2, padding=self._padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self._with_bias:
      out = out + hk.get_parameter("b", [self._channels], x.dtype, init=jnp.zeros)
    return out


def max_pool(x: Array, padding: str) -> Array:
  """The stem's 3x3 stride-2 max-pool; 'symmetric' pads 1 on each side with -inf."""
  pad = lookup(PADDINGS, padding, "model.padding")(3)
  if not isinstance(pad, str):
    pad = ((0, 0),) + tuple(pad) + ((0, 0),)
  # A Python -inf (not an array) lets JAX pick reduce_window_max, which has a gradient.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Makes the convolutions and normalisations of one network from the model config.

  Attributes mirror config.model fields; `axis_name` is the pmapped device axis that
  batch norm reduces its statistics over (None outside pmap).
  """
  norm: str = "batch"
  padding: str = "same"
  bn_decay: float = 0.9
  bn_eps: float = 1e-5
  gn_groups: int = 32
  axis_name: str | None = None

  @property
  def has_norm(self) -> bool:
    return NORMS[self.norm].prefix is not None

  def conv(self, channels: int, kernel: int, stride: int, name: str,
           zero_init: bool = False) -> Conv2D:
    kind = NORMS[self.norm]
    return Conv2D(channels, kernel, stride, self.padding, standardize=kind.standardize,
                  with_bias=kind.conv_bias, zero_init=zero_init, name=name)

  def norm_layer(self, role: str | None, channels: int, zero_scale: bool = False) -> NormFn:
    """A normalisation of `channels` features, called as f(x, is_training).

    role: '0', '1', .. (-> 'batchnorm_0'), 'initial' / 'shortcut' / 'final'
    (-> 'initial_batchnorm'), or None for Haiku's default module name (MLP heads).
    """
    kind = NORMS[self.norm]
    name = None
    if role is not None and kind.prefix is not None:
      name = f"{kind.prefix}_{role}" if role.isdigit() else f"{role}_{kind.prefix}"
    return kind.make(self, name, channels, jnp.zeros if zero_scale else None)


def _batch_norm(layers: Layers, name, channels, scale_init) -> NormFn:
  del channels  # Inferred from the input.
  bn = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=layers.bn_decay,
                    eps=layers.bn_eps, scale_init=scale_init,
                    cross_replica_axis=layers.axis_name, name=name)
  return lambda x, is_training: bn(x, is_training)


def _group_norm(layers: Layers, name, channels, scale_init) -> NormFn:
  gn = hk.GroupNorm(group_count(channels, layers.gn_groups), eps=layers.bn_eps,
                    scale_init=scale_init, name=name)
  # Per-example statistics: training and evaluation compute the same thing.
  return lambda x, is_training: gn(x)


def _no_norm(layers: Layers, name, channels, scale_init) -> NormFn:
  del layers, name, channels, scale_init
  return lambda x, is_training: x


class NormKind(NamedTuple):
  """How one `model.norm` builds its layers."""
  make: Callable[[Layers, str | None, int, Callable | None], NormFn]
  prefix: str | None  # Module-name stem; 'batchnorm' keeps hk.nets.ResNet's names.
  standardize: bool  # Weight-standardised convolutions.
  conv_bias: bool  # Without a norm's offset the convolutions need their own bias.


NORMS = {
    "batch": NormKind(_batch_norm, "batchnorm", standardize=False, conv_bias=False),
    # Richemond et al. 2020: no batch statistics. In the MLP heads GroupNorm normalises
    # groups of hidden units of each example.
    "group_ws": NormKind(_group_norm, "groupnorm", standardize=True, conv_bias=False),
    "none": NormKind(_no_norm, None, standardize=False, conv_bias=True),
}


def _block_plan(channels: int, stride: int, bottleneck: bool, width: float):
  """(out_channels, kernel, stride) of each conv on a block's residual branch."""
  out = scaled_channels(channels, width)
  if bottleneck:
    inner = scaled_channels(channels // 4, width)
    return ((inner, 1, 1), (inner, 3, stride), (out, 1, 1))
  return ((out, 3, stride), (out, 3, 1))


class BlockV1(hk.Module):
  """Post-activation residual block: conv -> norm -> relu ..., relu(branch + shortcut)."""

  def __init__(self, in_channels: int, plan, stride: int, use_projection: bool,
               layers: Layers, zero_init: bool, name: str):
    """plan: (out_channels, kernel, stride) per conv of the residual branch."""
    super().__init__(name=name)
    del in_channels  # Norms follow the convs, whose outputs the plan gives.
    out = plan[-1][0]
    self._shortcut = None
    if use_projection:
      self._shortcut = (layers.conv(out, 1, stride, "shortcut_conv"),
                        layers.norm_layer("shortcut", out))
    self._layers = []
    for i, (channels, kernel, conv_stride) in enumerate(plan):
      last = i == len(plan) - 1
      # Zero-init the branch's last norm scale, or its last conv when it has no norm.
      conv = layers.conv(channels, kernel, conv_stride, f"conv_{i}",
                         zero_init=last and zero_init and not layers.has_norm)
      norm = layers.norm_layer(str(i), channels, zero_scale=last and zero_init)
      self._layers.append((conv, norm))

  def __call__(self, x: Array, is_training: bool) -> Array:
    shortcut = x
    if self._shortcut is not None:
      conv, norm = self._shortcut
      shortcut = norm(conv(x), is_training)
    for i, (conv, norm) in enumerate(self._layers):
      x = norm(conv(x), is_training)
      if i < len(self._layers) - 1:
        x = jax.nn.relu(x)
    return jax.nn.relu(x + shortcut)


class BlockV2(hk.Module):
  """Pre-activation residual block (He et al. 2016b): norm -> relu -> conv, then + shortcut."""

  def __init__(self, in_channels: int, plan, stride: int, use_projection: bool,
               layers: Layers, zero_init: bool, name: str):
    super().__init__(name=name)
    self._shortcut = None
    if use_projection:
      self._shortcut = layers.conv(plan[-1][0], 1, stride, "shortcut_conv")
    self._layers = []
    for i, (channels, kernel, conv_stride) in enumerate(plan):
      norm = layers.norm_layer(str(i), plan[i - 1][0] if i else in_channels)
      # The last norm precedes a relu here, and relu'(0) = 0 would freeze a zero scale
      # for good; zeroing the last conv's kernel starts the branch at zero instead.
      conv = layers.conv(channels, kernel, conv_stride, f"conv_{i}",
                         zero_init=zero_init and i == len(plan) - 1)
      self._layers.append((conv, norm))

  def __call__(self, x: Array, is_training: bool) -> Array:
    shortcut = x
    for i, (conv, norm) in enumerate(self._layers):
      x = jax.nn.relu(norm(x, is_training))
      if i == 0 and self._shortcut is not None:
        shortcut = self._shortcut(x)
      x = conv(x)
    return x + shortcut


class BlockGroup(hk.Module):
  """`num_blocks` residual blocks; the first one strides and projects the shortcut."""

  def __init__(self, in_channels: int, channels: int, num_blocks: int, stride: int,
               use_projection: bool, bottleneck: bool, resnet_v2: bool, width: float,
               layers: Layers, zero_init: bool, name: str):
    super().__init__(name=name)
    self._blocks = []
    block_cls = BlockV2 if resnet_v2 else BlockV1
    for i in range(num_blocks):
      block_stride = stride if i == 0 else 1
      plan = _block_plan(channels, block_stride, bottleneck, width)
      self._blocks.append(block_cls(in_channels, plan, block_stride, use_projection and i == 0,
                                    layers, zero_init, name=f"block_{i}"))
      in_channels = plan[-1][0]

  def __call__(self, x: Array, is_training: bool) -> Array:
    for block in self._blocks:
      x = block(x, is_training)
    return x


def check_zero_init(zero_init_residual: bool, resnet_v2: bool, norm: str) -> None:
  """Rejects the one combination where no residual branch can start at zero."""
  if zero_init_residual and resnet_v2 and NORMS[norm].standardize:
    raise ValueError("config.model.zero_init_residual=True does not work with "
                     "resnet_v2=True and norm='group_ws' (a weight-standardised kernel "
                     "cannot be zero); set zero_init_residual=False or resnet_v2=False.")


class ResNet(hk.Module):
  """ResNet torso (v1 or v2) returning the global-average-pooled representation [N, D]."""

  def __init__(self, spec: ResNetSpec, stem: StemSpec, layers: Layers, width: float = 1.0,
               resnet_v2: bool = False, zero_init_residual: bool = False,
               name: str = "encoder"):
    super().__init__(name=name)
    check_zero_init(zero_init_residual, resnet_v2, layers.norm)
    self._stem, self._padding, self._v2 = stem, layers.padding, resnet_v2
    channels = scaled_channels(64, width)
    self._initial_conv = layers.conv(channels, stem.kernel, stem.stride, "initial_conv")
    if not resnet_v2:
      self._initial_norm = layers.norm_layer("initial", channels)
    self._groups = []
    for i, stride in enumerate((1, 2, 2, 2)):
      self._groups.append(BlockGroup(
          channels, spec.channels_per_group[i], spec.blocks_per_group[i], stride,
          spec.use_projection[i], spec.bottleneck, resnet_v2, width, layers,
          zero_init_residual, name=f"block_group_{i}"))
      channels = scaled_channels(spec.channels_per_group[i], width)
    if resnet_v2:
      self._final_norm = layers.norm_layer("final", channels)

  def __call__(self, images: Array, is_training: bool) -> Array:
    """images [N, H, W, C] -> representation [N, D]."""
    x = self._initial_conv(images)
    if not self._v2:
      x = jax.nn.relu(self._initial_norm(x, is_training))
    if self._stem.max_pool:
      x = max_pool(x, self._padding)
    for group in self._groups:
      x = group(x, is_training)
    if self._v2:
      x = jax.nn.relu(self._final_norm(x, is_training))
    return jnp.mean(x, axis=(1, 2))


class MLP(hk.Module):
  """Projector / predictor: Linear(hidden, bias) -> norm -> relu -> Linear(out, no bias)."""

  def __init__(self, hidden: int, output: int, layers: Layers, name: str):
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
    "bfloat16": ((ResNet, _BF16_COMPUTE), (MLP, _BF16_COMPUTE), (hk.Linear, _BF16_COMPUTE),
                 (hk.BatchNorm, _F32_NORM), (hk.GroupNorm, _F32_NORM)),
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


def _layers_from_config(model_cfg: ml_collections.ConfigDict, axis_name) -> Layers:
  lookup(NORMS, model_cfg.norm, "model.norm")
  lookup(PADDINGS, model_cfg.padding, "model.padding")
  group_count(1, model_cfg.gn_groups)  # Validates gn_groups >= 1.
  _check_width(model_cfg.width)
  return Layers(norm=model_cfg.norm, padding=model_cfg.padding, bn_decay=model_cfg.bn_decay,
                bn_eps=model_cfg.bn_eps, gn_groups=model_cfg.gn_groups, axis_name=axis_name)


def _encoder_builder(model_cfg: ml_collections.ConfigDict, layers: Layers):
  """Validates the encoder fields now; returns a function making the 'encoder' module."""
  spec = lookup(ENCODERS, model_cfg.encoder, "model.encoder")
  stem = lookup(STEMS, model_cfg.stem, "model.stem")
  check_zero_init(model_cfg.zero_init_residual, model_cfg.resnet_v2, layers.norm)
  return lambda: ResNet(spec, stem, layers, width=model_cfg.width,
                        resnet_v2=model_cfg.resnet_v2,
                        zero_init_residual=model_cfg.zero_init_residual, name="encoder")


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
  spec = lookup(ENCODERS, model_cfg.encoder, "model.encoder")
  _check_width(model_cfg.width)
  return scaled_channels(spec.channels_per_group[-1], model_cfg.width)


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
  policies = lookup(PRECISIONS, precision, "precision")
  build_encoder = _encoder_builder(model_cfg, _layers_from_config(model_cfg, axis_name))

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
  policies = lookup(PRECISIONS, precision, "precision")
  layers = _layers_from_config(model_cfg, axis_name)
  build_encoder = _encoder_builder(model_cfg, layers)
  m = model_cfg

  def forward(images, is_training):
    is_training = _training_at_init(is_training)
    with _precision_scope(policies):
      y = build_encoder()(_network_input(m, images), is_training)
      z = MLP(m.projector_hidden, m.projector_out, layers, name="projector")(y, is_training)
      p = z
      if m.use_predictor:
        p = MLP(m.predictor_hidden, m.projector_out, layers, name="predictor")(z, is_training)
      # The online probe learns from labels without shaping the representation.
      logits = hk.Linear(num_classes, name="classifier")(jax.lax.stop_gradient(y))
    outputs = dict(representation=y, projection=z, prediction=p, logits=logits)
    return {k: v.astype(jnp.float32) for k, v in outputs.items()}

  return hk.transform_with_state(forward)
