"""Metrics out of the host loop: metrics.jsonl (or its parts), TensorBoard scalars, a console line.

For each logged step `MetricWriter.write(step, metrics)`:
  - appends one JSON object `{"step": 100, "loss": 0.41, ...}` to the workdir's metrics and
    flushes it: to workdir/metrics.jsonl on a local disk, to numbered parts
    workdir/metrics.jsonl.d/000000.jsonl, ... on an object store (gs://), where a file cannot
    grow (files.AppendFile: each log uploads one bounded part, so its cost does not grow with
    the run). `read_metrics` reads either back as one list, the way every reader should.
    Values are JSON numbers; a NaN or infinite value is written as null (JSON has no NaN).
    After a resume from an earlier checkpoint a step can appear twice: the later line is the
    one that belongs to the continuing run.
  - writes every metric as a TensorBoard scalar under workdir (tf.summary), NaN included;
    under a URL workdir (gs://) the events file is written in TF's in-memory filesystem and
    uploaded whole after each flush, through files.py like every other file; once it holds
    EVENTS_FILE_BYTES it is closed and a new events file started, so an upload stays bounded
    too (TensorBoard reads all events files of a directory as one run);
  - prints a progress line: step/total, loss, probe top-1, collapse monitor, images/s and an
    ETA (h:mm:ss) from the rate over the last `window` logged steps.
Only process 0 writes anything; on other processes every method does nothing.
"""
import collections
import itertools
import json
import math
import os
import time
from typing import Callable, Mapping

import jax
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from byol_jax.store import files

METRICS_FILE = "metrics.jsonl"
# Under a URL workdir, an events file this large is closed and a new one started.
EVENTS_FILE_BYTES = 64 << 10

# What tensorboard's own scalar summary attaches; written through the core `tf.summary.write`
# because `tf.summary.scalar` needs the tensorboard package, which tensorflow-cpu lacks.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)

# The console shows these metrics (key -> (label, format)); the files get every metric.
# The keys are the names train.update puts in its metrics dict.
CONSOLE_FIELDS = {
    "loss": ("loss", "{:.4f}"),
    "probe_top1": ("probe top-1", "{:.2%}"),
    "collapse_std": ("collapse std", "{:.4f}"),
}


def metrics_url(workdir: str) -> str:
  """Where MetricWriter appends a workdir's metrics: metrics.jsonl, or its folder of parts."""
  path = files.join(workdir, METRICS_FILE)
  return files.parts_dir(path) if files.appends_to_parts(path) else path


def read_metrics(workdir: str) -> list[dict]:
  """Every metrics row MetricWriter wrote in `workdir` (local or gs://), in the order written:
  metrics.jsonl (a local run's, or an older run's), then its parts. [] when there are none.
  A resumed run repeats steps: a later row of a step belongs to the continuing run."""
  text = files.read_appended(files.join(workdir, METRICS_FILE))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
  """Seconds as h:mm:ss (hours unbounded), e.g. 3725 -> '1:02:05'."""
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_RAM_DIRS = itertools.count()  # One in-memory events directory per mirrored writer.


