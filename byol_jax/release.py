"""Reading the BYOL authors' released checkpoints (.pkl) without running their code.

Their files are dill pickles (protocol 2) of dict(experiment_state=_ByolExperimentState(
online_params, target_params, online_state, target_state, opt_state), step, rng), with
Haiku-named dicts of NumPy arrays and their LARS optimiser states inside. A pickle can name
any importable callable, so `RestrictedUnpickler` resolves only an allow-list of
(module, name) pairs, each to a harmless stand-in that builds plain data; anything else
is refused before it is called, with an error naming it.

The online encoder ('res_net50/~/...' in their files, any top-level name followed by
initial_conv / block_group_i / ...) is renamed to byol_jax's 'encoder/~/...'; encoder
depth, version, width and input channels are inferred from the arrays' shapes.
"""
import io
import pickle
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from byol_jax import config as config_lib
from byol_jax import networks
from byol_jax import pretrained as pretrained_lib
from byol_jax import resnet

RELEASE_IMAGE_SIZE = 224  # Their ImageNet recipe; the file does not record it.


class ReleaseExperimentState(NamedTuple):
  """Stand-in for byol.byol_experiment._ByolExperimentState (same fields and order)."""
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any


class OpaqueState(tuple):
  """Stand-in for an optimiser-state NamedTuple: keeps the fields as a plain tuple."""

  def __new__(cls, *fields):
    return super().__new__(cls, fields)

  def __setstate__(self, state):
    del state  # Optimiser internals are not used; nothing to restore.


def _numpy_core(name: str):
  module = getattr(np, "_core", None) or np.core
  return getattr(module.multiarray, name)


_RECONSTRUCT = _numpy_core("_reconstruct")


def _latin1_bytes(text: str, encoding: str) -> bytes:
  """Protocol 2 stores bytes as _codecs.encode(text, 'latin1'); only that is allowed."""
  if not isinstance(text, str) or encoding != "latin1":
    raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}.")
  return text.encode("latin1")


def _plain_dict(mapping) -> dict:
  """Stand-in for Haiku's frozendict/FlatMapping reconstruction: a plain dict."""
  if not isinstance(mapping, dict):
    raise pickle.UnpicklingError(
        f"a Haiku mapping was pickled as {type(mapping).__name__}, not a dict; this file "
        "layout is not supported.")
  return dict(mapping)


def _device_array(fun, args, array_state, aval_state):
  """Stand-in for jax's reconstruct_device_array: the NumPy array it wraps."""
  del aval_state
  if fun is not _RECONSTRUCT:
    raise pickle.UnpicklingError("refused a jax array not built by numpy's _reconstruct.")
  array = _RECONSTRUCT(*args)
  array.__setstate__(array_state)
  return array


_NUMPY = {(module, name): obj
          for module in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name, obj in (("_reconstruct", _RECONSTRUCT), ("scalar", _numpy_core("scalar")))}
_OPTIMIZER_STATES = ("byol.utils.optimizers.ScaleByLarsState",
                     "byol.utils.optimizers.AddWeightDecayState",
                     "optax._src.transform.ScaleState", "optax._src.base.EmptyState",
                     "optax._src.transform.ScaleByScheduleState")
