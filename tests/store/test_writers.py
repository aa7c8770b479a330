"""Tests of writers.py: metrics (metrics.jsonl locally, numbered parts on gs://) and
TensorBoard read back, the bytes a log uploads to a bucket early and late in a run, resumes
that add parts without rewriting any, the progress line and ETA under an injected clock, and
silence on processes other than 0. gs:// is fake-gcs-server (tests/fake_gcs.py)."""
import glob
import json
import math
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from fake_gcs import gcs  # noqa: F401  (the emulator fixture)
from byol_jax.store import files
from byol_jax.store import writers

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


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
  assert writers.read_metrics(str(tmp_path)) == rows
  assert writers.metrics_url(str(tmp_path)) == str(tmp_path / writers.METRICS_FILE)


def test_read_metrics_reads_a_workdir_written_before_metrics_had_parts(tmp_path):
  workdir = tmp_path / "old"
  shutil.copytree(FIXTURES / "workdir_pre_move", workdir)
  lines = (workdir / writers.METRICS_FILE).read_text().splitlines()
  assert lines and writers.read_metrics(str(workdir)) == [json.loads(l) for l in lines]
  assert writers.read_metrics(str(tmp_path / "none")) == []


def test_a_local_workdir_with_parts_keeps_adding_parts_after_the_file(tmp_path):
  """A workdir copied from a bucket and resumed on a local disk: its metrics.jsonl holds the
  oldest rows, so new rows go to a new part, never into the file."""
  (tmp_path / writers.METRICS_FILE).write_text('{"step": 1}\n')
  parts = tmp_path / (writers.METRICS_FILE + files.PARTS_SUFFIX)
  parts.mkdir()
  (parts / "000000.jsonl").write_text('{"step": 2}\n')
  writer, _ = make_writer(tmp_path)
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert sorted(os.listdir(parts)) == ["000000.jsonl", "000001.jsonl"]
  assert (tmp_path / writers.METRICS_FILE).read_text() == '{"step": 1}\n'
  assert [r["step"] for r in writers.read_metrics(str(tmp_path))] == [1, 2, 3]
  assert writers.metrics_url(str(tmp_path)) == str(parts)


# About the width of a pretraining log (loss, probes, monitors, schedules).
ROW = {f"metric_{k}": 0.123456789 * (k + 1) for k in range(12)}


def _uploaded(bucket, prefix: str) -> dict[str, int]:
  """Bytes uploaded so far under `prefix`: metrics parts, TensorBoard events, the rest."""
  sums = {"metrics": 0, "events": 0, "other": 0}
  for name, _, size in bucket.uploads(prefix):
    rest = name[len(prefix):]
    kind = ("metrics" if rest.startswith(writers.METRICS_FILE) else
            "events" if rest.startswith("events.out.tfevents.") else "other")
    sums[kind] += size
  return sums


@pytest.mark.xdist_group("gcs")
def test_a_log_uploads_as_many_bytes_at_row_1000_as_at_row_10_on_gs(gcs):  # noqa: F811
  """Bytes uploaded per row, counted by the (versioned) bucket itself: rows 1-10 against
  rows 1001-1010 of one 1010-row run. Metrics parts hold files.PART_LINES rows, so both
  windows are the first ten rows of a part; no single upload exceeds its bound."""
  workdir = gcs.metered.url("long")
  writer = writers.MetricWriter(workdir, total_steps=2000, process_index=0,
                                print_fn=lambda line: None)
  per_row = {}
  for step in range(1, 1011):
    if step in (1, 1001):
      before = _uploaded(gcs.metered, "long/")
    writer.write(step, ROW)
    if step in (10, 1010):
      after = _uploaded(gcs.metered, "long/")
      per_row[step] = {kind: (after[kind] - before[kind]) / 10 for kind in after}
  writer.close()
  total = _uploaded(gcs.metered, "long/")
  rows = writers.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, 1011))
  metrics_text = sum(len(json.dumps({"step": 1, **ROW})) + 1 for _ in rows)
  print(f"\nbytes uploaded per row, rows 1-10: {per_row[10]}; rows 1001-1010: "
        f"{per_row[1010]}; whole 1010-row run: "
        f"{ {k: round(v / 1010) for k, v in total.items()} }; whole-file rewrite at row 1010 "
        f"would upload {metrics_text} bytes of metrics alone")
  early, late = per_row[10]["metrics"], per_row[1010]["metrics"]
  assert 0 < late <= 1.05 * early  # (Step numbers are 3 digits longer late in the run.)
  assert per_row[10]["other"] == per_row[1010]["other"] == 0
  parts = [n for n in gcs.metered.objects("long/") if n.startswith("long/metrics.jsonl.d/")]
  assert len(parts) == 11
  uploads = gcs.metered.uploads("long/")
  assert max(s for n, _, s in uploads if n in parts) <= files.PART_BYTES
  one_log = per_row[10]["events"] * 2  # An upper bound of one log's events.
  assert max(s for n, _, s in uploads if "tfevents" in n) <= writers.EVENTS_FILE_BYTES + one_log
  # Every upload is bounded, so a late log never costs more than the bounds.
  assert per_row[1010]["events"] <= writers.EVENTS_FILE_BYTES + one_log
  # Text of every row uploaded between 2 and PART_LINES + 1 times in all (by part rewrites).
  assert total["metrics"] <= (files.PART_LINES + 1) / 2 * metrics_text * 1.05


@pytest.mark.xdist_group("gcs")
def test_a_resumed_writer_on_gs_adds_parts_after_the_last_and_rewrites_none(gcs):  # noqa: F811
  """An older run's metrics.jsonl, then a run of 150 rows (parts 0 and 1), then a resumed
  one: the resume uploads only a new part 2, and everything reads back in order."""
  workdir = gcs.metered.url("resumed")
  files.write_text_atomic(files.join(workdir, writers.METRICS_FILE), '{"step": 0}\n')
  writer = writers.MetricWriter(workdir, total_steps=200, process_index=0,
                                print_fn=lambda line: None)
  for step in range(1, 151):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  parts = "resumed/metrics.jsonl.d/"
  before = gcs.metered.uploads("resumed/")
  assert gcs.metered.objects(parts) == [parts + "000000.jsonl", parts + "000001.jsonl"]
  assert len(gcs.metered.read(parts + "000000.jsonl").splitlines()) == files.PART_LINES
  again = writers.MetricWriter(workdir, total_steps=200, process_index=0,
                               print_fn=lambda line: None)
  for step in (149, 150, 151):  # A resume from the checkpoint of step 148.
    again.write(step, {"loss": 0.5})
  again.close()
  new = [n for n, _, _ in gcs.metered.uploads("resumed/")[len(before):]]
  assert {n for n in new if "tfevents" not in n} == {parts + "000002.jsonl"}
  assert gcs.metered.uploads("resumed/")[:len(before)] == before
  steps = [r["step"] for r in writers.read_metrics(workdir)]
  assert steps == [0, *range(1, 151), 149, 150, 151]
  assert writers.metrics_url(workdir) == gcs.metered.url("resumed", "metrics.jsonl.d")


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
    # TensorBoard stores float32: exactly the value rounded to float32.
    np.testing.assert_array_equal(got[key], np.float32(value), err_msg=str(key))


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
