"""Workdirs the tests write or read through the library: random TrainStates saved as real
checkpoints with their config.json (the smoke recipe's structure), and a finished run's
final state restored."""
import jax
import numpy as np

import fakes
from byol_jax import parallel
from byol_jax.store import checkpoint
from byol_jax.store import run_config
from byol_jax.training import train


def tiny_config(**model):
  """The Fashion-MNIST smoke recipe (ResNet-18, width 1/8, small stem, 28 px)."""
  c = fakes.recipe("byol_fashion_mnist", "smoke")
  c.unlock()
  c.model.update(model)
  return c


def random_state(c, channels, seed):
  """A TrainState with the structure of init_state and random values in every leaf."""
  template = jax.eval_shape(lambda k: train.init_state(c, train.make_deps(c), k, channels),
                            jax.random.PRNGKey(0))
  rng = np.random.RandomState(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if np.issubdtype(x.dtype, np.integer):
      return np.zeros(x.shape, x.dtype)
    values = rng.uniform(0.5, 1.5, x.shape) if "var" in name else rng.normal(0, 0.3, x.shape)
    return values.astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, template)


def write_workdir(workdir, c, channels, steps, seed=0):
  """Saves a random TrainState at each of `steps` (values differ per step) + config.json.

  Returns:
    {step: host TrainState} of what was saved.
  """
  saved = {}
  with checkpoint.Checkpointer(str(workdir), every_steps=1, keep=len(steps)) as ckpt:
    for i, step in enumerate(steps):
      state = random_state(c, channels, seed + i)._replace(step=np.int32(step))
      saved[step] = state
      ckpt.save(step, parallel.replicate(state), force=True)
  run_config.save_config(str(workdir), c)
  return saved


def restore_final(workdir, c):
  deps = train.make_deps(c)
  template = parallel.replicate(train.init_state(c, deps, jax.random.PRNGKey(0), 1))
  with checkpoint.Checkpointer.from_config(str(workdir), c) as ckpt:
    step, state = ckpt.restore_or_none(template, c)
  return step, parallel.unreplicate(state)
