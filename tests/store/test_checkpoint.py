"""Tests of checkpoint.py in one process: round trips, cadence, retention, refusing bad
states, integrity, config guard.

Integrity and the config guard are tested through the Checkpointer that applies them
(integrity.py's manifests, run_config.py's config.json); the rule itself is
store/test_run_config.py. Values are checked against the NumPy arrays the state was built
from (tests/store/checkpoint_states.py), on every local replica.
"""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from byol_jax.store import checkpoint
from byol_jax.store import integrity
from byol_jax import parallel
from byol_jax.store import run_config
from checkpoint_states import (assert_state_equals, host_state, largest_file, make_checkpointer,
                               replicated, restore, save_steps, small_config)


# ---------------------------------------------------------------- round trip and cadence


def test_restore_returns_saved_step_and_values_on_every_device(tmp_path):
  states = save_steps(tmp_path, [5])
  step, state = restore(tmp_path)
  assert step == 5
  assert_state_equals(state, states[5])
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding == parallel.device_sharding(jax.local_devices())
  # The restored state feeds a pmapped function like the state it replaced.
  doubled = jax.pmap(lambda s: jax.tree_util.tree_map(lambda x: x * 2, s.online_params))(state)
  np.testing.assert_array_equal(np.asarray(doubled["linear"]["w"])[3],
                                2 * states[5].online_params["linear"]["w"])


def test_empty_workdir_restores_none_and_records_config(tmp_path):
  config = small_config()
  assert restore(tmp_path, config) is None
  with open(tmp_path / run_config.CONFIG_FILE) as f:
    assert json.load(f) == json.loads(config.to_json_best_effort())


def test_saves_only_due_or_forced_steps_and_never_twice(tmp_path):
  with make_checkpointer(tmp_path, every_steps=5) as ckpt:
    results = {s: ckpt.save(s, replicated(host_state(s, s))) for s in (3, 5)}
    results["5 again"] = ckpt.save(5, replicated(host_state(5, 5)), force=True)
    results["7 forced"] = ckpt.save(7, replicated(host_state(7, 7)), force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [5, 7]
  assert results == {3: False, 5: True, "5 again": False, "7 forced": True}


@pytest.mark.parametrize("keep", [1, 2])
def test_keeps_last_k_verified_checkpoints(tmp_path, keep):
  save_steps(tmp_path, [5, 10, 15, 20], keep=keep)
  steps = sorted(int(d) for d in os.listdir(tmp_path / checkpoint.CHECKPOINT_DIR))
  assert steps == [5, 10, 15, 20][-keep:]
  for step in steps:
    assert integrity.verify_manifest(str(tmp_path / checkpoint.CHECKPOINT_DIR / str(step))) is None


def test_retention_keeps_newest_verified_until_a_newer_one_is_verified():
  steps = [5, 10, 15, 20]
  # 15 and 20 not manifested yet (save in flight): 10 stays however small keep is.
  assert checkpoint.KeepLatestVerified(1, lambda s: s <= 10).preserved(steps) == {10, 20}
  assert checkpoint.KeepLatestVerified(2, lambda s: s <= 10).preserved(steps) == {10, 15, 20}
  assert checkpoint.KeepLatestVerified(2, lambda s: True).preserved(steps) == {15, 20}
  assert checkpoint.KeepLatestVerified(1, lambda s: False).preserved(steps) == {20}
  infos = [type("Info", (), {"step": s})() for s in steps]  # What orbax passes.
  policy = checkpoint.KeepLatestVerified(1, lambda s: s <= 10)
  assert policy.should_preserve(infos, context=None) == [False, True, False, True]


def test_caller_may_delete_state_buffers_once_save_returns(tmp_path):
  """The loop donates the state to the next update right after save()."""
  expected = host_state(1, 5)
  with make_checkpointer(tmp_path) as ckpt:
    state = parallel.replicate(expected)  # The initial state's layout, before any update.
    assert ckpt.save(5, state)
    for leaf in jax.tree_util.tree_leaves(state):
      leaf.delete()
  step, restored = restore(tmp_path)
  assert step == 5
  assert_state_equals(restored, expected)


# ---------------------------------------------------------------- refusing bad states


@pytest.mark.parametrize("where", ["online_params", "opt_state"])
def test_refuses_to_save_non_finite_state(tmp_path, where):
  state = host_state(1, 5)
  if where == "online_params":
    state.online_params["linear"]["w"][1, 0] = np.nan
    bad_leaf = "['w']"
  else:
    state.opt_state[1].trace["linear"]["b"][0] = np.inf
    bad_leaf = "trace['linear']['b']"
  with make_checkpointer(tmp_path) as ckpt:
    with pytest.raises(FloatingPointError, match=r"NaN/Inf in .*" + bad_leaf.replace("[", r"\[")):
      ckpt.save(5, replicated(state))
    assert ckpt.all_steps() == []
  assert os.listdir(tmp_path / checkpoint.CHECKPOINT_DIR) == []


def test_refuses_step_that_differs_from_state_step(tmp_path):
  with make_checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="state.step=4"):
      ckpt.save(5, replicated(host_state(1, 4)))


def test_refuses_unreplicated_state(tmp_path):
  with make_checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="replicated by pmap"):
      ckpt.save(5, jax.tree_util.tree_map(np.asarray, host_state(1, 5)))


