"""pretrained.load on a pretraining workdir: the online encoder of the newest intact step,
read without writing a byte and without the training stack (a checkpoint whose other parts
no longer fit today's TrainState loads; an encoder that does not fit its config.json is
refused); corrupt steps skipped; clear errors for what is not loadable. Also the
random-encoder baseline of the evaluation commands (baselines.random_init).

The workdir is written with the real Checkpointer from a TrainState whose every leaf is
random (online and target differ), so a wrong step, tree or network half cannot pass.
"""
import hashlib
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

import fakes
from byol_jax.evaluation import baselines
from byol_jax.evaluation import linear_eval
from byol_jax.model import networks
from byol_jax.store import run_config
from byol_jax.weights import pretrained
from workdirs import tiny_config, write_workdir

ROOT = pathlib.Path(__file__).resolve().parents[2]


def snapshot(directory):
  """Every path under directory with its bytes' sha256 (dirs: None) and mtime."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      full = os.path.join(root, name)
      digest = None
      if os.path.isfile(full):
        digest = hashlib.sha256(pathlib.Path(full).read_bytes()).hexdigest()
      out[os.path.relpath(full, directory)] = (digest, os.stat(full).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  c = tiny_config()
  return root, c, write_workdir(root, c, channels=1, steps=[2, 4])


def assert_encoder_of(loaded, state):
  want_params = {k: v for k, v in state.online_params.items() if k.startswith("encoder/")}
  want_state = {k: v for k, v in state.online_state.items() if k.startswith("encoder/")}
  assert want_params and set(loaded.params) == set(want_params)
  assert set(loaded.state) == set(want_state)
  for want, got in ((want_params, loaded.params), (want_state, loaded.state)):
    for module in want:
      assert set(got[module]) == set(want[module])
      for name in want[module]:
        assert isinstance(got[module][name], np.ndarray)
        np.testing.assert_array_equal(got[module][name], want[module][name])


def test_workdir_loads_online_encoder_of_newest_step(workdir):
  root, c, saved = workdir
  loaded = pretrained.load(str(root))
  assert (loaded.step, loaded.source, loaded.channels, loaded.image_size) == (4, "workdir", 1, 28)
  assert loaded.model.to_dict() == c.model.to_dict()
  assert_encoder_of(loaded, saved[4])
  # The encoder has batch-norm statistics and no projector/predictor/classifier weights.
  assert any("mean_ema" in m for m in loaded.state)
  assert not any(k.startswith(("projector", "predictor", "classifier")) for k in loaded.params)


def test_workdir_given_as_a_relative_path_loads(workdir, monkeypatch):
  root, _, saved = workdir
  monkeypatch.chdir(root.parent)
  loaded = pretrained.load(root.name)  # As users type it: --pretrained=runs/x.
  assert loaded.step == 4
  assert_encoder_of(loaded, saved[4])


def test_loading_writes_nothing_into_the_workdir(workdir):
  root, _, _ = workdir
  before = snapshot(root)
  pretrained.load(str(root))
  assert snapshot(root) == before


def test_corrupt_newest_step_is_skipped_loudly_and_left_in_place(workdir, tmp_path, caplog):
  root, _, saved = workdir
  tmp_path = tmp_path / "copy"
  shutil.copytree(root, tmp_path)
  step_dir = tmp_path / "checkpoints" / "4"
  victim = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  before = snapshot(tmp_path)
  with caplog.at_level(logging.ERROR):
    loaded = pretrained.load(str(tmp_path))
  assert loaded.step == 2
  assert_encoder_of(loaded, saved[2])
  assert "step 4" in caplog.text and "sha256" in caplog.text
  assert snapshot(tmp_path) == before  # No quarantine directory, no config.json rewrite.


def _edit_config_json(root, **fields):
  """A copy of the workdir `root` whose config.json has `fields` ('a.b': value) changed."""
  copy = root.parent / f"{root.name}_edited"
  shutil.copytree(root, copy, dirs_exist_ok=True)
  saved = json.loads((copy / run_config.CONFIG_FILE).read_text())
  for field, value in fields.items():
    section, name = field.split(".")
    saved[section][name] = value
  (copy / run_config.CONFIG_FILE).write_text(json.dumps(saved))
  return copy


def test_loading_reads_the_encoder_alone_not_the_training_state(workdir):
  root, _, saved = workdir
  # Another class count and heads: today's TrainState template would not fit this checkpoint
  # (probe, projector and optimiser shapes differ), but the encoder is the same.
  copy = _edit_config_json(root, **{"dataset.num_classes": 3, "model.projector_hidden": 8,
                                    "model.predictor_hidden": 8})
  loaded = pretrained.load(str(copy))
  assert loaded.step == 4
  assert_encoder_of(loaded, saved[4])


def test_an_encoder_that_does_not_fit_its_config_json_is_refused(workdir):
  root, c, _ = workdir
  copy = _edit_config_json(root, **{"model.width": c.model.width * 2})
  with pytest.raises(ValueError, match=r"step 4 .* does not fit the state its config.json "
                                       r"describes:\n  online_params/encoder/~/"):
    pretrained.load(str(copy))


def test_config_json_round_trip_restores_tuples(workdir):
  root, c, _ = workdir
  again = run_config.read_config(str(root))
  assert isinstance(again.linear.learning_rates, tuple)
  assert again.to_dict() == c.to_dict()


def test_missing_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    pretrained.load(str(tmp_path / "nowhere"))


def test_directory_without_config_is_not_a_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found.*not a pretraining workdir"):
    pretrained.load(str(tmp_path))


def test_workdir_without_checkpoints_says_so(tmp_path):
  run_config.save_config(str(tmp_path), tiny_config())
  with pytest.raises(FileNotFoundError, match="no checkpoints in .*byol-jax pretrain"):
    pretrained.load(str(tmp_path))


def test_unknown_file_type_is_refused_showing_what_it_looked_like(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a checkpoint")
  with pytest.raises(ValueError, match=r"notes.txt \(16 bytes, starting 6e 6f 74 20 61 .*\) "
                                       "is neither a safetensors export nor a pickle"):
    pretrained.load(str(path))
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=r"\(0 bytes, starting empty\)"):
    pretrained.load(str(path))


def test_random_encoder_keeps_its_init_and_takes_batch_norm_statistics_from_the_data(tmp_path):
  c = tiny_config()
  c.dataset.data_dir = fakes.fashion_mnist_tfds(tmp_path)
  untouched = baselines.random_init(c, bn_batches=0)
  resolved = linear_eval.load_checked(c, baselines.RANDOM)  # What --pretrained=random gives.
  assert (resolved.source, resolved.step, resolved.image_size, resolved.channels) == (
      "random", 0, 28, 1)
  init_params, init_state = networks.make_encoder_network(c.model).init(
      jax.random.PRNGKey(c.seed + 1), np.zeros((2, 28, 28, 1), np.float32), is_training=True)
  for loaded in (untouched, resolved):  # Estimating statistics does not touch the weights.
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params,
                           jax.tree_util.tree_map(np.asarray, init_params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, untouched.state,
                         jax.tree_util.tree_map(np.asarray, init_state))
  means = lambda state: [v for path, v in jax.tree_util.tree_leaves_with_path(state)  # noqa: E731
                         if "mean" in jax.tree_util.keystr(path)]
  assert means(resolved.state) and all(np.all(np.isfinite(m)) for m in means(resolved.state))
  assert all(np.abs(m - m0).max() > 1e-3 for m, m0 in zip(means(resolved.state),
                                                         means(untouched.state)))
