"""gs:// workdirs, end to end and offline: every file lands in the bucket, none on the disk.

Cloud Storage is stood in for by fake-gcs-server (a GCS JSON API emulator) on 127.0.0.1.
The whole product stack talks to it as it would to GCS: orbax's array data through
TensorStore's gcs driver (TENSORSTORE_GCS_HTTP_URL), every other file through the client
byol_jax picks for every user (store/files.py: etils.epath on fsspec/gcsfs, which honours
STORAGE_EMULATOR_HOST). What landed is read back through the emulator's own HTTP API, not
through byol_jax.

The emulator and the environment that points the product at it: tests/fake_gcs.py.
The real entry points run as users run them (`python -m byol_jax ...` in a subprocess),
in an environment that holds the emulator's endpoints and nothing that steers the client.
The tests of this module share one emulator and one pretraining run, so they run on one
pytest-xdist worker (xdist_group; pytest.ini distributes with --dist loadgroup).
"""
import json
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import fakes
from fake_gcs import gcs  # noqa: F401  (the emulator fixture)
from fake_gcs import user_env
from byol_jax.store import checkpoint_reader
from byol_jax.weights import export
from byol_jax.weights import export_formats
from byol_jax.store import integrity
from byol_jax.store import writers
from byol_jax.training import train


pytestmark = pytest.mark.xdist_group("gcs")

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "byol_fashion_mnist.py")
# The manifest of step k appears once orbax has finished it, at the latest when the save of
# step k + EVERY starts: the run must go on long enough after that to be killed mid-way.
STEPS, EVERY = 20, 4
METRICS_PARTS = "run/metrics.jsonl.d/"


