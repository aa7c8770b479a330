"""Tests of writers.py: metrics.jsonl and TensorBoard read back, the progress line and ETA
under an injected clock, and silence on processes other than 0."""
import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from byol_jax.store import writers


class FakeClock:
  """Returns the given times in order, one per call."""

  def __init__(self, times):
    self._times = list(times)

  def __call__(self):
    return self._times.pop(0)


def make_writer(workdir, times=(0.0, 1.0, 2.0, 3.0), **kwargs):
  lines = []
  kwargs.setdefault("total_steps", 1000)
  writer = writers.MetricWriter(str(workdir), time_fn=FakeClock(times), print_fn=lines.append,
                                process_index=0, **kwargs)
  return writer, lines


LOGGED = {
    10: {"loss": 0.75, "probe_top1": np.float32(0.125), "collapse_std": jnp.float32(0.03125),
         "images": 4096, "nonfinite": float("nan")},
    20: {"loss": np.float64(0.5), "probe_top1": 0.25, "collapse_std": jnp.asarray([0.0625]),
         "images": 8192, "nonfinite": float("inf")},
}


def expected_json(step):
  """The host float of each value; NaN and Inf become None (JSON null)."""
  out = {"step": step}
  for name, value in LOGGED[step].items():
    value = np.asarray(value).reshape(()).item()
    out[name] = value if math.isfinite(value) else None
  return out


def test_metrics_jsonl_lines_parse_to_the_values_written_and_append(tmp_path):
  writer, _ = make_writer(tmp_path)
  for step, metrics in LOGGED.items():
    writer.write(step, metrics)
    # Flushed at once: readable before close.
    with open(tmp_path / writers.METRICS_FILE) as f:
      assert len(f.readlines()) == list(LOGGED).index(step) + 1
  writer.close()
  again, _ = make_writer(tmp_path)  # A resumed run appends.
  again.write(30, {"loss": 0.25})
  again.close()
  with open(tmp_path / writers.METRICS_FILE) as f:
    rows = [json.loads(line) for line in f]
  assert rows == [expected_json(10), expected_json(20), {"step": 30, "loss": 0.25}]
  assert rows[0]["images"] == 4096 and isinstance(rows[0]["images"], int)


def read_tensorboard_scalars(logdir):
  """(tag, step) -> value, and tag -> plugin name (TensorBoard shows 'scalars' as scalars)."""
  values, plugins = {}, {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        values[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
        if value.metadata.plugin_data.plugin_name:  # Sent with a tag's first value only.
          plugins[value.tag] = value.metadata.plugin_data.plugin_name
  return values, plugins


def test_tensorboard_scalars_read_back_equal_the_values(tmp_path):
  writer, _ = make_writer(tmp_path)
  for step, metrics in LOGGED.items():
    writer.write(step, metrics)
  writer.close()
  got, plugins = read_tensorboard_scalars(str(tmp_path))
  want = {(name, step): float(np.asarray(value).reshape(()))
          for step, metrics in LOGGED.items() for name, value in metrics.items()}
  assert set(got) == set(want)
  assert plugins == {name: "scalars" for name in LOGGED[10]}
  for key, value in want.items():
    # TensorBoard stores float32.
    np.testing.assert_allclose(got[key], np.float32(value), rtol=0, err_msg=str(key))


def test_progress_line_fields_and_eta_from_recent_steps(tmp_path):
  # window=3: the rate uses the last three logged steps only. Steps 300 -> 500 take
  # 20 s, so 10 steps/s, 10 * 256 = 2560 images/s, and 500 steps left take 50 s.
  # The whole history (100 -> 500 in 120 s) would give 3.33 steps/s instead.
  writer, lines = make_writer(tmp_path, times=(0.0, 100.0, 110.0, 120.0), window=3,
                              images_per_step=256)
  metrics = {"loss": 0.41, "probe_top1": 0.125, "collapse_std": 0.03125, "tau": 0.99}
  for step in (100, 300, 400, 500):
    returned = writer.write(step, metrics)
  writer.close()
  assert lines[0] == ("step 100/1000 (10.0%) | loss 0.4100 | probe top-1 12.50% | "
                      "collapse std 0.0312 | ETA -:--:--")
  assert returned == lines[-1] == (
      "step 500/1000 (50.0%) | loss 0.4100 | probe top-1 12.50% | collapse std 0.0312 | "
      "2560.0 img/s | ETA 0:00:50")
  # 100 -> 400 in 110 s: 300 / 110 steps/s = 698.2 images/s, 600 steps left: 220 s.
  assert lines[2].endswith("| 698.2 img/s | ETA 0:03:40")
  # 100 -> 300 in 100 s: 2 steps/s, 700 steps left: 5 min 50 s.
  assert lines[1].endswith("| 512.0 img/s | ETA 0:05:50")


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"), (90061, "25:01:01")])
def test_format_duration(seconds, text):
  assert writers.format_duration(seconds) == text


def test_other_processes_write_nothing(tmp_path):
  workdir = tmp_path / "run"
  lines = []
  writer = writers.MetricWriter(str(workdir), total_steps=10, process_index=1,
                                time_fn=FakeClock([]), print_fn=lines.append)
  assert writer.write(5, {"loss": 1.0}) is None
  writer.close()
  assert not workdir.exists() and lines == []


def test_bad_metrics_are_refused_with_the_name(tmp_path):
  writer, lines = make_writer(tmp_path)
  with pytest.raises(ValueError, match="'loss' has shape \\(2,\\)"):
    writer.write(1, {"loss": np.zeros(2)})
  with pytest.raises(ValueError, match="'step'"):
    writer.write(1, {"step": 1})
  writer.close()
  assert lines == [] and os.path.getsize(tmp_path / writers.METRICS_FILE) == 0
