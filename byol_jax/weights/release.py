"""Reading the BYOL authors' released checkpoints (.pkl) without running their code.

Their files are dill pickles (protocol 2) of dict(experiment_state=_ByolExperimentState(
online_params, target_params, online_state, target_state, opt_state), step, rng), with
Haiku-named dicts of NumPy arrays and their LARS optimiser states inside. A pickle can name
any importable callable, so `RestrictedUnpickler` resolves only an allow-list of
(module, name) pairs, each to a harmless stand-in that builds plain data; anything else
is refused before it is called, with an error naming it.

What dill writes for their graph (dill 0.4.1; pickletools on a dill.dumps of it): NamedTuple
classes by value, `dill._dill._create_namedtuple(name, fields, module)`; NumPy arrays as
`dill._dill._create_array(numpy _reconstruct, args, state, None)`; the jax array `rng` as
`jax._src.array._reconstruct_array(numpy _reconstruct, args, state, aval)`; and the globals
those arguments need: numpy's `_reconstruct`, `ndarray`, `dtype`, `scalar`, and
`_codecs.encode` for bytes. The dill of 2020 may have named the classes by reference
instead (a plain GLOBAL), so both forms are accepted, for the same classes only.

The online encoder ('res_net50/~/...' in their files, any top-level name followed by
initial_conv / block_group_i / ...) is renamed to byol_jax's 'encoder/~/...'; encoder
depth, version, width and input channels are inferred from the arrays' shapes.
"""
import collections
import io
import pickle
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from byol_jax import config as config_lib
from byol_jax.weights import encoder_weights
from byol_jax.store import files
from byol_jax.model import networks
from byol_jax.model import resnet

RELEASE_IMAGE_SIZE = 224  # Their ImageNet recipe; the file does not record it.


class ReleaseExperimentState(NamedTuple):
  """Stand-in for byol.byol_experiment._ByolExperimentState (same fields and order)."""
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any


def _state_class(name: str, fields: str) -> type:
  """Stand-in for one of their optimiser-state NamedTuples: plain fields, no behaviour."""
  return collections.namedtuple(name, fields.split(), module=__name__)


# Every NamedTuple class an authors' checkpoint holds, by (module, name): their
# _ByolExperimentState, the states of their optax.chain(add_weight_decay, scale_by_lars,
# scale) (byol/utils/optimizers.py), and optax's stateless/schedule states.
STATE_CLASSES = {
    ("byol.byol_experiment", "_ByolExperimentState"): ReleaseExperimentState,
    ("byol.utils.optimizers", "ScaleByLarsState"): _state_class("ScaleByLarsState", "mu"),
    ("byol.utils.optimizers", "AddWeightDecayState"): _state_class("AddWeightDecayState", ""),
    ("optax._src.transform", "ScaleState"): _state_class("ScaleState", ""),
    ("optax._src.base", "EmptyState"): _state_class("EmptyState", ""),
    ("optax._src.transform", "ScaleByScheduleState"): _state_class("ScaleByScheduleState",
                                                                   "count"),
}


def _numpy_core(name: str):
  module = getattr(np, "_core", None) or np.core
  return getattr(module.multiarray, name)


_RECONSTRUCT = _numpy_core("_reconstruct")


def _refuse(what: str) -> pickle.UnpicklingError:
  return pickle.UnpicklingError(
      f"refused {what}: an authors' checkpoint holds only NumPy arrays, plain containers "
      "and their state classes, so this file is not one (it may be crafted to run code). "
      "Nothing from it was executed.")


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


def _numpy_array(what: str, fun, args, state) -> np.ndarray:
  """`fun(*args).__setstate__(state)`, only for fun = NumPy's _reconstruct of an ndarray."""
  if fun is not _RECONSTRUCT:
    raise _refuse(f"{what} with function {getattr(fun, '__qualname__', type(fun).__name__)} "
                  "(only numpy's _reconstruct builds an array)")
  if not isinstance(args, tuple) or len(args) != 3 or args[0] is not np.ndarray:
    raise _refuse(f"{what} of something other than a plain numpy.ndarray")
  array = _RECONSTRUCT(*args)
  array.__setstate__(state)
  return array


def _dill_array(fun, args, state, npdict=None) -> np.ndarray:
  """Stand-in for dill._dill._create_array: the NumPy array, no instance __dict__."""
  if npdict:
    raise _refuse("dill._dill._create_array with instance attributes (an ndarray subclass)")
  return _numpy_array("dill._dill._create_array", fun, args, state)


def _jax_array(fun, args, array_state, aval_state) -> np.ndarray:
  """Stand-in for jax._src.array._reconstruct_array (their saved rng): the NumPy array."""
  del aval_state  # Only jax's weak_type flag; meaningless for a host array.
  return _numpy_array("jax._src.array._reconstruct_array", fun, args, array_state)


def _device_array(fun, args, array_state, aval_state) -> np.ndarray:
  """Stand-in for the older jax's reconstruct_device_array: the NumPy array it wraps."""
  del aval_state
  return _numpy_array("jax._src.device_array.reconstruct_device_array", fun, args, array_state)


