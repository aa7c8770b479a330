"""The ResNet encoder family (He et al. 2016): depths, stems, v1 and v2 blocks, the torso.

Module and parameter names follow `hk.nets.ResNet` (initial_conv,
block_group_{i}/~/block_{j}/~/conv_{k}, batchnorm_{k}, shortcut_conv, ...) wherever the
architecture is the same, so Haiku and authors' release weights map across by name;
checkpoints, export.py and release.py rely on them. Separate from networks.py, which
puts the heads on top and owns precision and input normalisation. Registries
(ENCODERS, STEMS) are keyed by config's names.
"""
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from byol_jax.model import layers as layers_lib

Array = jax.Array

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
    # 3x3 stride-2 conv, no max-pool: 28 -> 14 px before the first block (the ImageNet
    # stem gives 7 px, 'small' 28 px); about 4x the ImageNet stem's cost per image.
    "small_s2": StemSpec(kernel=3, stride=2, max_pool=False),
}

# model.zero_init_residual -> f(bottleneck, resnet_v2): whether each residual block starts
# with its branch at zero (its closing norm's scale, or its closing conv where no norm
# follows that conv), so that the block starts as its shortcut.
ZERO_INITS = {
    # hk.nets.ResNet's, so the authors' encoder's and the paper's numbers': BlockV1 zeroes
    # the scale of batchnorm_2, which only bottleneck blocks (ResNet-50 and deeper) have;
    # basic blocks and BlockV2 start every scale at one.
    "authors": lambda bottleneck, resnet_v2: bottleneck and not resnet_v2,
    "all": lambda bottleneck, resnet_v2: True,  # Goyal et al. 2017; torchvision's option.
    "none": lambda bottleneck, resnet_v2: False,  # Every scale starts at one.
}

def _block_plan(channels: int, stride: int, bottleneck: bool, width: float):
  """(out_channels, kernel, stride) of each conv on a block's residual branch."""
  out = layers_lib.scaled_channels(channels, width)
  if bottleneck:
    inner = layers_lib.scaled_channels(channels // 4, width)
    return ((inner, 1, 1), (inner, 3, stride), (out, 1, 1))
  return ((out, 3, stride), (out, 3, 1))


class BlockV1(hk.Module):
  """Post-activation residual block: conv -> norm -> relu ..., relu(branch + shortcut)."""

  def __init__(self, in_channels: int, plan, stride: int, use_projection: bool,
               layers: layers_lib.Layers, zero_init: bool, name: str):
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
               layers: layers_lib.Layers, zero_init: bool, name: str):
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
               layers: layers_lib.Layers, zero_init: bool, name: str):
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


def check_zero_init(zero_init_residual: str, bottleneck: bool, resnet_v2: bool,
                    norm: str) -> bool:
  """Whether the residual blocks start at zero; rejects the combination where they cannot.

  Args:
    zero_init_residual: a ZERO_INITS name (config.resolve_zero_init maps legacy bools).
    bottleneck, resnet_v2: the blocks' kind. norm: a layers.NORMS name.

  Returns:
    True when every block's residual branch starts at zero, False when none does.

  Raises:
    ValueError: an unknown name, or zeroing v2 blocks under norm='group_ws': their branch
    closes with a weight-standardised conv, which cannot be zero.
  """
  zero = layers_lib.lookup(ZERO_INITS, zero_init_residual, "model.zero_init_residual")(
      bottleneck, resnet_v2)
  if zero and resnet_v2 and layers_lib.NORMS[norm].standardize:
    raise ValueError(f"config.model.zero_init_residual={zero_init_residual!r} does not work "
                     "with resnet_v2=True and norm='group_ws' (a weight-standardised kernel "
                     "cannot be zero); set zero_init_residual='authors' or 'none', or "
                     "resnet_v2=False.")
  return zero


class ResNet(hk.Module):
  """ResNet torso (v1 or v2) returning the global-average-pooled representation [N, D]."""

  def __init__(self, spec: ResNetSpec, stem: StemSpec, layers: layers_lib.Layers,
               width: float = 1.0, resnet_v2: bool = False,
               zero_init_residual: str = "authors", first_group_projection: bool = False,
               name: str = "encoder"):
    """Args mirror config.model's fields.

    Args:
      zero_init_residual: a ZERO_INITS name.
      first_group_projection: a projection shortcut in block 0 of group 0 too, as in the
        authors' ResNetTorso; only basic-block specs (ResNet-18/34) lack one there.
    """
    super().__init__(name=name)
    zero_init = check_zero_init(zero_init_residual, spec.bottleneck, resnet_v2, layers.norm)
    use_projection = (spec.use_projection[0] or first_group_projection,
                      *spec.use_projection[1:])
    self._stem, self._padding, self._v2 = stem, layers.padding, resnet_v2
    self._conv_impl = layers.conv_impl
    channels = layers_lib.scaled_channels(64, width)
    self._initial_conv = layers.conv(channels, stem.kernel, stem.stride, "initial_conv")
    if not resnet_v2:
      self._initial_norm = layers.norm_layer("initial", channels)
    self._groups = []
    for i, stride in enumerate((1, 2, 2, 2)):
      self._groups.append(BlockGroup(
          channels, spec.channels_per_group[i], spec.blocks_per_group[i], stride,
          use_projection[i], spec.bottleneck, resnet_v2, width, layers,
          zero_init, name=f"block_group_{i}"))
      channels = layers_lib.scaled_channels(spec.channels_per_group[i], width)
    if resnet_v2:
      self._final_norm = layers.norm_layer("final", channels)

  def __call__(self, images: Array, is_training: bool) -> Array:
    """images [N, H, W, C] -> representation [N, D]."""
    x = self._initial_conv(images)
    if not self._v2:
      x = jax.nn.relu(self._initial_norm(x, is_training))
    if self._stem.max_pool:
      x = layers_lib.max_pool(x, self._padding, self._conv_impl)
    for group in self._groups:
      x = group(x, is_training)
    if self._v2:
      x = jax.nn.relu(self._final_norm(x, is_training))
    return jnp.mean(x, axis=(1, 2))
