"""The pretraining loop: restore or init, step, log, checkpoint, evaluate, stop cleanly.

The host side of training. It owns all I/O and all state that is not a JAX array; the
maths is `train.update`. Metrics of step k are read while step k+1 runs, so the host
never waits on the device except to log, evaluate or checkpoint.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from byol_jax import config as config_lib
from byol_jax import parallel
from byol_jax.data import pipelines
from byol_jax.data import sources
from byol_jax.evaluation import evaluate
from byol_jax.jobs import health
from byol_jax.store import checkpoint
from byol_jax.store import files
from byol_jax.store import run_config
from byol_jax.store import writers
from byol_jax.training import train


class StopSignal:
  """Turns SIGTERM (how TPU VMs are preempted) into a flag the loop polls each step."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


PROFILE_DIR = "profile"  # Under the workdir; TensorBoard's profile plugin reads it.


class Profiler:
  """A jax.profiler trace of the steps `first`..`last` (inclusive) into workdir/profile/.

  jax.profiler writes local files only, so the trace is written to a local temporary
  directory and copied into the workdir (any URL files.py supports) when it stops. A run
  resumed past `first` starts the trace at its first step still within the window.
  """

  def __init__(self, workdir: str, steps):
    self.workdir = workdir
    self.first, self.last = tuple(steps) if steps else (0, -1)  # Empty: never traces.
    self._local, self._started, self._done = None, 0, False

  def __enter__(self):
    return self

  def before(self, step: int) -> None:
    """Starts the trace when `step` (the step about to run) is in the window."""
    if not self._done and self._local is None and self.first <= step <= self.last:
      self._local, self._started = tempfile.mkdtemp(prefix="byol_jax_profile_"), step
      jax.profiler.start_trace(self._local)

  def after(self, step: int, outputs: Any) -> None:
    """Stops the trace once step `last` (just dispatched) has finished on the device."""
    if self._local is not None and step >= self.last:
      jax.block_until_ready(outputs)  # Steps run asynchronously: wait for their device work.
      self._stop(step)

  def _stop(self, step: int) -> None:
    jax.profiler.stop_trace()
    local, self._local, self._done = self._local, None, True
    for root, _, names in os.walk(local):
      for name in names:
        relative = os.path.relpath(os.path.join(root, name), local).split(os.sep)
        with open(os.path.join(root, name), "rb") as f:
          files.write_bytes_atomic(files.join(self.workdir, PROFILE_DIR, *relative), f.read())
    shutil.rmtree(local, ignore_errors=True)
    logging.info("profile of steps %d-%d written to %s", self._started, step,
                 files.join(self.workdir, PROFILE_DIR))

  def __exit__(self, *exc):
    if self._local is not None:  # The run stopped inside the window: keep what was traced.
      self._stop(self.last)


def _host_metrics(metrics: Any) -> dict:
  return {k: float(np.asarray(v)[0]) for k, v in jax.device_get(metrics).items()}


def _gather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order (a collective: call on all processes)."""
  sizes = multihost_utils.process_allgather(np.array([len(payload)], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(payload)] = np.frombuffer(payload, np.uint8)
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [bytes(row[:n]) for row, n in zip(rows, sizes)]


def config_disagreements(configs: list[dict]) -> list[str]:
  """Fields whose value differs between processes' configs (nested dicts, process order).

  Returns:
    Lines "optim.base_lr: process 0 has 1.0, process 1 has 0.5", sorted by field.
  """
  flat = [run_config.flatten(c) for c in configs]
  fields = sorted(set().union(*flat))
  lines = []
  for field in fields:
    values = [f.get(field, "<absent>") for f in flat]
    if any(v != values[0] for v in values):
      lines.append(f"{field}: " + ", ".join(f"process {i} has {v!r}" for i, v in enumerate(values)))
  return lines


def _agree_on_config(c: ml_collections.ConfigDict) -> None:
  """Stops every process, before anything is written, when their configs differ."""
  if jax.process_count() == 1:
    return
  mine = json.dumps(run_config.config_to_dict(c), sort_keys=True).encode()
  everyone = _gather_bytes(mine)
  if any(other != everyone[0] for other in everyone):
    lines = config_disagreements([json.loads(b) for b in everyone])
    raise ValueError(
        "processes disagree on the config: " + "; ".join(lines[:5]) +
        (" ..." if len(lines) > 5 else "") + ". Every process must run the same command "
        "(same recipe and --config.* overrides).")


def _agree_on_start(start_step: int) -> None:
  """Stops every process when they restored different steps (e.g. unshared workdirs)."""
  if jax.process_count() == 1:
    return
  steps = multihost_utils.process_allgather(np.array([start_step], np.int64)).reshape(-1)
  if len(set(steps.tolist())) > 1:
    raise ValueError(
        "processes disagree on the step to resume from: " +
        ", ".join(f"process {i} at step {s}" for i, s in enumerate(steps.tolist())) +
        ". Every process must see the same --workdir (a shared file system).")


def _evaluate(c, eval_fn, state) -> dict:
  batches = pipelines.device_prefetch(pipelines.eval_dataset(
      c, process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count()))
  with contextlib.closing(batches):
    return evaluate.probe_accuracy(eval_fn, state.online_params, state.online_state, batches)


def _knn(c, knn_fn, state) -> dict:
  """kNN monitor (knn.*) on the online encoder: train split as the bank, eval split queried."""
  return evaluate.knn_monitor(c, knn_fn, state.online_params, state.online_state)


def _checked_config(c: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`c` validated, its data set resolved, and the same on every process; nothing written.

  Returns:
    `c` with dataset.num_train_examples and num_classes at 0 taken from the data.
  """
  config_lib.validate(c)
  files.check_url(workdir)  # An unsupported scheme stops here, before anything is written.
  parallel.per_device_batch(c.batch_size)  # Config alone: before reading the data set.
  # Sizes and classes from the data, every split checked, before anything is written: the
  # resolved numbers drive the schedules, go to config.json and meet the resume guard.
  c = sources.resolve_dataset(c, reads=("eval", "knn") if c.knn.every_steps else ("eval",))
  _agree_on_config(c)  # Before any work, and before the Checkpointer writes config.json.
  return c