def _cli(args):
  env = user_env(JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user's run.
  return subprocess.Popen([sys.executable, "-m", "byol_jax", *args], cwd=str(ROOT), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def _config_flags(data_dir):
  return [f"--config={RECIPE}:smoke", f"--config.dataset.data_dir={data_dir}",
          "--config.dataset.num_train_examples=64", "--config.dataset.deterministic=True",
          "--config.dataset.validation_examples=16", "--config.linear.batch_size=16",
          "--config.linear.num_epochs=1.0", "--config.linear.learning_rates=(0.1,)",
          "--config.linear.mode=features"]


def _pretrain_args(data_dir, workdir):
  return ["pretrain", *_config_flags(data_dir), f"--workdir={workdir}",
          f"--config.num_steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}"]


def _no_scheme_folder_on_disk(*roots):
  """Nothing named like a URL scheme ('gs:') was created in the working directory."""
  for root in roots:
    assert not any(p.name.startswith("gs:") for p in pathlib.Path(root).rglob("*")), root


def _restored(workdir, data_dir):
  c = fakes.smoke_config(data_dir, **{"dataset.deterministic": True, "num_steps": STEPS,
                                       "checkpoint.every_steps": EVERY})
  deps = train.make_deps(c)
  template = jax.eval_shape(lambda key: train.init_state(c, deps, key, 1), jax.random.PRNGKey(0))
  step = checkpoint_reader.intact_step(workdir)
  return step, checkpoint_reader.restore_step(workdir, step, template)


@pytest.fixture(scope="module")
def gs_run(gcs, data_dir):
  """A pretraining run on gs:// killed (SIGKILL) after its first checkpoint, then rerun."""
  workdir = gcs.url("run")
  manifest = f"run/checkpoints/{EVERY}/{integrity.MANIFEST_FILE}"
  proc = _cli(_pretrain_args(data_dir, workdir))
  try:
    deadline = time.monotonic() + 400
    while manifest not in gcs.objects("run/checkpoints/") and proc.poll() is None:
      assert time.monotonic() < deadline, "no checkpoint in the bucket after 400 s"
      time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it was killed: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  killed_at = gcs.objects("run/")
  parts_killed = {n: gcs.read(n) for n in killed_at if n.startswith(METRICS_PARTS)}
  rerun = _finish(_cli(_pretrain_args(data_dir, workdir)))
  return dict(workdir=workdir, killed_at=killed_at, parts_killed=parts_killed, rerun_stdout=rerun)


def test_pretrain_on_gs_writes_everything_to_the_bucket_and_resumes_after_sigkill(
    gcs, gs_run, data_dir, tmp_path):
  assert not any(n.startswith(f"run/checkpoints/{STEPS}/") for n in gs_run["killed_at"])
  names = gcs.objects("run/")
  # (The first checkpoint, seen before the kill, is gone by now: checkpoint.keep prunes it.)
  for expected in ("run/config.json", f"run/checkpoints/{STEPS}/{integrity.MANIFEST_FILE}"):
    assert expected in names
  assert any(n.startswith("run/events.out.tfevents.") for n in names), names
  # Metrics: the killed run's part, unchanged, then the rerun's, after it.
  parts = [n for n in names if n.startswith(METRICS_PARTS)]
  assert list(gs_run["parts_killed"]) == [METRICS_PARTS + "000000.jsonl"]
  assert parts == [METRICS_PARTS + "000000.jsonl", METRICS_PARTS + "000001.jsonl"]
  assert gcs.read(parts[0]) == gs_run["parts_killed"][parts[0]]
  rows = [json.loads(line) for part in parts for line in gcs.read(part).decode().splitlines()]
  assert writers.read_metrics(gs_run["workdir"]) == rows
  steps = [row["step"] for row in rows]
  assert steps[-1] == STEPS and set(range(1, STEPS + 1)) <= set(steps)
  assert "run/metrics.jsonl" not in names
  # The resumed run's final state equals that of an uninterrupted run on the local disk.
  straight = tmp_path / "straight"
  _finish(_cli(_pretrain_args(data_dir, straight)))
  step_gs, state_gs = _restored(gs_run["workdir"], data_dir)
  step_local, state_local = _restored(str(straight), data_dir)
  assert step_gs == step_local == STEPS
  chex.assert_trees_all_equal(state_gs, state_local)
  _no_scheme_folder_on_disk(ROOT, tmp_path)


def test_linear_eval_and_export_read_and_write_gs(gcs, gs_run, data_dir, tmp_path):
  _finish(_cli(["linear-eval", *_config_flags(data_dir), f"--pretrained={gs_run['workdir']}",
                f"--workdir={gcs.url('run', 'linear')}"]))
  results = json.loads(gcs.read("run/linear/results.json"))
  assert 0.0 <= results["top1"] <= 1.0 and results["pretrained_step"] == STEPS
  out = gcs.url("exports", "encoder.safetensors")
  _finish(_cli(["export", f"--workdir={gs_run['workdir']}", f"--out={out}"]))
  assert "exports/encoder.safetensors" in gcs.objects("exports/")
  encoder = export.load_encoder(out)
  _, state = _restored(gs_run["workdir"], data_dir)
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  reference = export.Encoder(export_formats.read_export(out)._replace(
      params={k: v for k, v in jax.tree_util.tree_map(np.asarray, state.online_params).items()
              if k.startswith("encoder/")},
      state={k: v for k, v in jax.tree_util.tree_map(np.asarray, state.online_state).items()
             if k.startswith("encoder/")}))
  np.testing.assert_array_equal(encoder(images), reference(images))
  _no_scheme_folder_on_disk(ROOT, tmp_path)


def test_sweep_of_two_runs_on_gs(gcs, data_dir, tmp_path):
  sweep_file = tmp_path / "two.py"
  runs = [{"name": "a", "overrides": {"optim.base_lr": 0.1}},
          {"name": "b", "overrides": {"optim.base_lr": 0.2}}]
  sweep_file.write_text(f"def get_sweep():\n  return {runs!r}\n")
  base = [f for f in _config_flags(data_dir) if not f.startswith("--config=")]
  _finish(_cli(["sweep", str(sweep_file), f"--base={RECIPE}:smoke", f"--workdir={gcs.url('sweep')}",
                "--config.num_steps=2", *base]))
  names = gcs.objects("sweep/")
  for expected in ("sweep/results.csv", "sweep/results.md", "sweep/results.png",
                   "sweep/a/config.json", "sweep/b/linear/results.json"):
    assert expected in names, names
  rows = gcs.read("sweep/results.csv").decode().splitlines()
  assert len(rows) == 3 and all(",done," in row for row in rows[1:])
  _no_scheme_folder_on_disk(ROOT, tmp_path)


def test_a_user_process_resolves_gs_through_gcsfs_and_writes_to_the_server(gcs):  # noqa: F811
  """What a `byol-jax` process picks for gs:// with nothing set but the server's endpoints:
  the client the tests run (epath's fsspec backend, gcsfs's plain GCS client), not
  tf.io.gfile, and what it writes lands in the bucket."""
  url = gcs.url("backend", "probe.txt")
  script = (
      "import byol_jax.cli\n"  # The CLI's imports, as a user's process runs them.
      "from etils.epath import backend\n"
      "from byol_jax.store import files\n"
      f"files.write_text_atomic({url!r}, 'written by a user process')\n"
      f"path = files.as_path({url!r})\n"
      "fs = path._backend.fs(str(path))\n"
      "print(path._backend is backend.fsspec_backend, type(fs).__module__, type(fs).__name__)\n")
  env = user_env()
  assert "EPATH_USE_TF" not in env and env["STORAGE_EMULATOR_HOST"] == gcs.server_url
  done = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == ["True", "gcsfs.core", "GCSFileSystem"]
  assert gcs.read("backend/probe.txt") == b"written by a user process"


def test_an_unsupported_scheme_fails_at_start_up_without_a_local_folder(data_dir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "byol_jax", *_pretrain_args(data_dir, "ram://run")],
                        cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "ram://" in proc.stderr and "not supported" in proc.stderr
  assert list(tmp_path.iterdir()) == []
