"""release.py: the authors' checkpoints load into byol_jax's encoder and give their encoder's
representations; crafted pickles are refused by name and their payload never runs.

Fixtures are written as the authors' Checkpointer writes them, by dill itself (protocol 2:
NamedTuple classes by value through dill._dill._create_namedtuple, arrays through
dill._dill._create_array, the jax rng through jax._src.array._reconstruct_array), and with
the classes by reference (the dill of 2020 may have written that; plain pickle does). The
reference is their ResNetTorso rebuilt from hk.nets.ResNet pieces (tests/authors_reference.py),
whose params are the very arrays in the file.
"""
import os
import pickle
import subprocess
import sys
import urllib.parse
import urllib.request

import dill
import jax
import numpy as np
import optax
import pytest

import authors_reference as authors
from fake_gcs import gcs  # noqa: F401  (fake-gcs-server fixture)
from byol_jax import config as config_lib
from byol_jax.weights import export
from byol_jax.weights import export_formats
from byol_jax.model import networks
from byol_jax.weights import pretrained
from byol_jax.weights import release

IMAGES = np.random.RandomState(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
# Relative L2 deviation allowed between our encoder and theirs on the same weights. Both
# run the same float32 operations, but each of the ~55 layers of a ResNet-50 may round
# differently (another convolution algorithm, another order of the batch-norm arithmetic)
# by a few units of float32 rounding (6e-8); added up along the depth that stays below
# 55 * 3 * 6e-8 = 1e-5.
TOLERANCE = 1e-5
DILL_CONSTRUCTORS = {"dill._dill._create_namedtuple", "dill._dill._create_array",
                     "jax._src.array._reconstruct_array"}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
  """encoder -> their checkpoint of a random encoder (width 1, as released), written by
  dill: (encoder, params, state, path, bytes); each written once per module."""
  written = {}

  def get(encoder):
    if encoder not in written:
      params, state = authors.random_weights(encoder)
      path = tmp_path_factory.mktemp("dill") / "pretrain.pkl"
      data = authors.dill_dump(authors.checkpoint(params, state), path)
      written[encoder] = (encoder, params, state, path, data)
    return written[encoder]
  return get


@pytest.fixture(params=["resnet18", "resnet50"])
def dill_release(request, releases):
  return releases(request.param)


@pytest.fixture
def resnet18(releases):
  return releases("resnet18")


def relative_deviation(got, want) -> float:
  return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def authors_representation(encoder, params, state, images=IMAGES) -> np.ndarray:
  net = authors.network(encoder)
  return np.asarray(jax.jit(lambda p, s, x: net.apply(p, s, None, x, is_training=False)[0])(
      params, state, images))


def test_dill_checkpoint_gives_the_authors_representations(dill_release):
  encoder, params, state, path, data = dill_release
  assert DILL_CONSTRUCTORS <= authors.globals_of(data)  # The entries under test are used.
  loaded = pretrained.load(str(path))
  assert (loaded.source, loaded.step, loaded.channels, loaded.image_size) == (
      "release", 1234, 3, 224)
  assert (loaded.model.encoder, loaded.model.width, loaded.model.resnet_v2) == (
      encoder, 1.0, False)
  # Their ResNet-18 projects the shortcut of block 0 of group 0; a ResNet-50 always does.
  assert loaded.model.first_group_projection == (encoder == "resnet18")
  want = authors_representation(encoder, params, state)
  got = export.Encoder(loaded._replace(image_size=32))(IMAGES)
  assert np.abs(want).max() > 0.1  # Non-trivial activations reach the output.
  assert relative_deviation(got, want) <= TOLERANCE


def test_dill_writes_only_what_the_allow_list_accepts(dill_release):
  """Every global dill writes for their graph resolves to a stand-in (dill 0.4.1: numpy's
  _reconstruct/ndarray/dtype/scalar, _codecs.encode and the three constructors)."""
  names = authors.globals_of(dill_release[4])
  allowed = {f"{module}.{name}" for module, name in release.ALLOWED}
  assert names <= allowed, names - allowed


@pytest.mark.parametrize("writer", ["dill", "pickle"])
def test_classes_by_reference_load_the_same_weights(writer, resnet18, tmp_path):
  _, params, state, by_value_path, _ = resnet18
  classes = authors.state_classes(scale_state=optax.EmptyState)  # Today's optax names.
  path = tmp_path / "by_reference.pkl"
  with authors.importable(classes):
    checkpoint = authors.checkpoint(params, state, classes=classes)
    if writer == "dill":
      data = authors.dill_dump_by_reference(checkpoint, path)
    else:
      path.write_bytes(pickle.dumps(checkpoint, protocol=2))
      data = path.read_bytes()
  names = authors.globals_of(data)
  assert "byol.byol_experiment._ByolExperimentState" in names
  assert "dill._dill._create_namedtuple" not in names
  want = pretrained.load(str(by_value_path))
  got = pretrained.load(str(path))
  assert got.model.to_dict() == want.model.to_dict()
  jax.tree_util.tree_map(np.testing.assert_array_equal, (got.params, got.state),
                         (want.params, want.state))


def test_export_command_reads_a_release_from_gs_and_writes_there(gcs, resnet18):  # noqa: F811
  """`byol-jax export --from_release=gs://...` as a user runs it, in its own process (epath
  picks its gs backend once per process, so this one's earlier local reads cannot steer
  it); the bucket is filled and read through the emulator's HTTP API, not byol_jax."""
  _, _, _, path, data = resnet18
  name = urllib.parse.quote("release/pretrain.pkl", safe="")
  upload = urllib.request.Request(
      f"{gcs.server_url}/upload/storage/v1/b/{gcs.url()[len('gs://'):]}/o?uploadType=media&"
      f"name={name}", data=data, headers={"Content-Type": "application/octet-stream"},
      method="POST")
  urllib.request.urlopen(upload, timeout=60).close()
  out = gcs.url("exports", "enc")
  done = subprocess.run([sys.executable, "-m", "byol_jax", "export",
                         f"--from_release={gcs.url('release', 'pretrain.pkl')}", f"--out={out}"],
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  got = export_formats.read_export(out, gcs.read("exports/enc"))
  want = pretrained.load(str(path))
  assert got.model.to_dict() == want.model.to_dict()
  jax.tree_util.tree_map(np.testing.assert_array_equal, (got.params, got.state),
                         (want.params, want.state))


def test_numpy_1_module_names_of_2020_files_are_accepted(resnet18, tmp_path):
  _, params, _, _, data = resnet18
  assert b"numpy._core.multiarray\n_reconstruct" in data  # What today's numpy writes.
  old = tmp_path / "old.pkl"
  old.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
  loaded = release.load_release(str(old))
  np.testing.assert_array_equal(loaded.params["encoder/~/initial_conv"]["w"],
                                params["res_net18/~/initial_conv"]["w"])


def test_a_module_byol_jax_lacks_is_an_error_not_dropped(resnet18, tmp_path):
  """A shortcut the inferred encoder has no place for would otherwise vanish silently."""
  _, params, state, _, _ = resnet18
  extra = dict(params)
  extra["res_net18/~/block_group_1/~/block_1/~/shortcut_conv"] = {"w": np.zeros((1, 1, 8, 8))}
  path = tmp_path / "extra.pkl"
  authors.dill_dump(authors.checkpoint(extra, state), path)
  with pytest.raises(ValueError, match=r"block_group_1/~/block_1/~/shortcut_conv.*no "
                                       "counterpart"):
    pretrained.load(str(path))


def their_names(tree, root):
  return {root + k[len("encoder"):]: dict(v) for k, v in tree.items()}


@pytest.mark.parametrize("model", [
    dict(encoder="resnet50", width=2.0),
    dict(encoder="resnet101", width=1.0, resnet_v2=True),
    dict(encoder="resnet34", width=1.0),
    dict(encoder="resnet34", width=1.0, first_group_projection=True),
])
def test_encoder_depth_version_and_width_are_inferred_from_shapes(model):
  m = config_lib.base_config().model
  m.update(model)
  net = networks.make_encoder_network(m)
  params, _ = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), True))
  inferred, channels = release.infer_model(their_names(params, "res_net"))
  assert channels == 1
  for key, value in {"first_group_projection": False, **model}.items():
    assert inferred[key] == value, key


