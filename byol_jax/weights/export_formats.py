"""The two export layouts, as safetensors bytes (no pickle), and the reader of byol_jax's own.

- 'byol_jax': every encoder parameter and batch-norm state array under the key
  'params:<module>:<name>' / 'state:<module>:<name>' (Haiku names), and in the header's
  metadata a JSON 'config' (image_size, channels, model section, input mean/std, step,
  source) and 'format_version'. `read_export` turns it back into a Pretrained.
- 'torchvision': the state_dict of torchvision's ResNet-18/34/50/101/152 (v1.5: the stride
  on the 3x3 conv of a bottleneck) without 'fc' (set `model.fc = torch.nn.Identity()`
  before `load_state_dict(..., strict=True)`, and the model returns the representation).
  Metadata records the input normalisation the weights expect, the padding, the source.

A file is recognised by its content (`safetensors_header`), never by its name: an export
written to 'enc' loads exactly as one written to 'enc.safetensors'.

Padding: a network trained with model.padding='symmetric' matches torchvision exactly
(within 1e-4, tests/weights/test_export.py). Haiku's 'SAME' (the default and the authors' release)
pads stride-2 convolutions and the stem max-pool asymmetrically, which torch cannot
express; its weights load but the representations deviate (figures measured with random
weights and images in EXPORT_SAME_PADDING_NOTE, also written into the file's metadata).

Writing files and loading them as callables is export.py's; this module knows no paths
but the ones it names in errors.
"""
import json
import struct
from typing import Any, Callable

from absl import logging
import numpy as np
import safetensors.numpy

from byol_jax.weights import encoder_weights
from byol_jax.store import files
from byol_jax.model import networks
from byol_jax.store import run_config

FORMAT_VERSION = 1
BYOL_JAX_FORMAT = "byol_jax.encoder"
TORCHVISION_FORMAT = "torchvision.resnet"
TORCHVISION_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
EXPORT_SAME_PADDING_NOTE = (
    "model.padding='same' pads stride-2 convolutions and the max-pool as Haiku/TF do "
    "(the extra pixel after), torchvision symmetrically: the weights load, but the "
    "representations deviate (measured with random weights and images, relative L2 "
    "deviation / lowest cosine similarity: ResNet-18 27% / 0.95 at 32 px, 18% / 0.98 at "
    "64 px; ResNet-50 13% / 0.99 at 32 px, 7.5% / 0.997 at 64 px; smaller at larger "
    "images). Train with model.padding='symmetric' for an exact transfer.")


def safetensors_header(data: bytes) -> dict[str, Any] | None:
  """The parsed JSON header if `data` is laid out as a safetensors file, else None.

  The whole structure is checked (a little-endian u64 header length that fits in the
  file, then that many bytes of JSON that parse as an object), not a magic number:
  safetensors has none, and its length bytes can read as anything, e.g. a header of
  0x480 bytes starts the file with 80 04, a pickle's protocol-4 header.
  """
  if len(data) < 8:
    return None
  length = struct.unpack("<Q", data[:8])[0]
  if not 2 <= length <= len(data) - 8:  # "{}" is the shortest header.
    return None
  try:
    header = json.loads(data[8:8 + length].decode("utf-8"))
  except ValueError:  # Not UTF-8 or not JSON (both are ValueErrors).
    return None
  return header if isinstance(header, dict) else None


# ---------------------------------------------------------------- byol_jax format


def input_normalisation(model_cfg, channels: int) -> tuple[list[float], list[float]]:
  """(mean, std) per channel that the network subtracts/divides its [0, 1] input by."""
  if not model_cfg.get("normalize_inputs", True):
    return [0.0] * channels, [1.0] * channels
  if channels == 3:
    return list(networks.IMAGE_MEAN), list(networks.IMAGE_STD)
  return [float(np.mean(networks.IMAGE_MEAN))], [float(np.mean(networks.IMAGE_STD))]


