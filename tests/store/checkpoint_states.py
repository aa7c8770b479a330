"""States for the checkpoint tests: a small TrainState-shaped tree with a real optax chain state
inside, built from NumPy arrays (seeded), replicated as the pmapped update returns it, and
compared on every local replica; a Checkpointer on a workdir and its save / restore.
"""
from typing import Any, NamedTuple
import os

import jax
import numpy as np
import optax

from byol_jax.store import checkpoint
from byol_jax import config as config_lib
from byol_jax.store import integrity


class State(NamedTuple):
  """Same fields as train.TrainState."""
  step: Any
  online_params: Any
  online_state: Any
  target_params: Any
  target_state: Any
  opt_state: Any


def _optimizer():
  mask = {"linear": {"w": True, "b": False}}
  return optax.chain(optax.masked(optax.add_decayed_weights(1e-3), mask), optax.trace(0.9),
                     optax.scale_by_schedule(lambda count: 0.1))


def host_state(seed: int, step: int, big: int = 0) -> State:
  """A host (NumPy) state whose every leaf depends on seed; `big` adds a large leaf."""
  rng = np.random.RandomState(seed)
  params = {"linear": {"w": rng.randn(3, 2).astype(np.float32),
                       "b": rng.randn(2).astype(np.float32)}}
  opt_state = _optimizer().init(params)
  trace = jax.tree_util.tree_map(lambda x: rng.randn(*x.shape).astype(np.float32), params)
  opt_state = (opt_state[0], optax.TraceState(trace=trace),
               optax.ScaleByScheduleState(count=np.int32(step)))
  bn = {"bn": {"mean": rng.randn(2).astype(np.float32), "var": rng.rand(2).astype(np.float32)}}
  if big:
    bn["bn"]["big"] = rng.randn(big).astype(np.float32)
  target = jax.tree_util.tree_map(lambda x: x + 1, params)
  return State(np.int32(step), params, bn, target, jax.tree_util.tree_map(np.copy, bn),
               opt_state)


@jax.pmap
def _identity(tree):
  return tree


def replicated(host: State) -> State:
  """The host state as the pmapped update returns it: leaves [local_devices, ...]."""
  n = jax.local_device_count()
  return _identity(jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), host))


def assert_state_equals(restored: State, expected: State) -> None:
  """Same tree (NamedTuples included) and every local replica equal to the host values."""
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(expected)
  n = jax.local_device_count()
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected)):
    assert got.shape == (n,) + np.shape(want) and got.dtype == np.asarray(want).dtype
    for shard in got.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data)[0], want)


def small_config():
  return config_lib.base_config()


def make_checkpointer(workdir, every_steps=5, keep=3):
  return checkpoint.Checkpointer(str(workdir), every_steps=every_steps, keep=keep)


def save_steps(workdir, steps, keep=3):
  """Saves host_state(seed=step, step) at each step; returns the host states by step."""
  states = {}
  with make_checkpointer(workdir, keep=keep) as ckpt:
    for step in steps:
      states[step] = host_state(step, step)
      assert ckpt.save(step, replicated(states[step]), force=True)
  return states


def restore(workdir, config=None):
  with make_checkpointer(workdir) as ckpt:
    return ckpt.restore_or_none(replicated(host_state(0, 0)), config or small_config())


def largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if f != integrity.MANIFEST_FILE]
  return max(files, key=os.path.getsize)