ALLOWED = {
    **_NUMPY,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("byol.byol_experiment", "_ByolExperimentState"): ReleaseExperimentState,
    **{tuple(path.rsplit(".", 1)): OpaqueState for path in _OPTIMIZER_STATES},
    ("haiku._src.data_structures", "frozendict"): _plain_dict,
    ("haiku._src.data_structures", "FlatMapping"): _plain_dict,
    ("jax._src.device_array", "reconstruct_device_array"): _device_array,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only ALLOWED (module, name) pairs, to their stand-ins."""

  def find_class(self, module: str, name: str):
    try:
      return ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refused to load {module}.{name}: an authors' checkpoint holds only NumPy arrays, "
          "plain containers and their state classes, so this file is not one (it may be "
          "crafted to run code). Nothing from it was executed.") from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"refused persistent id {pid!r}.")


def read_checkpoint(path: str) -> dict:
  """The checkpoint dict of an authors' .pkl, read with RestrictedUnpickler.

  Returns:
    dict with 'experiment_state' (ReleaseExperimentState), 'step' (int) and 'rng'.

  Raises:
    pickle.UnpicklingError: a refused global (named) or a malformed stream.
    ValueError: the pickle holds something other than an authors' checkpoint.
  """
  with open(path, "rb") as f:
    data = RestrictedUnpickler(io.BytesIO(f.read())).load()
  if (not isinstance(data, dict) or
      not isinstance(data.get("experiment_state"), ReleaseExperimentState)):
    raise ValueError(f"{path} is a pickle but not an authors' BYOL checkpoint (expected a "
                     "dict with experiment_state=_ByolExperimentState(...), step, rng).")
  return data


def _encoder_root(params: dict, path: str) -> str:
  roots = {k.split("/~/")[0] for k in params if k.endswith("/~/initial_conv")}
  if len(roots) != 1:
    raise ValueError(f"{path}: expected one encoder with an '<name>/~/initial_conv' module in "
                     f"online_params, found {sorted(roots) or 'none'}.")
  return roots.pop()


def infer_model(params: dict, path: str = "checkpoint") -> tuple[ml_collections.ConfigDict, int]:
  """(model config, channels) of byol_jax's encoder that has the release encoder's shapes.

  Depth: blocks per group and whether blocks have a third conv (bottleneck); version: a
  'final_batchnorm' means v2; width: initial_conv output channels / 64; channels: its
  input channels. Stem 'imagenet' and padding 'same' are the release's.

  Args:
    params: online_params of the release checkpoint (their module names).
  """
  root = _encoder_root(params, path)
  w = np.shape(params[f"{root}/~/initial_conv"]["w"])
  blocks = [0, 0, 0, 0]
  for key in params:
    parts = key.split("/~/")
    if len(parts) >= 3 and parts[0] == root and parts[1].startswith("block_group_"):
      group, block = int(parts[1].rsplit("_", 1)[1]), int(parts[2].rsplit("_", 1)[1])
      blocks[group] = max(blocks[group], block + 1)
  bottleneck = f"{root}/~/block_group_0/~/block_0/~/conv_2" in params
  names = [n for n, spec in resnet.ENCODERS.items()
           if spec.blocks_per_group == tuple(blocks) and spec.bottleneck == bottleneck]
  if not names:
    raise ValueError(f"{path}: no byol_jax encoder has {blocks} blocks per group "
                     f"(bottleneck={bottleneck}); valid: {sorted(resnet.ENCODERS)}.")
  model = config_lib.base_config().model
  model.update(dict(encoder=names[0], width=w[3] / 64, stem="imagenet", padding="same",
                    resnet_v2=f"{root}/~/final_batchnorm" in params, norm="batch",
                    normalize_inputs=True))
  return model, int(w[2])


def _renamed(tree: dict, root: str, template: dict, path: str) -> dict:
  """The release's encoder modules under 'encoder', reshaped to byol_jax's leaf shapes."""
  out = {}
  for module, leaves in template.items():
    theirs = tree.get(root + module[len("encoder"):])
    if theirs is None or set(theirs) != set(leaves):
      raise ValueError(f"{path}: module {root + module[len('encoder'):]} is missing or has "
                       f"other entries than byol_jax's {module} ({sorted(leaves)}).")
    out[module] = {}
    for name, want in leaves.items():
      value = np.asarray(theirs[name])
      if value.size != int(np.prod(want.shape)):
        raise ValueError(f"{path}: {module}/{name} has shape {value.shape}, byol_jax's "
                         f"encoder expects {want.shape}.")
      out[module][name] = value.reshape(want.shape).astype(want.dtype)
  return out


def load_release(path: str, image_size: int = RELEASE_IMAGE_SIZE) -> pretrained_lib.Pretrained:
  """The online encoder of an authors' release checkpoint (restricted unpickling).

  Args:
    path: their .pkl file.
    image_size: the input size to record (their ImageNet recipe: 224).

  Returns:
    Pretrained with source 'release' and their saved step.
  """
  data = read_checkpoint(path)
  state = data["experiment_state"]
  params, bn_state = state.online_params, state.online_state
  model, channels = infer_model(params, path)
  root = _encoder_root(params, path)
  net = networks.make_encoder_network(model)
  template = jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, channels), np.float32), True))
  return pretrained_lib.Pretrained(
      model=model, params=_renamed(params, root, template[0], path),
      state=_renamed(bn_state, root, template[1], path), image_size=image_size,
      channels=channels, step=int(data.get("step", 0)), source="release")