def _byol_jax_tensors(p: encoder_weights.Pretrained) -> tuple[dict, dict]:
  tensors = {}
  for kind, tree in (("params", p.params), ("state", p.state)):
    for module, leaves in tree.items():
      for name, value in leaves.items():
        tensors[f"{kind}:{module}:{name}"] = np.array(value, order="C")  # Keeps 0-d leaves 0-d.
  mean, std = input_normalisation(p.model, p.channels)
  header = dict(image_size=p.image_size, channels=p.channels, model=p.model.to_dict(),
                input_mean=mean, input_std=std, input_range=[0.0, 1.0], step=p.step,
                source=p.source)
  return tensors, {"format": BYOL_JAX_FORMAT, "format_version": str(FORMAT_VERSION),
                   "config": json.dumps(header, sort_keys=True)}


def read_export(path: str, data: bytes | None = None) -> encoder_weights.Pretrained:
  """Reads a byol_jax-format export back into a Pretrained (source 'byol_jax').

  Args:
    path: the file (any name; local or gs://); named in errors.
    data: its bytes, if the caller has read them already.

  Raises:
    ValueError: not a safetensors file, a torchvision-format export, another safetensors
      file, or a newer format version.
  """
  data = files.read_bytes(path) if data is None else data
  header = safetensors_header(data)
  if header is None:
    raise ValueError(f"{path} is not a safetensors file (byol_jax exports are).")
  meta = header.get("__metadata__") or {}
  if meta.get("format") == TORCHVISION_FORMAT:
    raise ValueError(f"{path} is a torchvision-format export, for PyTorch; export again "
                     "with --format=byol_jax to load it in byol_jax.")
  if meta.get("format") != BYOL_JAX_FORMAT:
    raise ValueError(f"{path} is a safetensors file but not a byol_jax encoder export "
                     f"(metadata format={meta.get('format')!r}).")
  if int(meta.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {meta['format_version']}; this byol_jax "
                     f"reads up to {FORMAT_VERSION}: upgrade byol_jax.")
  trees = {"params": {}, "state": {}}
  for key, value in safetensors.numpy.load(data).items():
    kind, module, name = key.split(":")
    trees[kind].setdefault(module, {})[name] = value
  config = json.loads(meta["config"])
  model = run_config.config_from_json({"model": config["model"]}).model
  return encoder_weights.Pretrained(
      model=model, params=trees["params"], state=trees["state"],
      image_size=int(config["image_size"]), channels=int(config["channels"]),
      step=int(config["step"]), source="byol_jax")


# ---------------------------------------------------------------- torchvision format


def _torchvision_blocker(p: encoder_weights.Pretrained) -> str | None:
  m = p.model
  checks = (
      (m.encoder in TORCHVISION_ENCODERS,
       f"model.encoder={m.encoder!r}; torchvision has {list(TORCHVISION_ENCODERS)}"),
      (not m.resnet_v2, "model.resnet_v2=True; torchvision's ResNets are v1"),
      (float(m.width) == 1.0, f"model.width={m.width}; torchvision's ResNets have width 1 "
                              "(wide_resnet widens only the bottleneck)"),
      (m.stem == "imagenet", f"model.stem={m.stem!r}; torchvision has the 7x7/2 + max-pool "
                             "stem ('imagenet') only"),
      (m.norm == "batch", f"model.norm={m.norm!r}; torchvision's ResNets use batch norm "
                          "without conv biases"),
      (abs(float(m.bn_eps) - 1e-5) < 1e-12, f"model.bn_eps={m.bn_eps}; torchvision's "
                                            "BatchNorm2d uses 1e-5"),
      (p.channels == 3, f"channels={p.channels}; torchvision's ResNets take RGB"),
      (m.encoder not in ("resnet18", "resnet34") or not m.get("first_group_projection"),
       "model.first_group_projection=True; torchvision's ResNet-18/34 have no projection "
       "shortcut in layer1.0"),
  )
  reasons = [reason for ok, reason in checks if not ok]
  return "; ".join(reasons) or None