class _EventFiles:
  """tf.summary's writer for a workdir: directly for a local path; for a URL, into TF's
  in-memory `ram://` filesystem, the events file uploaded whole to the workdir on `flush`,
  and replaced by a new one (in a new ram:// folder) once it holds EVENTS_FILE_BYTES."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._ram = None
    self.writer = self._new_writer()

  def _new_writer(self):
    if files.is_local(self._workdir):
      return tf.summary.create_file_writer(self._workdir)
    self._ram = f"ram://byol_jax_events/{os.getpid()}-{next(_RAM_DIRS)}"
    return tf.summary.create_file_writer(self._ram)

  def flush(self) -> None:
    self.writer.flush()
    if self._ram is None:
      return
    names = tf.io.gfile.listdir(self._ram)
    full = any(tf.io.gfile.stat(f"{self._ram}/{name}").length >= EVENTS_FILE_BYTES
               for name in names)
    if full:
      self.writer.close()  # Uploaded below, whole, and never written again.
    for name in names:
      with tf.io.gfile.GFile(f"{self._ram}/{name}", "rb") as f:
        files.write_bytes_atomic(files.join(self._workdir, name), f.read())
    if full:
      tf.io.gfile.rmtree(self._ram)
      self.writer = self._new_writer()

  def close(self) -> None:
    self.flush()
    self.writer.close()
    if self._ram is not None:
      tf.io.gfile.rmtree(self._ram)


def _scalar(name: str, value) -> float | int:
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} has shape {array.shape}; MetricWriter takes scalars "
                     "only (reduce it, e.g. take its mean, before writing).")
  item = array.reshape(()).item()
  if isinstance(item, bool) or not isinstance(item, (int, float)):
    return float(item)
  return item


class MetricWriter:
  """Writes scalar metrics of logged steps to the metrics file, TensorBoard and the console."""

  def __init__(self, workdir: str, total_steps: int, *, images_per_step: int | None = None,
               process_index: int | None = None, window: int = 10,
               time_fn: Callable[[], float] = time.monotonic,
               print_fn: Callable[[str], None] | None = None):
    """Args:
      workdir: directory for the metrics and the TensorBoard events (created if missing).
      total_steps: steps of the whole run, for the progress fraction and the ETA.
      images_per_step: global batch size; images/s is shown when given.
      process_index: this process (default jax.process_index()); only 0 writes.
      window: logged steps over which the rate (images/s, ETA) is measured.
      time_fn: clock in seconds (injectable for tests).
      print_fn: where the progress line goes (default: print, flushed).
    """
    if total_steps < 1 or window < 2:
      raise ValueError(f"total_steps={total_steps} must be >= 1 and window={window} >= 2.")
    self.total_steps = int(total_steps)
    self.images_per_step = images_per_step
    self.active = (jax.process_index() if process_index is None else process_index) == 0
    self._time_fn = time_fn
    self._print = print_fn or (lambda line: print(line, flush=True))
    self._recent = collections.deque(maxlen=window)  # (time, step) of the last logged steps.
    self._jsonl = self._tb = None
    if self.active:
      files.makedirs(workdir)
      self._jsonl = files.AppendFile(files.join(workdir, METRICS_FILE))
      self._tb = _EventFiles(workdir)

  def write(self, step: int, metrics: Mapping[str, object]) -> str | None:
    """Records `metrics` for `step` in all three outputs.

    Args:
      step: the optimiser step the metrics belong to.
      metrics: name -> scalar (Python, NumPy or JAX; one element). 'step' is reserved.

    Returns:
      The progress line printed, or None on processes other than 0.
    """
    if not self.active:
      return None
    if "step" in metrics:
      raise ValueError("metrics must not contain the key 'step': it is written by MetricWriter.")
    step = int(step)
    values = {name: _scalar(name, value) for name, value in metrics.items()}
    json_values = {k: v if math.isfinite(v) else None for k, v in values.items()}
    self._jsonl.append(json.dumps({"step": step, **json_values}, allow_nan=False) + "\n")
    with self._tb.writer.as_default():
      for name, value in values.items():
        tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                         metadata=_SCALAR_METADATA)
    self._tb.flush()
    self._recent.append((self._time_fn(), step))
    line = self.progress_line(step, values)
    self._print(line)
    return line

  def steps_per_second(self) -> float | None:
    """Rate over the recent logged steps; None until two distinct times are known."""
    if len(self._recent) < 2:
      return None
    (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

  def progress_line(self, step: int, values: Mapping[str, float]) -> str:
    """'step 200/1000 (20.0%) | loss 0.4100 | ... | 512.0 img/s | ETA 0:01:20'."""
    parts = [f"step {step}/{self.total_steps} ({step / self.total_steps:.1%})"]
    for key, (label, fmt) in CONSOLE_FIELDS.items():
      if key in values:
        parts.append(f"{label} {fmt.format(values[key])}")
    rate = self.steps_per_second()
    if rate is not None and self.images_per_step:
      parts.append(f"{rate * self.images_per_step:.1f} img/s")
    eta = format_duration(max(0, self.total_steps - step) / rate) if rate else "-:--:--"
    parts.append(f"ETA {eta}")
    return " | ".join(parts)

  def close(self) -> None:
    """Flushes and closes the files (idempotent)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
