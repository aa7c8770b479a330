"""Multi-process pretraining through the real entry point: 2 local processes x 2 CPU devices.

Each test starts `python -m byol_jax pretrain` twice with --coordinator_address on
127.0.0.1 (gloo CPU collectives, jax's default), waits with a bounded timeout and kills
every child in a `finally`. Proven here: 2 x 2 ends with the same parameters as 1 x 4 on
the same global batches (and its checkpoint restores on 1 x 4); a SIGKILLed process takes
the other down with a non-zero status within seconds; processes whose configs differ
stop at start-up naming the field.

The launch, the bounded wait and the kill are tests/multihost.py's (shared with
test_multihost_eval.py, the evaluation commands on 2 processes).

Data: each process reads its own slice of the split (data.py), shuffled with its own
process index, so the global batch depends on the process count; it is not a function of
(seed, step) alone. The 1 x 4 reference therefore reads both processes' slices itself and
feeds their concatenation (process 0's devices first, as pmap orders them).
"""

import jax
import numpy as np

import tolerances
from multihost import kill_all as _kill_all
from multihost import kill_peer_once_started, launch
from multihost import wait_all as _wait_all
from byol_jax import parallel
from byol_jax.data import pipelines
from byol_jax.store import checkpoint
from byol_jax.jobs import loop
from byol_jax.store import run_config
from byol_jax.training import train

# test_loop's helpers: the smoke config on the data set the tests write, restoring.
from fakes import smoke_config
from workdirs import restore_final
from multihost import RECIPE
from tolerances import augment_in_float32


def _launch(data_dir, workdir, steps, per_process_args=((), ()), every=2, heartbeat=10):
  """Starts one `byol_jax pretrain` per entry of per_process_args; returns the Popens."""
  common = [f"--config={RECIPE}:smoke", f"--workdir={workdir}",
            f"--config.dataset.data_dir={data_dir}", "--config.dataset.num_train_examples=64",
            "--config.dataset.deterministic=True", f"--config.num_steps={steps}",
            f"--config.checkpoint.every_steps={every}", "--config.log.every_steps=1"]
  return launch("pretrain", [[*common, *extra] for extra in per_process_args],
                heartbeat=heartbeat)


def _merged_slices(real):
  """data.pretrain_dataset for 1 process: the concatenated batches of a 2-process run."""
  class Merged:
    def __init__(self, c, **kwargs):
      self._parts = [real(c, process_index=i, process_count=2, local_device_count=2,
                          start_step=kwargs.get("start_step", 0)) for i in range(2)]
      self.skipped_images = 0

    def __iter__(self):
      return self

    def __next__(self):
      batches = [next(p) for p in self._parts]
      return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  return Merged


def _recording(dataset_cls, seen):
  """dataset_cls, also appending (config, batch) of every batch it yields to `seen`."""
  class Recording(dataset_cls):
    def __init__(self, c, **kwargs):
      super().__init__(c, **kwargs)
      self._c = c

    def __next__(self):
      batch = super().__next__()
      seen.append((self._c, batch))
      return batch

  return Recording


def _float64_run(c, batches):
  """The loop's steps (its init and augmentation keys, these global batches) in float64 on
  1 device, with float32 augmentation draws (test_train's float64 reference)."""
  deps = train.make_deps(c)
  init_key, aug_key = jax.random.split(jax.random.PRNGKey(c.seed))
  state = train.init_state(c, deps, init_key, pipelines.num_channels(c))
  devices = jax.local_devices()[:1]
  update = train.make_pmapped_update(deps._replace(augment_fn=augment_in_float32), devices)
  with jax.enable_x64(True):
    replicated = parallel.replicate(tolerances.float64(state), devices)
    for batch in batches:  # [4, b, ...] -> [1, 4 b, ...]: the same global order.
      one = {k: np.reshape(v, (1, -1) + np.shape(v)[2:]) for k, v in batch.items()}
      replicated, _ = update(replicated, parallel.shard(one, devices), aug_key)
    out = tolerances.float64(parallel.unreplicate(replicated))
  assert not jax.config.jax_enable_x64
  return out


def test_two_processes_match_one_process_on_the_same_global_batches(data_dir, tmp_path,
                                                                    monkeypatch):
  steps = 3
  procs = _launch(data_dir, tmp_path / "2x2", steps)
  try:
    codes, outputs = _wait_all(procs, timeout=900)
  finally:
    _kill_all(procs)
  assert codes == [0, 0], "\n".join((o or "")[-3000:] for o in outputs)
  assert "pretrain done at step 3" in outputs[0]
  c = smoke_config(data_dir, num_steps=steps, **{"dataset.deterministic": True})
  seen = []
  monkeypatch.setattr(pipelines, "pretrain_dataset",
                      _recording(_merged_slices(pipelines.pretrain_dataset), seen))
  loop.pretrain(c, str(tmp_path / "1x4"), print_fn=lambda line: None)
  # The 2-process checkpoint restores here, on 1 process x 4 devices.
  step_a, multi = restore_final(tmp_path / "2x2", c)
  step_b, single = restore_final(tmp_path / "1x4", c)
  assert step_a == step_b == steps
  # Cross-process all-reduce sums in another order than the in-process one: close, not equal.
  # Against the same 3 steps in float64, the 2 x 2 run is no less accurate than the 1 x 4
  # one, leaf by leaf (tolerances.NOISE_FACTOR x its error or the noise floor; the momentum
  # traces, raw gradient sums, are where the reduction order shows most).
  want = _float64_run(seen[0][0], [batch for _, batch in seen[:steps]])
  for name in ("online_params", "target_params", "online_state", "target_state", "opt_state"):
    tolerances.assert_no_less_accurate(getattr(multi, name), getattr(single, name),
                                       getattr(want, name))
  assert int(multi.step) == steps


def test_killing_one_process_stops_the_other_with_an_error(data_dir, tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  procs = _launch(data_dir, tmp_path, steps=100_000, every=100_000, heartbeat=10)
  code, output, elapsed = kill_peer_once_started(
      procs, lambda: metrics.exists() and metrics.stat().st_size > 0, start_timeout=900)
  assert code is not None, "process 0 still ran 90 s after its peer was killed"
  assert code != 0 and elapsed < 60, (code, elapsed, (output or "")[-3000:])


def test_processes_with_different_configs_stop_naming_the_field(data_dir, tmp_path):
  procs = _launch(data_dir, tmp_path, steps=3,
                  per_process_args=((), ("--config.optim.base_lr=0.5",)))
  try:
    codes, outputs = _wait_all(procs, timeout=300)
  finally:
    _kill_all(procs)
  assert None not in codes and 0 not in codes, (codes, outputs)
  expected = "optim.base_lr: process 0 has 1.0, process 1 has 0.5"
  lines = [l for l in outputs[0].splitlines() if l.startswith("byol-jax: error:")]
  assert len(lines) == 1 and expected in lines[0], outputs[0][-3000:]
  # The check runs before anything is written.
  assert not (tmp_path / run_config.CONFIG_FILE).exists()
  assert not (tmp_path / checkpoint.CHECKPOINT_DIR).exists()


def test_config_disagreements_lists_each_field_with_every_process_value():
  configs = [{"optim": {"base_lr": 1.0, "momentum": 0.9}, "seed": 0},
             {"optim": {"base_lr": 0.5, "momentum": 0.9}, "seed": 0, "extra": 1}]
  assert loop.config_disagreements(configs) == [
      "extra: process 0 has '<absent>', process 1 has 1",
      "optim.base_lr: process 0 has 1.0, process 1 has 0.5"]
  assert loop.config_disagreements([configs[0], configs[0]]) == []