def _restore_or_init(c, deps: train.Deps, init_key: jax.Array,
                     ckpt: checkpoint.Checkpointer) -> tuple[int, Any]:
  """(step, replicated state): the newest intact checkpoint's, else (0, a fresh state)."""
  state = parallel.replicate(train.init_state(c, deps, init_key, pipelines.num_channels(c)))
  restored = ckpt.restore_or_none(state, c)
  if restored is None:
    return 0, state
  logging.info("resumed from step %d of %s", restored[0], ckpt.workdir)
  return restored


@contextlib.contextmanager
def _closed_on_every_path(ckpt: checkpoint.Checkpointer):
  """Yields `ckpt`, then finishes its pending save and closes it however the block ends.

  But for an error that may have happened on this process only (any but the guards',
  which every process raises at the same step) when there are several processes: closing
  would wait at a barrier for peers that are blocked in the step's collectives and never
  arrive. The process must exit instead, and the coordination service then stops the peers
  (the CLI's --heartbeat_timeout bounds how long that takes).
  """
  try:
    yield ckpt
  except (health.NonFiniteError, health.CollapseError):
    ckpt.close()  # Every process raises these at the same step: metrics are global means.
    raise
  except BaseException:
    if jax.process_count() == 1:
      ckpt.close()
    else:
      logging.error("process %d failed; exiting without waiting for the other processes.",
                    jax.process_index())
    raise
  ckpt.close()


def _training_batches(c, start_step: int):
  """This process's pretraining batches from `start_step` on, prefetched to its devices."""
  return pipelines.device_prefetch(pipelines.pretrain_dataset(
      c, process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count(), start_step=start_step))


@dataclasses.dataclass(frozen=True)
class _Job:
  """What the step loop reads: the config, the step and evaluation programs, the resources."""
  c: ml_collections.ConfigDict
  total: int
  update: Callable
  eval_fn: Callable
  knn_fn: Callable | None  # None: no kNN monitor (knn.every_steps=0).
  aug_key: jax.Array
  ckpt: checkpoint.Checkpointer
  writer: writers.MetricWriter
  batches: Any  # From _training_batches.
  guards: health.Guards


def _job(c, deps: train.Deps, aug_key: jax.Array, ckpt: checkpoint.Checkpointer,
         batches: Any, writer: writers.MetricWriter) -> _Job:
  """The run's programs (compiled at their first call) and fresh guards, with its resources."""
  knn_fn = (evaluate.make_pmapped_features(deps.forward, "representation")
            if c.knn.every_steps else None)
  guards = health.Guards(c.monitor.max_nonfinite_steps, c.monitor.collapse_threshold,
                         c.monitor.collapse_patience, c.monitor.stop_on_collapse)
  return _Job(c, config_lib.total_steps(c), train.make_pmapped_update(deps),
              evaluate.make_pmapped_probe_eval(deps.forward), knn_fn, aug_key, ckpt, writer,
              batches, guards)


