"""The pretraining job end to end: the real entry point on a small Fashion-MNIST-format
data set the tests write, resume, exact resume after SIGKILL, SIGTERM, guards, CLI errors."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from fakes import smoke_config
from byol_jax import parallel
from byol_jax.data import pipelines
from byol_jax.jobs import health
from byol_jax.jobs import loop
from byol_jax.store import checkpoint
from byol_jax.store import integrity
from byol_jax.store import writers
from byol_jax.training import train
from workdirs import restore_final

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "byol_fashion_mnist.py")


def read_metrics(workdir):
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  return [json.loads(l) for l in lines]


def test_unreplicate_reads_the_first_devices_copy_with_no_cross_device_program():
  # x[0] on a pmap-sharded array runs an all-reduce over every device; a run of those on
  # a 2-core host aborted a test worker in restore_final (XLA's 40 s rendezvous timeout).
  tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.int32(7)}
  rows = {"x": np.arange(2 * jax.local_device_count(), dtype=np.float32).reshape(-1, 2)}
  got = parallel.unreplicate(parallel.replicate(tree))
  first_row = parallel.unreplicate(parallel.shard(rows))
  for leaf, want in [(got["w"], tree["w"]), (got["step"], tree["step"]),
                     (first_row["x"], rows["x"][0])]:
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(leaf, want)


def test_pretrain_logs_checkpoints_evaluates_and_resumes(data_dir, tmp_path):
  c = smoke_config(data_dir, **{"knn.every_steps": 2, "knn.k": 5})
  result = loop.pretrain(c, str(tmp_path), print_fn=lambda line: None)
  assert result["step"] == 4 and not result["preempted"]
  assert 0.0 <= result["eval_top1"] <= 1.0 and result["eval_examples"] == 12
  # The kNN monitor ran every 2 steps: the whole train split as its bank, test queried.
  knn = [m for m in read_metrics(tmp_path) if "knn_top1" in m]
  assert [m["step"] for m in knn] == [2, 4] and result["knn_top1"] == knn[-1]["knn_top1"]
  assert all((m["knn_train_examples"], m["knn_eval_examples"]) == (64, 12) for m in knn)
  steps = [m["step"] for m in read_metrics(tmp_path) if "loss" in m]
  assert steps == [1, 2, 3, 4]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
  assert (tmp_path / "checkpoints" / "4" / integrity.MANIFEST_FILE).exists()
  # Rerunning with a longer run resumes at step 4 instead of starting again.
  longer = smoke_config(data_dir, num_steps=6)
  again = loop.pretrain(longer, str(tmp_path), print_fn=lambda line: None)
  assert again["step"] == 6
  steps = [m["step"] for m in read_metrics(tmp_path) if "loss" in m]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_resuming_with_another_architecture_is_refused(data_dir, tmp_path):
  loop.pretrain(smoke_config(data_dir, num_steps=2), str(tmp_path), print_fn=lambda line: None)
  with pytest.raises(ValueError, match="model.width"):
    loop.pretrain(smoke_config(data_dir, num_steps=2, **{"model.width": 0.25}), str(tmp_path))


def _cli(args, env_extra=None, **kwargs):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **(env_extra or {}))
  return subprocess.Popen([sys.executable, "-m", "byol_jax", *args], cwd=str(ROOT), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _pretrain_args(data_dir, workdir, steps, every):
  return ["pretrain", f"--config={RECIPE}:smoke", f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}", "--config.dataset.num_train_examples=64",
          "--config.dataset.deterministic=True", f"--config.num_steps={steps}",
          f"--config.checkpoint.every_steps={every}", "--config.log.every_steps=1"]


def _wait_for(predicate, proc, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


def test_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(data_dir, tmp_path):
  steps, every = 40, 10
  killed = tmp_path / "killed"
  manifest = killed / "checkpoints" / str(every) / integrity.MANIFEST_FILE
  proc = _cli(_pretrain_args(data_dir, killed, steps, every))
  try:
    assert _wait_for(manifest.exists, proc, timeout=300), proc.communicate()[1][-3000:]
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert not (killed / "checkpoints" / str(steps)).exists()
  rerun = _cli(_pretrain_args(data_dir, killed, steps, every))
  out, err = rerun.communicate(timeout=400)
  assert rerun.returncode == 0, err[-3000:]
  straight = tmp_path / "straight"
  uninterrupted = _cli(_pretrain_args(data_dir, straight, steps, every))
  out, err = uninterrupted.communicate(timeout=400)
  assert uninterrupted.returncode == 0, err[-3000:]
  c = smoke_config(data_dir, num_steps=steps, **{"dataset.deterministic": True,
                                                  "checkpoint.every_steps": every})
  step_a, state_a = restore_final(killed, c)
  step_b, state_b = restore_final(straight, c)
  assert step_a == step_b == steps
  chex.assert_trees_all_equal(state_a.online_params, state_b.online_params)
  chex.assert_trees_all_equal(state_a.target_params, state_b.target_params)
  chex.assert_trees_all_equal(state_a, state_b)


def test_sigterm_saves_a_checkpoint_and_exits_zero(data_dir, tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  proc = _cli(_pretrain_args(data_dir, tmp_path, 400, 1000))
  try:
    assert _wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, proc, 300), \
        proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert time.monotonic() - start < 120
  assert "preempted" in out
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 400
  assert (tmp_path / "checkpoints" / str(saved[0]) / integrity.MANIFEST_FILE).exists()


def _guards(**kw):
  args = dict(max_nonfinite=3, collapse_threshold=0.05, collapse_patience=2, stop_on_collapse=False)
  args.update(kw)
  return health.Guards(**args)


def test_guard_stops_after_k_consecutive_non_finite_steps_naming_the_step():
  g = _guards()
  healthy = dict(nonfinite=0.0, collapse_std=0.1)
  bad = dict(nonfinite=1.0, collapse_std=float("nan"))
  for step, m in enumerate([bad, bad, healthy, bad, bad], start=1):
    g.check(step, m, dim=16)  # Never three in a row: no error.
  with pytest.raises(health.NonFiniteError, match="ending at step 6"):
    g.check(6, bad, dim=16)
  assert g.total_nonfinite == 5


def test_collapse_alarm_warns_or_stops_after_patience():
  collapsed = dict(nonfinite=0.0, collapse_std=1e-5)
  g = _guards()
  g.check(1, collapsed, 16)
  g.check(2, collapsed, 16)
  assert g.warned
  stopping = _guards(stop_on_collapse=True)
  stopping.check(1, collapsed, 16)
  with pytest.raises(health.CollapseError, match="step 2"):
    stopping.check(2, collapsed, 16)


@pytest.mark.parametrize("args,message", [
    (["--config.model.no_such_field=1"], "no_such_field"),
    (["--config.model.encoder=resnet7"], "resnet7"),
    (["--config.batch_size=6"], "batch_size=6"),
])
def test_cli_rejects_bad_config_with_one_line_naming_it(tmp_path, args, message):
  proc = _cli(["pretrain", f"--config={RECIPE}:smoke", f"--workdir={tmp_path}", *args],
              env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  lines = [l for l in err.strip().splitlines() if l.startswith("byol-jax: error")]
  assert len(lines) == 1 and message in lines[0], err[-2000:]


class _FailingUpdate:
  """Stands in for the compiled step: healthy metrics, then an error at step `fail_at`."""

  def __init__(self, fail_at):
    self.fail_at, self.step = fail_at, 0

  def __call__(self, state, batch, rng):
    self.step += 1
    if self.step == self.fail_at:
      raise RuntimeError(f"device lost at step {self.step}")
    per_device = lambda value: np.full(jax.local_device_count(), value, np.float32)
    metrics = {key: per_device(0.5) for key in ("loss", *train.MONITOR_KEYS)}
    return state, dict(metrics, nonfinite=per_device(0.0))


def _record_closes(monkeypatch, classes):
  """The names of `classes` whose instances had `close` called, one entry a call."""
  closed = []
  for cls in classes:
    def close(self, real=cls.close, name=cls.__name__):
      closed.append(name)
      real(self)
    monkeypatch.setattr(cls, "close", close)
  return closed


def test_an_error_mid_run_still_closes_the_writer_input_and_checkpoint(data_dir, tmp_path,
                                                                       monkeypatch):
  closed = _record_closes(monkeypatch, (writers.MetricWriter, pipelines.InputIterator,
                                        checkpoint.Checkpointer))
  monkeypatch.setattr(train, "make_pmapped_update", lambda deps: _FailingUpdate(fail_at=3))
  c = smoke_config(data_dir, **{"checkpoint.every_steps": 1000})  # No save: state.step stays 0.
  with pytest.raises(RuntimeError, match="device lost at step 3"):
    loop.pretrain(c, str(tmp_path), print_fn=lambda line: None)
  assert sorted(closed) == ["Checkpointer", "InputIterator", "MetricWriter"]
  # Step 1 was read while step 2 ran; step 2's metrics were still pending at the error.
  assert [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_missing_data_set_says_how_to_prepare_it(tmp_path):
  c = smoke_config(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="prepare-data fashion_mnist"):
    loop.pretrain(c, str(tmp_path / "run"))


# ---------------------------------------------------------------- non-finite batches


class _NanInjector:
  """Wraps a pretraining iterator: float32 views in [0, 1], all-NaN view1 at chosen steps.

  The update takes float views as well as uint8 ones; NaN cannot be a uint8, so every
  batch is float32 (one compiled update for the good and the bad batches).
  """

  def __init__(self, source, start_step, nan_steps):
    self._source, self._step, self._nan_steps = source, start_step, set(nan_steps)

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._source))
    self._step += 1  # The batch of optimiser step self._step.
    for view in ("view1", "view2"):
      batch[view] = batch[view].astype(np.float32) / 255.0
    if self._step in self._nan_steps:
      batch["view1"] = np.full_like(batch["view1"], np.nan)
    return batch

  @property
  def skipped_images(self):
    return self._source.skipped_images

  def close(self):
    self._source.close()


def _inject_nans(monkeypatch, nan_steps):
  real = pipelines.pretrain_dataset

  def pretrain_dataset(c, **kwargs):
    return _NanInjector(real(c, **kwargs), kwargs.get("start_step", 0), nan_steps)

  monkeypatch.setattr(pipelines, "pretrain_dataset", pretrain_dataset)


def _restore_step(workdir, c, step, scratch):
  """The checkpoint of `step` (a copy of workdir without the newer steps, restored)."""
  copy = pathlib.Path(scratch, f"upto_{step}")
  shutil.copytree(workdir, copy)
  for d in (copy / "checkpoints").iterdir():
    if d.name.isdigit() and int(d.name) > step:
      shutil.rmtree(d)
  got, state = restore_final(copy, c)
  assert got == step
  return state


_NAN_RUN = {"num_steps": 6, "dataset.deterministic": True, "log.every_steps": 1}


def test_nan_batch_is_skipped_logged_and_never_checkpointed(data_dir, tmp_path, monkeypatch):
  _inject_nans(monkeypatch, {3})
  c = smoke_config(data_dir, **_NAN_RUN, **{"checkpoint.every_steps": 1, "checkpoint.keep": 10})
  workdir = tmp_path / "run"
  result = loop.pretrain(c, str(workdir), print_fn=lambda line: None)
  assert result["step"] == 6 and result["nonfinite_total"] == 1
  logged = {m["step"]: m for m in read_metrics(workdir) if "loss" in m}
  assert [logged[k]["nonfinite"] for k in range(1, 7)] == [0, 0, 1, 0, 0, 0]
  assert [logged[k]["nonfinite_total"] for k in range(1, 7)] == [0, 0, 1, 1, 1, 1]
  states = {k: _restore_step(workdir, c, k, tmp_path) for k in (2, 3, 4)}
  for state in states.values():
    assert integrity.nonfinite_leaves(state) == []
  # Step 3 consumed its batch (the counter moves on) but changed nothing else: the state
  # is the state of step 2, bit for bit, as if that batch had never been drawn.
  assert int(states[3].step) == 3
  chex.assert_trees_all_equal(states[3]._replace(step=states[2].step), states[2])
  # Training went on from there: step 4 updated the parameters again.
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(states[4].online_params, states[3].online_params)


def test_k_nan_steps_in_a_row_stop_the_job_with_a_finite_checkpoint(data_dir, tmp_path, monkeypatch):
  _inject_nans(monkeypatch, {3, 4})
  c = smoke_config(data_dir, **_NAN_RUN, **{"checkpoint.every_steps": 2,
                                           "monitor.max_nonfinite_steps": 2})
  with pytest.raises(health.NonFiniteError, match="2 consecutive non-finite steps ending at step 4"):
    loop.pretrain(c, str(tmp_path), print_fn=lambda line: None)
  # Step 4's guard fired before its save: the newest checkpoint is step 2, intact and finite.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]
  step, state = restore_final(tmp_path, c)
  assert step == 2 and integrity.nonfinite_leaves(state) == []
  logged = [m for m in read_metrics(tmp_path) if "loss" in m]
  assert logged[-1]["step"] == 3 and logged[-1]["nonfinite_total"] == 1
