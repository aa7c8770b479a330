"""A sweep run in one process with fake pretrain / linear-eval functions: the table, a failure
recorded while the sweep goes on, reruns skipping finished runs, preemption stopping it,
bad overrides failing before any run, the plot a PNG.
"""
import struct

import pytest

from byol_jax import cli
from sweep_helpers import Fakes, TAUS, read_rows, run_main, write_sweep


def test_sweep_tables_failures_and_rerun_skips_finished_runs(tmp_path):
  sweep_file = write_sweep(tmp_path, TAUS)
  fakes = Fakes(fail={"t1"})
  assert run_main(tmp_path, fakes, sweep_file) == 1  # One failed: non-zero exit status.
  assert fakes.calls == [("pretrain", "t0"), ("linear", "t0"), ("pretrain", "t1"),
                         ("pretrain", "t2"), ("linear", "t2")]
  rows = read_rows(tmp_path)
  assert [r["name"] for r in rows] == ["t0", "t1", "t2"]
  assert [r["status"] for r in rows] == ["done", "failed", "done"]
  assert "boom in t1" in rows[1]["error"] and rows[1]["linear_top1"] == ""
  for row, tau in ((rows[0], 0.5), (rows[2], 0.99)):
    # The fakes' own Python expressions, through repr in JSON and CSV: exact.
    assert float(row["linear_top1"]) == 0.5 + tau / 4
    assert float(row["collapse_std"]) == tau / 10
    assert float(row["loss"]) == 1.0 / 3
    assert (float(row["probe_top1"]), float(row["probe_eval_top1"])) == (0.1 * 3, 0.625)
    assert (row["step"], row["linear_top5"], row["linear_lr"]) == ("3", "0.875", "0.1")
    assert row["overrides"] == f"target.tau_base={tau}"
  md = (tmp_path / "out" / "results.md").read_text().splitlines()
  assert len(md) == 2 + 3 and md[2].startswith("| t0 | done | 0.6250 |") and "| failed |" in md[3]
  # Rerun: finished runs are skipped, the failed one runs again.
  again = Fakes()
  assert run_main(tmp_path, again, sweep_file) == 0
  assert again.calls == [("pretrain", "t1"), ("linear", "t1")]
  assert [r["status"] for r in read_rows(tmp_path)] == ["done"] * 3
  assert float(read_rows(tmp_path)[0]["linear_top1"]) == 0.625  # 0.5 + 0.5 / 4, exact.


def test_preempted_run_stops_the_sweep(tmp_path):
  fakes = Fakes(preempt={"t1"})
  assert run_main(tmp_path, fakes, write_sweep(tmp_path, TAUS)) == 1
  assert fakes.calls == [("pretrain", "t0"), ("linear", "t0"), ("pretrain", "t1")]
  assert [r["status"] for r in read_rows(tmp_path)] == ["done", "preempted", "pending"]


def test_finished_run_of_another_config_is_not_reused(tmp_path):
  run_main(tmp_path, Fakes(), write_sweep(tmp_path, TAUS[:1]))
  changed = [dict(name="t0", overrides={"target.tau_base": 0.7})]
  fakes = Fakes()
  assert run_main(tmp_path, fakes, write_sweep(tmp_path, changed)) == 1
  assert fakes.calls == [] and "different config" in read_rows(tmp_path)[0]["error"]


@pytest.mark.parametrize("runs,cli,message", [
    ([dict(name="ok", overrides={}), dict(name="bad", overrides={"optim.base_lrr": 1.0})], (),
     "'optim.base_lrr'"),
    ([dict(name="ok", overrides={"nosection.x": 1})], (), "'nosection.x'"),
    ([dict(name="ok", overrides={"model.norm": 3})], (), "'model.norm'"),
    ([dict(name="ok", overrides={"model.norm": "layer"})], (), "model.norm"),
    ([dict(name="ok", overrides={})], ("--config.target.tau_bse=0.5",), "'target.tau_bse'"),
    ([dict(name="ok", overrides={})], ("--config.model.use_predictor=maybe",), "true or false"),
    ([dict(name="a/b", overrides={})], (), "run name"),
    ([dict(name="a", overrides={}), dict(name="a", overrides={})], (), "twice"),
])
def test_bad_sweep_or_override_fails_before_any_run(tmp_path, runs, cli, message):
  fakes = Fakes()
  with pytest.raises(ValueError, match=message):
    run_main(tmp_path, fakes, write_sweep(tmp_path, runs), overrides=cli)
  assert fakes.calls == [] and not (tmp_path / "out").exists()


def test_plot_is_a_png_of_the_figure_size(tmp_path):
  run_main(tmp_path, Fakes(), write_sweep(tmp_path, TAUS[:2]))
  data = (tmp_path / "out" / "results.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  width, height = struct.unpack(">II", data[16:24])
  assert (width, height) == (16 * 80, int(4.5 * 80))  # figsize x dpi.
