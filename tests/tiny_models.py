"""Tiny networks for model tests (width 1/16, 16 px, batch 2): configs, images, cached
real initialisations, NumPy-filled parameters (`fake_init`, no random initialisers to compile)
and shapes traced with jax.eval_shape.
"""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import config as config_lib
from byol_jax.model import networks


# RngBitGenerator keys compile far faster on CPU than threefry; values do not matter here.
KEY = jax.random.key(0, impl="rbg")
TINY = dict(encoder="resnet18", stem="small", width=0.0625, projector_hidden=16,
            projector_out=8, predictor_hidden=16, gn_groups=4)


def model_cfg(**overrides):
  c = config_lib.base_config().model
  c.update(TINY)
  c.update(overrides)
  return c


def images(n=2, size=16, seed=0):
  return jnp.asarray(np.random.RandomState(seed).rand(n, size, size, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def init_encoder(**overrides):
  net = networks.make_encoder_network(model_cfg(**overrides))
  return net, *net.init(KEY, images(), True)


@functools.lru_cache(maxsize=None)
def init_byol(**overrides):
  net = networks.make_byol_network(model_cfg(**overrides), num_classes=5)
  return net, *net.init(KEY, images(), True)


def fake_init(net, x, seed=0):
  """Deterministic NumPy-filled params and zero state with the shapes `net.init` makes.

  Tracing init with eval_shape proves it builds; skipping its random initialisers saves
  one compilation per parameter shape.
  """
  rng = np.random.RandomState(seed)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)

  def fill(module, name, s):
    del module
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.randn(*s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if name == "w" else 100
    return jnp.asarray(rng.randn(*s.shape) / np.sqrt(fan_in), s.dtype)

  params = hk.data_structures.map(fill, params)
  return params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)


def shapes_of(net, size=32):
  """(params, state) shapes of a transformed net, traced without compiling."""
  return jax.eval_shape(lambda x: net.init(KEY, x, True),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def abstract_forward(net, size=16, batch=2, is_training=False):
  """(outputs, new_state) shapes of init followed by apply, traced without compiling."""
  def run(x):
    params, state = net.init(KEY, x, True)
    return net.apply(params, state, None, x, is_training)
  return jax.eval_shape(run, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))


def named_shapes(tree, strip_top=True):
  """{'module/param': shape}, the top-level module name removed when strip_top."""
  out = {}
  for module, name, value in hk.data_structures.traverse(tree):
    if strip_top:
      module = module.split("/~/", 1)[1] if "/~/" in module else ""
    out[f"{module}/{name}"] = tuple(value.shape)
  return out


def count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