# ---------------------------------------------------------------- crafted pickles


class Call:
  """Pickles as `func(*args)`; callable so that it can itself be a pickled function."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args

  def __call__(self, *args):
    raise AssertionError("only for pickling")


def crafted(payload) -> bytes:
  """`payload` inside an otherwise well-formed checkpoint dict. fix_imports=False keeps the
  Python 3 module names (protocol 2 would write e.g. __builtin__.eval otherwise)."""
  return pickle.dumps({"experiment_state": payload, "step": 1}, protocol=2, fix_imports=False)


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
  path = tmp_path / "evil.pkl"
  path.write_bytes(crafted(_payloads(marker)[refused]()))
  with pytest.raises(pickle.UnpicklingError, match=f"refused to load {refused}:.*Nothing"):
    pretrained.load(str(path))
  assert not marker.exists()


def test_create_namedtuple_naming_another_class_is_refused_though_dill_would_run_it(tmp_path):
  """dill's _create_namedtuple imports `module.name` and returns it if it is any class:
  here subprocess.Popen, which the stream then calls."""
  marker = tmp_path / "pwned"
  popen = Call(dill._dill._create_namedtuple, "Popen", (), "subprocess")
  data = crafted(Call(popen, ["touch", str(marker)]))
  dill.loads(data)["experiment_state"].wait()
  assert marker.exists()  # The payload is live under dill itself.
  marker.unlink()
  path = tmp_path / "evil.pkl"
  path.write_bytes(data)
  with pytest.raises(pickle.UnpicklingError, match="refused dill._dill._create_namedtuple of "
                                                   "'subprocess'.'Popen'.*Nothing"):
    pretrained.load(str(path))
  assert not marker.exists()


EXPERIMENT_FIELDS = release.ReleaseExperimentState._fields
ARRAY_ARGS = (np.ndarray, (0,), b"b")
ARRAY_STATE = (1, (2,), np.dtype("f4"), False, b"\0" * 8)
RECONSTRUCT = release.ALLOWED[("numpy._core.multiarray", "_reconstruct")]


@pytest.mark.parametrize("payload, message", [
    (Call(dill._dill._create_namedtuple, "_ByolExperimentState", EXPERIMENT_FIELDS, "byol.evil"),
     "_create_namedtuple of 'byol.evil'.'_ByolExperimentState'"),
    (Call(dill._dill._create_namedtuple, "Popen", ("args",), "byol.byol_experiment"),
     "_create_namedtuple of 'byol.byol_experiment'.'Popen'"),
    (Call(dill._dill._create_namedtuple, "_ByolExperimentState", ("a", "b"),
          "byol.byol_experiment"), r"fields \('a', 'b'\)"),
    (Call(dill._dill._create_namedtuple, "ScaleByLarsState", ("mu",), "byol.utils.optimizers",
          [0]), "defaults"),
    (Call(dill._dill._create_array, np.dtype, ("f4",), None, None),
     "_create_array with function dtype"),
    (Call(dill._dill._create_array, RECONSTRUCT, (np.dtype, (0,), b"b"), ARRAY_STATE, None),
     "_create_array of something other than a plain numpy.ndarray"),
    (Call(dill._dill._create_array, RECONSTRUCT, ARRAY_ARGS, ARRAY_STATE, {"x": 1}),
     "_create_array with instance attributes"),
    (Call(jax._src.array._reconstruct_array, np.dtype, ("f4",), None, {}),
     "_reconstruct_array with function dtype"),
    (Call(jax._src.array._reconstruct_array, dill._dill._create_namedtuple,
          ("ScaleByLarsState", ("mu",), "byol.utils.optimizers"), None, {}),
     "_reconstruct_array with function _namedtuple_class"),
])
def test_abuse_of_the_dill_and_jax_constructors_is_refused(payload, message, tmp_path):
  path = tmp_path / "evil.pkl"
  path.write_bytes(crafted(payload))
  with pytest.raises(pickle.UnpicklingError, match=f"refused .*{message}.*Nothing"):
    pretrained.load(str(path))


def test_constructors_with_a_refused_function_inside_run_nothing(tmp_path):
  marker = tmp_path / "pwned"
  for payload in (Call(dill._dill._create_array, os.system, (f"touch {marker}",), None, None),
                  Call(jax._src.array._reconstruct_array, os.system, (f"touch {marker}",),
                       None, {})):
    path = tmp_path / "evil.pkl"
    path.write_bytes(crafted(payload))
    with pytest.raises(pickle.UnpicklingError, match="refused to load posix.system"):
      pretrained.load(str(path))
  assert not marker.exists()


def test_pickle_of_something_else_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "list.pkl"
  path.write_bytes(pickle.dumps([np.zeros(2)], protocol=2))
  with pytest.raises(ValueError, match="not an authors' BYOL checkpoint"):
    pretrained.load(str(path))
