"""byol_jax's ResNet encoders in plain PyTorch, exact for Haiku/TF 'SAME' padding.

This file imports torch only (and the `safetensors` package inside `load_export`): copy it
into a PyTorch project as it is.

`ResNet` has torchvision's ResNet module tree (v1.5: the stride on the 3x3 conv of a
bottleneck), so its state_dict keys, shapes and layouts are torchvision's: a state_dict
loads with `load_state_dict(..., strict=True)` into it and into
`torchvision.models.resnet50()` (and 18/34/101/152) alike. It differs in one argument:

- padding='same': Haiku/TensorFlow 'SAME' padding, as byol_jax's default
  (model.padding='same') and the BYOL authors' released checkpoints were trained with.
  Every convolution and the stem's max-pool is padded so that out = ceil(in / stride),
  pad_total = max((out - 1) * stride + kernel - in, 0), pad_before = pad_total // 2 and
  pad_after = the rest: on a stride-2 layer with an even input, one pixel more at the
  bottom/right than at the top/left. The pads are computed from each layer's input size
  at run time, so any image size is exact. The max-pool pads with -inf, as Haiku's does.
- padding='symmetric': torchvision's arithmetic (kernel // 2 on every side), for
  networks trained with model.padding='symmetric' (or for torchvision's own weights).

The two agree on a layer whose 'SAME' pads are symmetric (every stride-1 conv, 1x1
convs, stride-2 layers on odd input sizes), and differ by one pixel of padding on the
others: the same weights give different representations (docs/pytorch.md has figures).

`load_export(path)` reads a file written by `byol-jax export --format=torchvision` and
returns the encoder: padding and input normalisation from the file's metadata, no
classifier, in eval mode; `model(images)` maps RGB images [N, 3, H, W] in [0, 1] to the
representation [N, D] (global-average-pooled features, D = 512 or 2048).

The pads are Python integers computed from each input's shape: torch.jit.trace and ONNX
export fix them for the traced size (trace at the size you will run).
"""
from __future__ import annotations  # The annotations below on Python 3.9 too.

import json
import math

import torch
from torch import nn
import torch.nn.functional as F

PADDINGS = ("same", "symmetric")
# name -> (block, blocks per group), as torchvision.models.resnet{18,...,152}.
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
# What `load_export` reads: the metadata written by byol_jax's torchvision-format export.
EXPORT_FORMAT = "torchvision.resnet"
EXPORT_FORMAT_VERSION = 1


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """(before, after) padding of one spatial axis of `size` under Haiku/TF 'SAME'."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _check_padding(padding: str) -> str:
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r}; valid: {list(PADDINGS)}.")
  return padding


class Conv2d(nn.Conv2d):
  """nn.Conv2d without bias (parameter 'weight', OIHW) with 'same' or 'symmetric' padding."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
               padding: str):
    super().__init__(in_channels, out_channels, kernel, stride, padding=kernel // 2,
                     bias=False)
    self.same = _check_padding(padding) == "same"

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.same:
      return super().forward(x)
    k, s = self.kernel_size[0], self.stride[0]
    top, bottom = same_pads(x.shape[-2], k, s)
    left, right = same_pads(x.shape[-1], k, s)
    if top == bottom and left == right:  # Symmetric: let the convolution pad.
      return F.conv2d(x, self.weight, None, self.stride, (top, left))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride, 0)


class MaxPool(nn.Module):
  """The stem's 3x3 stride-2 max-pool; padded pixels are -inf under both paddings."""

  def __init__(self, padding: str):
    super().__init__()
    self.same = _check_padding(padding) == "same"

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.same:
      return F.max_pool2d(x, 3, 2, 1)  # torchvision's nn.MaxPool2d(3, 2, 1).
    top, bottom = same_pads(x.shape[-2], 3, 2)
    left, right = same_pads(x.shape[-1], 3, 2)
    if top == bottom and left == right:
      return F.max_pool2d(x, 3, 2, (top, left))
    x = F.pad(x, (left, right, top, bottom), value=-math.inf)
    return F.max_pool2d(x, 3, 2, 0)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int, downsample, padding: str):
    super().__init__()
    self.conv1 = Conv2d(inplanes, planes, 3, stride, padding)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = Conv2d(planes, planes, 3, 1, padding)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + shortcut)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int, downsample, padding: str):
    super().__init__()
    self.conv1 = Conv2d(inplanes, planes, 1, 1, padding)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = Conv2d(planes, planes, 3, stride, padding)  # v1.5: the stride is here.
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = Conv2d(planes, planes * 4, 1, 1, padding)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + shortcut)