def _torch_module_name(module: str) -> str:
  """'encoder/~/block_group_1/~/block_0/~/conv_2' -> 'layer2.0.conv3'."""
  parts = module.split("/~/")[1:]  # Drop the top-level 'encoder'.
  stem = {"initial_conv": "conv1", "initial_batchnorm": "bn1"}
  if len(parts) == 1 and parts[0] in stem:
    return stem[parts[0]]
  group, block, layer = parts  # block_group_i, block_j, conv_k / batchnorm_k / shortcut_*.
  prefix = f"layer{int(group.rsplit('_', 1)[1]) + 1}.{int(block.rsplit('_', 1)[1])}"
  if layer.startswith("shortcut_"):
    return f"{prefix}.downsample.{0 if layer == 'shortcut_conv' else 1}"
  kind, index = layer.rsplit("_", 1)
  return f"{prefix}.{'conv' if kind == 'conv' else 'bn'}{int(index) + 1}"


def torchvision_state_dict(p: encoder_weights.Pretrained) -> dict[str, np.ndarray]:
  """The encoder as a torchvision ResNet state_dict (no 'fc'), NumPy arrays.

  Conv kernels HWIO -> OIHW; batch norm scale/offset -> weight/bias, the moving averages
  (mean_ema/var_ema 'average') -> running_mean/running_var, the EMA counter ->
  num_batches_tracked (int64).

  Raises:
    ValueError: naming every reason torchvision cannot express the architecture.
  """
  reason = _torchvision_blocker(p)
  if reason:
    raise ValueError(f"cannot export to torchvision's ResNet: {reason}. Export with "
                     "--format=byol_jax instead.")
  out = {}
  for module, leaves in p.params.items():
    name = _torch_module_name(module)
    if "w" in leaves:
      out[f"{name}.weight"] = np.transpose(leaves["w"], (3, 2, 0, 1))
    else:
      out[f"{name}.weight"] = leaves["scale"].reshape(-1)
      out[f"{name}.bias"] = leaves["offset"].reshape(-1)
  for module, leaves in p.state.items():
    bn_module, _, ema = module.rpartition("/~/")
    name = _torch_module_name(bn_module)
    key = {"mean_ema": "running_mean", "var_ema": "running_var"}[ema]
    out[f"{name}.{key}"] = leaves["average"].reshape(-1)
    if ema == "mean_ema":
      out[f"{name}.num_batches_tracked"] = np.asarray(leaves["counter"], np.int64).reshape(())
  return {k: np.array(v, order="C") for k, v in out.items()}


def _torchvision_tensors(p: encoder_weights.Pretrained) -> tuple[dict, dict]:
  tensors = torchvision_state_dict(p)
  if p.model.padding != "symmetric":
    logging.warning("torchvision export: %s", EXPORT_SAME_PADDING_NOTE)
  mean, std = input_normalisation(p.model, p.channels)
  meta = dict(format=TORCHVISION_FORMAT, format_version=str(FORMAT_VERSION),
              arch=p.model.encoder, input_mean=json.dumps(mean), input_std=json.dumps(std),
              input_range="RGB in [0, 1], then (x - input_mean) / input_std",
              image_size=str(p.image_size), padding=p.model.padding,
              fc="omitted: set model.fc = torch.nn.Identity() to get the representation",
              source=p.source, step=str(p.step))
  if p.model.padding != "symmetric":
    meta["padding_note"] = EXPORT_SAME_PADDING_NOTE
  return tensors, meta


FORMATS: dict[str, Callable] = {"byol_jax": _byol_jax_tensors, "torchvision": _torchvision_tensors}


def check_format(fmt: str) -> None:
  """Raises ValueError for an unknown format name, listing the valid ones."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown export format {fmt!r}; valid: {sorted(FORMATS)}.")


def encode(p: encoder_weights.Pretrained, fmt: str = "byol_jax") -> bytes:
  """The safetensors file of `p` in format `fmt` (see the module docstring).

  Raises:
    ValueError: unknown format (the valid ones are listed) or an architecture the format
      cannot express.
  """
  check_format(fmt)
  tensors, meta = FORMATS[fmt](p)
  return safetensors.numpy.save(tensors, metadata=meta)
