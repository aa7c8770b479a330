"""The BYOL authors' encoder and checkpoint, rebuilt from Haiku's pieces, for release tests.

`AuthorsResNet18/50` are their `ResNetTorso` (byol/utils/networks.py) written from the
facts in BYOL_REFERENCE.md: `initial_conv` 7x7/2 (no bias, SAME) -> `initial_batchnorm`
(decay 0.9, eps 1e-5, scale and offset) -> relu -> `hk.max_pool` 3x3/2 SAME -> four
`hk.nets.ResNet.BlockGroup`s with `use_projection=True` in every group -> global mean, on
inputs standardised with ImageNet's channel mean/std. The classes are named as theirs, so
Haiku names the modules 'res_net18/~/...' / 'res_net50/~/...' as in their files: the params
of this network ARE the arrays a checkpoint of theirs holds.

`checkpoint(...)` builds their checkpoint's object graph (dict(experiment_state=
_ByolExperimentState(...), step, rng)) with NamedTuple classes made at call time in their
modules' names; `dill_dump` writes it with dill as their Checkpointer does.
"""
import collections
import contextlib
import pickletools
import sys
import types

import dill
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_CONFIG = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


class ResNetTorso(hk.Module):
  """Their ResNet torso: stem, four hk.nets.ResNet.BlockGroups, global mean."""

  def __init__(self, blocks_per_group, bottleneck, channels_per_group, width=1, name=None):
    super().__init__(name=name)
    self.initial_conv = hk.Conv2D(64 * width, kernel_shape=7, stride=2, with_bias=False,
                                  padding="SAME", name="initial_conv")
    self.initial_batchnorm = hk.BatchNorm(name="initial_batchnorm", **BN_CONFIG)
    self.block_groups = [
        hk.nets.ResNet.BlockGroup(channels=channels_per_group[i] * width,
                                  num_blocks=blocks_per_group[i], stride=stride,
                                  bn_config=BN_CONFIG, resnet_v2=False, bottleneck=bottleneck,
                                  use_projection=True, name=f"block_group_{i}")
        for i, stride in enumerate((1, 2, 2, 2))]

  def __call__(self, images, is_training):
    x = jax.nn.relu(self.initial_batchnorm(self.initial_conv(images), is_training))
    x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
    for group in self.block_groups:
      x = group(x, is_training, False)
    return jnp.mean(x, axis=(1, 2))


class ResNet18(ResNetTorso):
  def __init__(self, width=1):
    super().__init__((2, 2, 2, 2), False, (64, 128, 256, 512), width)


class ResNet50(ResNetTorso):
  def __init__(self, width=1):
    super().__init__((3, 4, 6, 3), True, (256, 512, 1024, 2048), width)


ENCODERS = {"resnet18": (ResNet18, "res_net18"), "resnet50": (ResNet50, "res_net50")}


def network(encoder: str, width: int = 1) -> hk.TransformedWithState:
  """Their encoder on [0, 1] images: apply(params, state, None, images, is_training)."""
  cls, _ = ENCODERS[encoder]

  def forward(images, is_training):
    mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
    return cls(width)((images - mean) / std, is_training)
  return hk.transform_with_state(forward)


def random_values(shapes, seed: int = 0):
  """Random arrays for a Haiku encoder's (params, state) shapes: He-scaled kernels and
  non-trivial batch-norm values (scales in [0.2, 0.7] keep activations O(1) through the
  residual blocks, so the representation is non-trivial and a wrong wiring shows)."""
  rng = np.random.RandomState(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "counter" in name:
      return np.full(x.shape, 7, x.dtype)
    if name.endswith("['w']"):
      return rng.normal(0, np.sqrt(2.0 / np.prod(x.shape[:-1])), x.shape).astype(x.dtype)
    if "scale" in name:
      return rng.uniform(0.2, 0.7, x.shape).astype(x.dtype)
    if "var_ema" in name:
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    return rng.normal(0, 0.2, x.shape).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_weights(encoder: str, seed: int = 0, width: int = 1):
  """(params, state) of their encoder with `random_values`."""
  shapes = jax.eval_shape(lambda: network(encoder, width).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), True))
  return random_values(shapes, seed)


def state_classes(scale_state=None):
  """Their NamedTuple classes, made now, under their modules' names (not importable).

  Args:
    scale_state: the class of optax.scale's state; by default the optax of 2020's,
      optax._src.transform.ScaleState (today's optax names it optax._src.base.EmptyState).
  """
  classes = dict(
      experiment=collections.namedtuple(
          "_ByolExperimentState",
          "online_params target_params online_state target_state opt_state",
          module="byol.byol_experiment"),
      lars=collections.namedtuple("ScaleByLarsState", "mu", module="byol.utils.optimizers"),
      weight_decay=collections.namedtuple("AddWeightDecayState", "",
                                          module="byol.utils.optimizers"),
      scale=scale_state or collections.namedtuple("ScaleState", "",
                                                  module="optax._src.transform"))
  return classes


def checkpoint(params, state, step=1234, classes=None):
  """Their checkpoint dict around an encoder's (params, state) in their names.

  The online network also has projector/predictor/classifier heads; the target differs
  from the online network in every array, so reading the wrong half cannot pass; the
  optimiser state is their chain(add_weight_decay, scale_by_lars, scale); rng a jax array.
  """
  classes = classes or state_classes()
  head = {"w": np.full((4, 3), 0.5, np.float32), "b": np.zeros((3,), np.float32)}
  online = {**params, "projector/~/linear": head, "predictor/~/linear": head,
            "classifier/~/linear": head}
  target = jax.tree_util.tree_map(lambda x: np.negative(x) - 1, online)
  target_state = jax.tree_util.tree_map(lambda x: x + 1, state)
  opt_state = (classes["weight_decay"](), classes["lars"](mu=online), classes["scale"]())
  experiment = classes["experiment"](online, target, state, target_state, opt_state)
  return dict(experiment_state=experiment, step=step, rng=jax.random.PRNGKey(42))


def dill_dump(data, path) -> bytes:
  """As their Checkpointer.maybe_save_checkpoint: dill.dump(data, f, protocol=2)."""
  with open(path, "wb") as f:
    dill.dump(data, f, protocol=2)
  with open(path, "rb") as f:
    return f.read()


class ByReferencePickler(dill.Pickler):
  """dill, except that classes are named by reference (a plain GLOBAL), as the dill of
  2020 may have written them; arrays still go through dill._dill._create_array."""
  dispatch = dill.Pickler.dispatch.copy()
  del dispatch[type]


@contextlib.contextmanager
def importable(classes):
  """Registers `classes` in fake modules named as theirs, so they pickle by reference.

  Classes of modules that exist already (optax's) must be those modules' own; nothing
  real is patched.
  """
  saved = dict(sys.modules)
  try:
    for cls in classes.values():
      if cls.__module__ in saved:
        assert getattr(saved[cls.__module__], cls.__name__, None) is cls, cls
        continue
      parts = cls.__module__.split(".")
      for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
      setattr(sys.modules[cls.__module__], cls.__name__, cls)
    yield
  finally:
    for name in set(sys.modules) - set(saved):
      del sys.modules[name]


def dill_dump_by_reference(data, path) -> bytes:
  """`data` dumped by dill (protocol 2) with its classes named by reference."""
  with open(path, "wb") as f:
    ByReferencePickler(f, protocol=2).dump(data)
  with open(path, "rb") as f:
    return f.read()


def globals_of(data: bytes) -> set[str]:
  """'module.name' of every GLOBAL opcode in a pickle stream."""
  return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data)
          if op.name == "GLOBAL"}