def _consume(job: _Job, step: int, device_metrics: Any) -> dict:
  """Step `step`'s metrics on the host: the guards see them, logged steps are written.

  Returns:
    The step's metrics (without the monitors on steps that did not compute them).
  """
  values = _host_metrics(device_metrics)
  logged = train.is_monitored_step(step, job.c.log.every_steps, job.total)
  if not logged:
    for key in train.MONITOR_KEYS:  # Not computed on this step (NaN placeholders).
      del values[key]
  job.guards.check(step, values, job.c.model.projector_out)
  if logged:
    values.update(skipped_images=job.batches.skipped_images,
                  nonfinite_total=job.guards.total_nonfinite)
    job.writer.write(step, values)
  return values


def _periodic_evaluations(job: _Job, step: int, state: Any) -> None:
  """The probe (eval.every_steps) and kNN (knn.every_steps) monitors when due, before the end."""
  c = job.c
  if c.eval.every_steps and step % c.eval.every_steps == 0 and step < job.total:
    job.writer.write(step, _evaluate(c, job.eval_fn, state))
  if job.knn_fn is not None and step % c.knn.every_steps == 0 and step < job.total:
    job.writer.write(step, _knn(c, job.knn_fn, state))


def _run_steps(job: _Job, state: Any, step: int, stop: threading.Event,
               profiler: Profiler) -> tuple[Any, int, dict]:
  """Trains from `step` until the last step or `stop`; saves every step that is due.

  Returns:
    (state, step reached, metrics of the last step).
  """
  last, pending = {}, None  # pending: (step, device metrics) not yet read on the host.
  while step < job.total and not stop.is_set():
    profiler.before(step + 1)
    state, metrics = job.update(state, next(job.batches), job.aug_key)
    step += 1
    profiler.after(step, state)
    if pending is not None:
      last = _consume(job, *pending)
    pending = (step, metrics)
    if step % job.c.checkpoint.every_steps == 0:
      last, pending = _consume(job, *pending), None  # Guards see this step before its save.
    # Called every step: it saves when due, and writes the previous save's manifest as
    # soon as orbax has finished it.
    job.ckpt.save(step, state)
    _periodic_evaluations(job, step, state)
  if pending is not None:
    last = _consume(job, *pending)
  return state, step, last


def _final_evaluation(job: _Job, step: int, state: Any) -> dict:
  """Evaluates the finished run (probe, and kNN when configured) and writes it at `step`.

  Returns:
    The evaluation's metrics.
  """
  final_eval = _evaluate(job.c, job.eval_fn, state)
  if job.knn_fn is not None:
    final_eval.update(_knn(job.c, job.knn_fn, state))
  job.writer.write(step, final_eval)
  return final_eval


def pretrain(c: ml_collections.ConfigDict, workdir: str,
             print_fn: Callable[[str], None] | None = None) -> dict:
  """Runs (or resumes) pretraining of config `c` in `workdir` to config_lib.total_steps(c).

  Args:
    c: a validated config; dataset.num_train_examples and num_classes at 0 are taken
      from the data (sources.resolve_dataset).
    workdir: checkpoints, config.json, metrics.jsonl and TensorBoard events go here.
    print_fn: console output (default print).

  Returns:
    The last logged metrics plus the final evaluation, and 'step' and 'preempted'.

  Raises:
    health.NonFiniteError, health.CollapseError: see health.Guards. ValueError: bad config or
      workdir.
  """
  c = _checked_config(c, workdir)
  total = config_lib.total_steps(c)
  deps = train.make_deps(c)
  init_key, aug_key = jax.random.split(jax.random.PRNGKey(c.seed))
  ckpt = checkpoint.Checkpointer.from_config(workdir, c)
  # Left open when restoring fails: closing prunes, and the steps found are not this run's.
  start, state = _restore_or_init(c, deps, init_key, ckpt)
  _agree_on_start(start)
  # Every resource is closed however the run ends (error, SIGTERM, guard); the checkpoint
  # and the input first, so the final evaluation starts once the last save is on disk.
  with writers.MetricWriter(workdir, total, images_per_step=c.batch_size,
                            print_fn=print_fn) as writer:
    with (_closed_on_every_path(ckpt),
          contextlib.closing(_training_batches(c, start)) as batches,
          StopSignal() as stop, Profiler(workdir, c.profile.steps) as profiler):
      job = _job(c, deps, aug_key, ckpt, batches, writer)
      state, step, last = _run_steps(job, state, start, stop.event, profiler)
      ckpt.save(step, state, force=True)
    result = dict(last, step=step, preempted=step < total)
    if not result["preempted"]:
      result.update(_final_evaluation(job, step, state))
  return result
