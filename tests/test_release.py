"""release.py: an authors'-format .pkl (written here with their module and class names,
pickle protocol 2) loads into byol_jax's encoder with identical outputs; crafted pickles
are refused by name and their payload never runs.
"""
import os
import pickle
import subprocess
import sys
import types
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest

from byol_jax import config as config_lib
from byol_jax import export
from byol_jax import networks
from byol_jax import pretrained
from byol_jax import release


class _ByolExperimentState(NamedTuple):
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any


class ScaleByLarsState(NamedTuple):
  mu: Any


class AddWeightDecayState(NamedTuple):
  """Stateless, as in their optimizers.py."""


@pytest.fixture(scope="module")
def their_modules():
  """byol.byol_experiment and byol.utils.optimizers as importable modules, for pickling."""
  names = ("byol", "byol.utils", "byol.byol_experiment", "byol.utils.optimizers")
  saved = {n: sys.modules.get(n) for n in names}
  modules = {n: types.ModuleType(n) for n in names}
  modules["byol.byol_experiment"]._ByolExperimentState = _ByolExperimentState
  modules["byol.utils.optimizers"].ScaleByLarsState = ScaleByLarsState
  modules["byol.utils.optimizers"].AddWeightDecayState = AddWeightDecayState
  for cls, module in ((_ByolExperimentState, "byol.byol_experiment"),
                      (ScaleByLarsState, "byol.utils.optimizers"),
                      (AddWeightDecayState, "byol.utils.optimizers")):
    cls.__module__ = module
  sys.modules.update(modules)
  yield
  for n, m in saved.items():
    if m is None:
      sys.modules.pop(n, None)
    else:
      sys.modules[n] = m


def random_encoder(model, channels=3, seed=0):
  net = networks.make_encoder_network(model)
  shapes = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, channels), np.float32), True))
  rng = np.random.RandomState(seed)

  def fill(path, x):
    if np.issubdtype(x.dtype, np.integer):
      return np.full(x.shape, 5, x.dtype)
    low = 0.5 if "var_ema" in jax.tree_util.keystr(path) else -0.5
    return rng.uniform(low, low + 1.0, x.shape).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def their_names(tree, root):
  return {root + k[len("encoder"):]: dict(v) for k, v in tree.items()}


def write_release(path, params, state, root, step=1234, protocol=2):
  """A checkpoint laid out as their checkpointing.py writes it."""
  head = {"w": np.ones((4, 3), np.float32), "b": np.zeros((3,), np.float32)}
  online = {**their_names(params, root), "projector/~/linear": head, "classifier": head}
  target = jax.tree_util.tree_map(lambda x: x + 1, online)
  online_state = their_names(state, root)
  opt_state = [AddWeightDecayState(), ScaleByLarsState(mu=online), optax.EmptyState()]
  experiment = _ByolExperimentState(online, target, online_state, online_state, opt_state)
  data = dict(experiment_state=experiment, step=step, rng=np.array([0, 42], np.uint32))
  with open(path, "wb") as f:
    pickle.dump(data, f, protocol=protocol)
  return path


SMALL = dict(encoder="resnet18", width=0.125)


@pytest.fixture(scope="module")
def small_release(their_modules, tmp_path_factory):
  model = config_lib.base_config().model
  model.update(SMALL)
  params, state = random_encoder(model)
  path = write_release(tmp_path_factory.mktemp("rel") / "byol.pkl", params, state, "res_net18")
  return model, params, state, path


def test_release_file_loads_and_its_encoder_matches_the_known_weights(small_release):
  model, params, state, path = small_release
  loaded = pretrained.load(str(path))
  assert (loaded.source, loaded.step, loaded.channels, loaded.image_size) == (
      "release", 1234, 3, 224)
  for field in ("encoder", "width", "resnet_v2", "stem", "padding", "norm"):
    assert loaded.model[field] == model[field], field
  images = np.random.RandomState(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  net = networks.make_encoder_network(model)
  want, _ = jax.jit(lambda p, s, x: net.apply(p, s, None, x, is_training=False))(
      params, state, images)
  encoder = export.Encoder(loaded._replace(image_size=32))
  np.testing.assert_array_equal(encoder(images), np.asarray(want))


def test_numpy_1_module_names_of_2020_files_are_accepted(small_release, tmp_path):
  _, params, _, path = small_release
  data = path.read_bytes()
  assert b"numpy._core.multiarray\n_reconstruct" in data  # What today's numpy writes.
  old = tmp_path / "old.pkl"
  old.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
  loaded = release.load_release(str(old))
  np.testing.assert_array_equal(loaded.params["encoder/~/initial_conv"]["w"],
                                params["encoder/~/initial_conv"]["w"])


@pytest.mark.parametrize("model", [
    dict(encoder="resnet50", width=2.0),
    dict(encoder="resnet101", width=1.0, resnet_v2=True),
    dict(encoder="resnet34", width=1.0),
])
def test_encoder_depth_version_and_width_are_inferred_from_shapes(model):
  m = config_lib.base_config().model
  m.update(model)
  net = networks.make_encoder_network(m)
  params, _ = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), True))
  inferred, channels = release.infer_model(their_names(params, "res_net"))
  assert channels == 1
  for key, value in model.items():
    assert inferred[key] == value, key


def _payloads(marker):
  class System:
    def __reduce__(self):
      return os.system, (f"touch {marker}",)

  class Eval:
    def __reduce__(self):
      return eval, (f"open({str(marker)!r}, 'w')",)

  class Popen:
    def __reduce__(self):
      return subprocess.Popen, (["touch", str(marker)],)
  return {"posix.system": System, "builtins.eval": Eval, "subprocess.Popen": Popen}


@pytest.mark.parametrize("refused", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_crafted_pickle_is_refused_by_name_without_running(refused, tmp_path):
  marker = tmp_path / "pwned"
  payload = _payloads(marker)[refused]()
  path = tmp_path / "evil.pkl"
  # Hidden inside an otherwise well-formed checkpoint dict. fix_imports=False keeps the
  # Python 3 module names (protocol 2 would write e.g. __builtin__.eval otherwise).
  path.write_bytes(pickle.dumps({"experiment_state": payload, "step": 1}, protocol=2,
                                fix_imports=False))
  with pytest.raises(pickle.UnpicklingError, match=f"refused to load {refused}:.*Nothing"):
    pretrained.load(str(path))
  assert not marker.exists()


def test_pickle_of_something_else_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "list.pkl"
  path.write_bytes(pickle.dumps([np.zeros(2)], protocol=2))
  with pytest.raises(ValueError, match="not an authors' BYOL checkpoint"):
    pretrained.load(str(path))
