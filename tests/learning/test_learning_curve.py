"""scripts/learning_curve.py: the kNN curve read from a run's files (a local metrics.jsonl,
or the metrics parts of a gs:// run on fake-gcs-server), and its PNG."""
import json
import pathlib

import pytest

import fakes
from fake_gcs import gcs  # noqa: F401  (the emulator fixture)
from byol_jax.store import files
from byol_jax.store import writers

ROOT = pathlib.Path(__file__).resolve().parents[2]
learning_curve = fakes.script("learning_curve")


def write_run(tmp_path, records, batch_size=128):
  (tmp_path / "config.json").write_text(json.dumps({"batch_size": batch_size}))
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(tmp_path)


def test_curve_is_knn_top1_against_images_seen_in_step_order_resumed_rerun_wins(tmp_path):
  workdir = write_run(tmp_path, [
      {"step": 10, "loss": 1.0}, {"step": 20, "knn_top1": 0.5}, {"step": 10, "knn_top1": 0.3},
      {"step": 20, "knn_top1": 0.55},  # A resumed run logged step 20 again.
      {"step": 30, "knn_top1": 0.7, "loss": 0.2}])
  assert learning_curve.knn_curve(workdir) == [(1280, 0.3), (2560, 0.55), (3840, 0.7)]


def test_a_run_without_knn_figures_names_the_flag(tmp_path):
  workdir = write_run(tmp_path, [{"step": 10, "loss": 1.0}])
  with pytest.raises(ValueError, match="knn.every_steps"):
    learning_curve.knn_curve(workdir)


def test_main_writes_a_png_with_baselines_and_the_linear_point(tmp_path, capsys):
  workdir = write_run(tmp_path, [{"step": 1, "knn_top1": 0.4}, {"step": 2, "knn_top1": 0.6}], 4)
  (tmp_path / "knn.json").write_text(json.dumps({"knn_top1": 0.35}))
  (tmp_path / "results.json").write_text(json.dumps({"top1": 0.65}))
  out = tmp_path / "curve.png"
  learning_curve.main([f"--workdir={workdir}", f"--out={out}",
                       f"--baseline=raw pixels={tmp_path / 'knn.json'}",
                       f"--linear={tmp_path / 'results.json'}"])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "4 | 40.00%" in printed and "8 | 60.00%" in printed


@pytest.mark.xdist_group("gcs")
def test_a_gs_run_s_curve_reads_its_metrics_parts_across_a_resume(gcs, capsys):  # noqa: F811
  workdir = gcs.url("curve")
  files.write_json_atomic(files.join(workdir, "config.json"), {"batch_size": 4})
  for steps in ((1, 2), (2, 3)):  # A run, then its resume from step 1 (a new part).
    with writers.MetricWriter(workdir, 3, process_index=0, print_fn=lambda line: None) as w:
      for step in steps:
        w.write(step, {"knn_top1": step / 10 + (0.05 if steps[0] == 2 else 0)})
  assert gcs.objects("curve/metrics.jsonl.d/") == [
      "curve/metrics.jsonl.d/000000.jsonl", "curve/metrics.jsonl.d/000001.jsonl"]
  assert learning_curve.knn_curve(workdir) == [(4, 0.1), (8, 0.25), (12, 0.35)]
  learning_curve.main([f"--workdir={workdir}", f"--out={gcs.url('curve', 'curve.png')}"])
  assert gcs.read("curve/curve.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert "12 | 35.00%" in capsys.readouterr().out