class ResNet(nn.Module):
  """torchvision's ResNet v1.5 (same state_dict) with 'same' or 'symmetric' padding.

  Args:
    arch: one of ARCHS ('resnet18' ... 'resnet152').
    padding: 'same' (Haiku/TF, byol_jax's default and the BYOL authors' checkpoints) or
      'symmetric' (torchvision's).
    num_classes: the size of the classifier 'fc' (1000, as torchvision), or None for no
      classifier: forward then returns the representation [N, D] and the state_dict has
      no 'fc.*' keys, as a byol_jax export.
    input_mean, input_std: per-channel statistics; when given, forward takes images in
      [0, 1] and standardises them first (kept out of the state_dict). When None, the
      input must be standardised already, as torchvision's.
    first_group_projection: a projection shortcut ('layer1.0.downsample') in the first
      block of ResNet-18/34 too, as in the BYOL authors' ResNet-18/34; torchvision has
      none there, so such weights load into this module only.
  """

  def __init__(self, arch: str = "resnet50", padding: str = "same",
               num_classes: int | None = 1000, input_mean=None, input_std=None,
               first_group_projection: bool = False):
    super().__init__()
    if arch not in ARCHS:
      raise ValueError(f"arch={arch!r}; valid: {list(ARCHS)}.")
    if (input_mean is None) != (input_std is None):
      raise ValueError("give both input_mean and input_std, or neither.")
    self.arch, self.padding = arch, _check_padding(padding)
    kind, blocks = ARCHS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    self.inplanes = 64
    self.conv1 = Conv2d(3, 64, 7, 2, padding)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = MaxPool(padding)
    self.layer1 = self._make_layer(block, 64, blocks[0], 1, padding, first_group_projection)
    self.layer2 = self._make_layer(block, 128, blocks[1], 2, padding)
    self.layer3 = self._make_layer(block, 256, blocks[2], 2, padding)
    self.layer4 = self._make_layer(block, 512, blocks[3], 2, padding)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dim = 512 * block.expansion
    self.fc = nn.Identity() if num_classes is None else nn.Linear(self.dim, num_classes)
    if input_mean is not None:
      shape = (1, -1, 1, 1)
      self.register_buffer("input_mean", torch.tensor(input_mean).reshape(shape),
                           persistent=False)
      self.register_buffer("input_std", torch.tensor(input_std).reshape(shape),
                           persistent=False)
    else:
      self.input_mean = self.input_std = None

  def _make_layer(self, block, planes: int, blocks: int, stride: int, padding: str,
                  projection: bool = False) -> nn.Sequential:
    downsample = None
    if projection or stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(Conv2d(self.inplanes, planes * block.expansion, 1, stride,
                                        padding),
                                 nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample, padding)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, 1, None, padding) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x [N, 3, H, W] (in [0, 1] when input_mean/std are set) -> [N, D] or [N, classes]."""
    if self.input_mean is not None:
      x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def load_export(path: str, padding: str | None = None, map_location: str = "cpu") -> ResNet:
  """The encoder in a byol_jax torchvision-format export, ready to run (eval mode).

  Args:
    path: a file written by `byol-jax export --format=torchvision`.
    padding: None to use the padding the file records (the exact network); 'same' or
      'symmetric' to override it.
    map_location: the device to load the tensors on.

  Returns:
    ResNet without classifier, standardising its input with the file's input_mean and
    input_std: model(images [N, 3, H, W] RGB in [0, 1]) -> representation [N, D].
    `model.metadata` holds the file's metadata (arch, padding, image_size, source, ...).

  Raises:
    ValueError: not a byol_jax torchvision-format export, a newer format version, or no
      recorded padding and none given. RuntimeError: keys or shapes do not fit the
      architecture (strict loading).
  """
  import safetensors  # optional: only the loader reads files; the network needs torch alone.
  with safetensors.safe_open(path, framework="pt", device=map_location) as f:
    meta = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{path} is not a byol_jax torchvision-format export (metadata "
                     f"format={meta.get('format')!r}, want {EXPORT_FORMAT!r}).")
  if int(meta.get("format_version", 0)) > EXPORT_FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {meta['format_version']}; this file "
                     f"reads up to {EXPORT_FORMAT_VERSION}.")
  padding = padding or meta.get("padding")
  if padding is None:
    raise ValueError(f"{path} records no padding; pass padding='same' or 'symmetric'.")
  model = ResNet(meta["arch"], padding, num_classes=None,
                 input_mean=json.loads(meta["input_mean"]),
                 input_std=json.loads(meta["input_std"]),
                 first_group_projection="layer1.0.downsample.0.weight" in tensors)
  model.load_state_dict(tensors, strict=True)
  model.metadata = dict(meta)
  return model.to(map_location).eval()