@pytest.mark.parametrize("change, line", [
    ("shape", "online_params/linear/w: checkpoint float32[3, 2], current state float32[4, 2]"),
    ("dtype", "online_params/linear/b: checkpoint float32[2], current state bfloat16[2]"),
    ("extra", "online_state/bn/extra: checkpoint absent, current state float32[1]"),
])
def test_intact_checkpoint_that_does_not_fit_template_names_the_leaf(tmp_path, change, line):
  save_steps(tmp_path, [5])
  template = host_state(0, 0)
  if change == "shape":
    template.online_params["linear"]["w"] = np.zeros((4, 2), np.float32)
  elif change == "dtype":
    template.online_params["linear"]["b"] = np.zeros(2, jax.numpy.bfloat16)
  else:
    template.online_state["bn"]["extra"] = np.zeros(1, np.float32)
  with make_checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="step 5 .* intact but does not fit") as err:
      ckpt.restore_or_none(replicated(template), small_config())
  assert line in str(err.value) and "another --workdir" in str(err.value)


# ---------------------------------------------------------------- integrity


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1)


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, integrity.MANIFEST_FILE))


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"),
    ("truncate", "bytes, the manifest says"),
    ("no_manifest", "no byol_jax_manifest.json"),
])
def test_damaged_newest_checkpoint_falls_back_loudly(tmp_path, caplog, damage, message):
  states = save_steps(tmp_path, [5, 10])
  step_dir = str(tmp_path / checkpoint.CHECKPOINT_DIR / "10")
  victim = largest_file(step_dir)
  {"flip": _flip_byte, "truncate": _truncate,
   "no_manifest": lambda _: _delete_manifest(step_dir)}[damage](victim)
  step, state = restore(tmp_path)
  assert step == 5
  assert_state_equals(state, states[5])
  errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
  assert any("step 10" in e and message in e for e in errors), errors
  if damage != "no_manifest":
    assert any(os.path.relpath(victim, step_dir) in e for e in errors), errors
  # Moved aside, not deleted; step 10 can be written again.
  assert os.listdir(tmp_path / checkpoint.QUARANTINE_DIR) == ["10"]
  with make_checkpointer(tmp_path) as ckpt:
    assert ckpt.save(10, replicated(states[10]))
  assert restore(tmp_path)[0] == 10


def test_no_intact_checkpoint_raises_naming_each_step(tmp_path):
  save_steps(tmp_path, [5, 10])
  for step in (5, 10):
    _flip_byte(largest_file(str(tmp_path / checkpoint.CHECKPOINT_DIR / str(step))))
  with pytest.raises(RuntimeError, match=r"no intact checkpoint(.|\n)*step 10:(.|\n)*step 5:"):
    restore(tmp_path)
  assert not os.path.exists(tmp_path / checkpoint.QUARANTINE_DIR)


def test_manifest_lists_every_file_of_the_step(tmp_path):
  save_steps(tmp_path, [5])
  step_dir = tmp_path / checkpoint.CHECKPOINT_DIR / "5"
  with open(step_dir / integrity.MANIFEST_FILE) as f:
    listed = json.load(f)["files"]
  on_disk = {os.path.relpath(os.path.join(r, f), step_dir)
             for r, _, fs in os.walk(step_dir) for f in fs} - {integrity.MANIFEST_FILE}
  assert set(listed) == on_disk and len(on_disk) > 3
  for rel, entry in listed.items():
    assert entry["sha256"] == hashlib.sha256((step_dir / rel).read_bytes()).hexdigest()
  (step_dir / "stray").write_text("x")
  assert "stray is not in the manifest" in integrity.verify_manifest(str(step_dir))


# ---------------------------------------------------------------- config guard


def test_config_change_in_state_defining_fields_is_refused_and_writes_nothing(tmp_path):
  save_steps(tmp_path, [5])
  assert restore(tmp_path, small_config())[0] == 5
  config_file = tmp_path / run_config.CONFIG_FILE
  before = config_file.read_bytes()
  changed = small_config()
  changed.model.width = 2.0
  changed.precision = "bfloat16"
  changed.optim.lars_order = "lr_first"
  with pytest.raises(ValueError) as err:
    restore(tmp_path, changed)
  message = str(err.value)
  for line in ("model.width: saved 1.0, now 2.0", "precision: saved 'float32', now 'bfloat16'",
               "optim.lars_order: saved 'momentum_first', now 'lr_first'", "another --workdir"):
    assert line in message
  assert config_file.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == [checkpoint.CHECKPOINT_DIR, run_config.CONFIG_FILE]


def test_harmless_config_changes_resume_and_are_recorded(tmp_path):
  save_steps(tmp_path, [5])
  assert restore(tmp_path, small_config())[0] == 5
  changed = small_config()
  changed.num_steps = 1234
  changed.log.every_steps = 7
  changed.checkpoint.every_steps = 50
  changed.dataset.data_dir = "/elsewhere"
  changed.optim.base_lr = 0.1
  assert restore(tmp_path, changed)[0] == 5
  with open(tmp_path / run_config.CONFIG_FILE) as f:
    assert json.load(f) == json.loads(changed.to_json_best_effort())