def _namedtuple_class(name, fields, module, defaults=None) -> type:
  """Stand-in for dill._dill._create_namedtuple: the stand-in of an allowed class.

  dill's own imports `module` and returns its attribute `name` whatever it is, so a
  file could name e.g. ('system', (), 'os'); here only STATE_CLASSES exist, with their
  fields exactly.
  """
  key = (module, name) if isinstance(module, str) and isinstance(name, str) else None
  cls = STATE_CLASSES.get(key)
  if cls is None:
    raise _refuse(f"dill._dill._create_namedtuple of {module!r}.{name!r}")
  if tuple(fields) != cls._fields or defaults:
    raise _refuse(f"dill._dill._create_namedtuple of {module}.{name} with fields "
                  f"{tuple(fields)} and defaults {defaults!r} (theirs: {cls._fields}, none)")
  return cls


_NUMPY = {(module, name): obj
          for module in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name, obj in (("_reconstruct", _RECONSTRUCT), ("scalar", _numpy_core("scalar")))}
ALLOWED = {
    **_NUMPY,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    **STATE_CLASSES,  # By reference (a pickle GLOBAL).
    ("dill._dill", "_create_namedtuple"): _namedtuple_class,  # By value, as dill writes them.
    ("dill._dill", "_create_array"): _dill_array,
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("jax._src.device_array", "reconstruct_device_array"): _device_array,
    ("haiku._src.data_structures", "frozendict"): _plain_dict,
    ("haiku._src.data_structures", "FlatMapping"): _plain_dict,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only ALLOWED (module, name) pairs, to their stand-ins."""

  def find_class(self, module: str, name: str):
    try:
      return ALLOWED[(module, name)]
    except KeyError:
      raise _refuse(f"to load {module}.{name}") from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"refused persistent id {pid!r}.")


def is_pickle(data: bytes) -> bool:
  """True if `data` starts with a pickle protocol 2-5 header (theirs use protocol 2)."""
  return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def read_checkpoint(path: str, data: bytes | None = None) -> dict:
  """The checkpoint dict of an authors' .pkl, read with RestrictedUnpickler.

  Args:
    path: their .pkl (local or gs://); named in errors.
    data: its bytes, if the caller has read them already.

  Returns:
    dict with 'experiment_state' (ReleaseExperimentState), 'step' (int) and 'rng'.

  Raises:
    pickle.UnpicklingError: a refused global (named) or a malformed stream.
    ValueError: the pickle holds something other than an authors' checkpoint.
  """
  data = files.read_bytes(path) if data is None else data
  checkpoint = RestrictedUnpickler(io.BytesIO(data)).load()
  if (not isinstance(checkpoint, dict) or
      not isinstance(checkpoint.get("experiment_state"), ReleaseExperimentState)):
    raise ValueError(f"{path} is a pickle but not an authors' BYOL checkpoint (expected a "
                     "dict with experiment_state=_ByolExperimentState(...), step, rng).")
  return checkpoint


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
  input channels; first_group_projection: a shortcut_conv in block 0 of group 0 of a
  basic-block encoder (their ResNetTorso has one at every depth; bottlenecks always do).
  Stem 'imagenet' and padding 'same' are the release's.

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
                    normalize_inputs=True, first_group_projection=(
                        not bottleneck and
                        f"{root}/~/block_group_0/~/block_0/~/shortcut_conv" in params)))
  return model, int(w[2])


def _renamed(tree: dict, root: str, template: dict, path: str) -> dict:
  """The release's encoder modules under 'encoder', reshaped to byol_jax's leaf shapes.

  Raises:
    ValueError: a module of either side without its counterpart (an extra one of theirs
      would otherwise be dropped silently, computing another function), or a shape.
  """
  theirs_for = {root + module[len("encoder"):]: module for module in template}
  extra = sorted(k for k in tree if k.startswith(root + "/~/") and k not in theirs_for)
  if extra:
    raise ValueError(f"{path}: modules {extra} have no counterpart in byol_jax's encoder "
                     "of the inferred architecture; this checkpoint's encoder is another one.")
  out = {}
  for their_module, module in theirs_for.items():
    leaves = template[module]
    theirs = tree.get(their_module)
    if theirs is None or set(theirs) != set(leaves):
      raise ValueError(f"{path}: module {their_module} is missing or has other entries "
                       f"than byol_jax's {module} ({sorted(leaves)}).")
    out[module] = {}
    for name, want in leaves.items():
      value = np.asarray(theirs[name])
      if value.size != int(np.prod(want.shape)):
        raise ValueError(f"{path}: {module}/{name} has shape {value.shape}, byol_jax's "
                         f"encoder expects {want.shape}.")
      out[module][name] = value.reshape(want.shape).astype(want.dtype)
  return out


def load_release(path: str, image_size: int = RELEASE_IMAGE_SIZE,
                 data: bytes | None = None) -> encoder_weights.Pretrained:
  """The online encoder of an authors' release checkpoint (restricted unpickling).

  Args:
    path: their .pkl file (local or gs://).
    image_size: the input size to record (their ImageNet recipe: 224).
    data: the file's bytes, if the caller has read them already.

  Returns:
    Pretrained with source 'release' and their saved step.
  """
  checkpoint = read_checkpoint(path, data)
  state = checkpoint["experiment_state"]
  params, bn_state = state.online_params, state.online_state
  model, channels = infer_model(params, path)
  root = _encoder_root(params, path)
  net = networks.make_encoder_network(model)
  template = jax.eval_shape(
      lambda: net.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, channels), np.float32), True))
  return encoder_weights.Pretrained(
      model=model, params=_renamed(params, root, template[0], path),
      state=_renamed(bn_state, root, template[1], path), image_size=image_size,
      channels=channels, step=int(checkpoint.get("step", 0)), source="release")
