"""The building blocks of the networks: convolutions, normalisations, padding, channel counts.

Conv2D (with optional Weight Standardisation and torchvision-style padding), the stem's
max-pool, each computed by XLA's own op or from window taps (CONV_IMPLS), and `Layers`,
which makes a network's convolutions and norms from config.model under the module names
hk.nets.ResNet uses (batchnorm_{k}, initial_batchnorm, ...). Separate from resnet.py and
networks.py because both build with these parts and neither owns them. Registries
(PADDINGS, NORMS, CONV_IMPLS) are keyed by config's names.
"""
import dataclasses
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NormFn = Callable[[Array, bool], Array]

# Standardised kernels are divided by sqrt(var + eps); small enough that the result has
# unit variance to ~1e-6 for any kernel the default initialiser can produce.
WS_EPS = 1e-10


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


def _explicit_pads(padding, size: tuple[int, int], kernel: int, stride: int):
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(size, (kernel, kernel), (stride, stride), padding))
  return tuple(padding)


def window_taps(x: Array, kernel: int, stride: int, padding, pad_value: float = 0.0) -> list:
  """The kernel*kernel strided slices of x a k x k window with `stride` reads.

  Args:
    x: [N, H, W, C]. padding: 'SAME' / 'VALID' or ((top, bottom), (left, right)).
    pad_value: the value of padded pixels (0 for convolutions, -inf for the max-pool).

  Returns:
    [N, H', W', C] arrays, tap (i, j) at index i * kernel + j (row-major, as HWIO kernels).
  """
  pads = _explicit_pads(padding, x.shape[1:3], kernel, stride)
  xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), constant_values=pad_value)
  out_h = (xp.shape[1] - kernel) // stride + 1
  out_w = (xp.shape[2] - kernel) // stride + 1
  return [xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(kernel) for j in range(kernel)]


def conv_taps(x: Array, w: Array, stride: int, padding) -> Array:
  """conv_general_dilated(x, w) (NHWC, HWIO) as one matmul over the concatenated taps."""
  kernel, _, c_in, c_out = w.shape
  taps = window_taps(x, kernel, stride, padding)
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return jnp.matmul(patches, w.reshape(kernel * kernel * c_in, c_out))


def conv_lax(x: Array, w: Array, stride: int, padding) -> Array:
  """XLA's convolution, NHWC x HWIO -> NHWC."""
  return jax.lax.conv_general_dilated(x, w, window_strides=(stride, stride), padding=padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# How convolutions and the max-pool are computed; both give the same values and gradients
# (to float rounding) from the same parameters. 'lax': XLA's conv_general_dilated and
# reduce_window. 'taps': the k*k strided slices a window reads are concatenated along
# channels and multiplied with the kernel as one matrix (im2col); the max-pool takes the
# first maximum over its 9 taps. On CPUs 'taps' ran the encoder 2.6x faster on the small
# feature maps of the 28 px Fashion-MNIST recipe, where XLA's convolution runs at a few GFLOP/s
# (`byol-jax bench step` figures in README); on TPUs and GPUs keep 'lax'. 'taps' holds
# each conv's k*k taps in memory: the Fashion-MNIST step needs about twice the activations.
CONV_IMPLS = {"lax": conv_lax, "taps": conv_taps}


class Conv2D(hk.Module):
  """NHWC convolution with `hk.Conv2D`'s parameters ('w' HWIO, 'b') and initialiser.

  Adds the two things hk.Conv2D lacks here: torchvision-style symmetric padding and
  weight standardisation of the kernel before use.
  """

  def __init__(self, channels: int, kernel: int, stride: int = 1, padding: str = "same",
               standardize: bool = False, with_bias: bool = False,
               zero_init: bool = False, impl: str = "lax", name: str | None = None):
    super().__init__(name=name)
    self._conv = lookup(CONV_IMPLS, impl, "model.conv_impl")
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
    out = self._conv(x, w, self._stride, self._padding)
    if self._with_bias:
      out = out + hk.get_parameter("b", [self._channels], x.dtype, init=jnp.zeros)
    return out


def max_pool(x: Array, padding: str, impl: str = "lax") -> Array:
  """The stem's 3x3 stride-2 max-pool; 'symmetric' pads 1 on each side with -inf.

  Both impls route each window's gradient to its first maximum in row-major order (ties
  included) and propagate NaN.
  """
  pad = lookup(PADDINGS, padding, "model.padding")(3)
  if lookup(CONV_IMPLS, impl, "model.conv_impl") is conv_taps:
    taps = window_taps(x, 3, 2, pad, pad_value=-jnp.inf)
    out = taps[0]
    for tap in taps[1:]:  # Strictly greater: an earlier tap keeps a tie (and its gradient).
      out = jnp.where((tap > out) | jnp.isnan(tap), tap, out)
    return out
  if not isinstance(pad, str):
    pad = ((0, 0),) + tuple(pad) + ((0, 0),)
  # A Python -inf (not an array) lets JAX pick reduce_window_max, which has a gradient.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Makes the convolutions and normalisations of one network from the model config.

  Attributes mirror config.model fields; `axis_name` is the pmapped device axis that
  batch norm reduces its statistics over (None outside pmap). `remat_norms`: recompute
  each norm in the backward pass from its input instead of keeping its float32
  intermediates (set for bfloat16 compute; see `norm_layer`).
  """
  norm: str = "batch"
  padding: str = "same"
  bn_decay: float = 0.9
  bn_eps: float = 1e-5
  gn_groups: int = 32
  conv_impl: str = "lax"
  axis_name: str | None = None
  remat_norms: bool = False

  @property
  def has_norm(self) -> bool:
    return NORMS[self.norm].prefix is not None

  def conv(self, channels: int, kernel: int, stride: int, name: str,
           zero_init: bool = False) -> Conv2D:
    kind = NORMS[self.norm]
    return Conv2D(channels, kernel, stride, self.padding, standardize=kind.standardize,
                  with_bias=kind.conv_bias, zero_init=zero_init, impl=self.conv_impl,
                  name=name)

  def norm_layer(self, role: str | None, channels: int, zero_scale: bool = False) -> NormFn:
    """A normalisation of `channels` features, called as f(x, is_training).

    role: '0', '1', .. (-> 'batchnorm_0'), 'initial' / 'shortcut' / 'final'
    (-> 'initial_batchnorm'), or None for Haiku's default module name (MLP heads).
    """
    kind = NORMS[self.norm]
    name = None
    if role is not None and kind.prefix is not None:
      name = f"{kind.prefix}_{role}" if role.isdigit() else f"{role}_{kind.prefix}"
    norm = kind.make(self, name, channels, jnp.zeros if zero_scale else None)
    if not (self.remat_norms and kind.prefix is not None):
      return norm
    # Under bfloat16 compute the norms compute in float32 (networks.PRECISIONS), and
    # autodiff would keep their float32 copies of the input and of the normalised values
    # for the backward pass: more activation memory than float32 training itself. Under
    # remat only the bf16 input is kept and the elementwise norm is recomputed; the
    # values are the same.
    return lambda x, is_training: hk.remat(lambda y: norm(y, is_training))(x)


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
