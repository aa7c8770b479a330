"""Sweeps on a cluster, through cli.main with the fakes standing in for the training:
--run=I runs run I alone and resumably, an index out of range exits 2 naming the range;
--collect tabulates finished runs and lists the others while calling no training function;
the --print_commands lines, run through the CLI, run exactly the sweep's runs and carry
the multi-host flags.
"""
import json
import os
import shlex

import jax
import pytest

from byol_jax.cli import command_line
from byol_jax import config as config_lib
from byol_jax.jobs import sweep_spec
from byol_jax.store import run_config
from sweep_helpers import (EXPERIMENTS, PNG, SMOKE, TAUS, Fakes, cluster_args, flat, read_rows,
                           run_main, runs_of, sweep_cli, write_sweep)


def test_run_flag_runs_that_run_alone_and_a_rerun_resumes_it(tmp_path, monkeypatch):
  args = cluster_args(tmp_path)
  preempted = Fakes(preempt={"t1"})
  assert sweep_cli(monkeypatch, preempted, *args, "--run=1") == 1  # Not finished.
  assert preempted.calls == [("pretrain", "t1")]
  assert os.listdir(tmp_path / "out") == ["t1"]  # The sweep's layout; no other run, no table.
  crashed = Fakes(fail_eval={"t1"})  # Pretraining resumes and ends; the evaluation crashes.
  assert sweep_cli(monkeypatch, crashed, *args, "--run=1") == 1
  assert crashed.calls == [("pretrain", "t1"), ("linear", "t1")]
  rerun = Fakes()  # Pretraining is not redone: only the evaluation runs.
  assert sweep_cli(monkeypatch, rerun, *args, "--run=1") == 0
  assert rerun.calls == [("linear", "t1")]
  finished = Fakes()  # A finished run: its evaluation is not redone either.
  assert sweep_cli(monkeypatch, finished, *args, "--run=1") == 0
  assert finished.calls == [] and os.listdir(tmp_path / "out") == ["t1"]
  whole = Fakes()  # The full sweep in the same directory takes it as finished.
  assert run_main(tmp_path, whole, args[0]) == 0
  assert whole.calls == [("pretrain", "t0"), ("linear", "t0"), ("pretrain", "t2"), ("linear", "t2")]


@pytest.mark.parametrize("flags,message", [
    (["--run=3"], "--run=3 is out of range: {file} has 3 runs, so --run takes 0 to 2 "
                  "(0=t0, 1=t1, 2=t2)."),
    (["--run=-1"], "--run takes 0 to 2"),
    (["--run=0", "--collect"], "--run and --collect exclude each other"),
])
def test_bad_run_index_exits_2_naming_the_valid_range(tmp_path, monkeypatch, capsys, flags,
                                                      message):
  args = cluster_args(tmp_path)
  fakes = Fakes()
  assert sweep_cli(monkeypatch, fakes, *args, *flags) == 2
  error = capsys.readouterr().err
  assert message.format(file=args[0]) in error and "Traceback" not in error
  assert fakes.calls == [] and not (tmp_path / "out").exists()


def test_collect_tabulates_finished_runs_lists_the_others_and_runs_nothing(tmp_path, monkeypatch,
                                                                          capsys):
  args = cluster_args(tmp_path)
  assert sweep_cli(monkeypatch, Fakes(), *args, "--run=0") == 0
  assert sweep_cli(monkeypatch, Fakes(preempt={"t1"}), *args, "--run=1") == 1
  capsys.readouterr()
  nothing = Fakes()
  assert sweep_cli(monkeypatch, nothing, *args, "--collect") == 1  # Not every run finished.
  assert nothing.calls == []
  rows = read_rows(tmp_path)
  assert [(r["name"], r["status"]) for r in rows] == [
      ("t0", "done"), ("t1", "unfinished"), ("t2", "missing")]
  assert float(rows[0]["linear_top1"]) == 0.625 and rows[0]["step"] == "3"  # 0.5 + 0.5 / 4: exact.
  assert (rows[1]["step"], rows[1]["linear_top1"], rows[2]["step"]) == ("3", "", "")
  out = capsys.readouterr().out
  md = (tmp_path / "out" / "results.md").read_text()
  assert "collected 1 of 3 runs" in out and "Not finished (2 of 3 runs):" in md
  for text in (out, md):
    assert "t1: unfinished (last step 3)" in text and "t2: missing (no run directory)" in text
    assert "t0:" not in text
  assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG


def test_collect_after_a_full_sweep_writes_the_same_table(tmp_path, monkeypatch, capsys):
  args = cluster_args(tmp_path)
  assert run_main(tmp_path, Fakes(), args[0]) == 0
  table = tmp_path / "out" / "results.csv"
  written = table.read_text()
  table.unlink()
  nothing = Fakes()
  assert sweep_cli(monkeypatch, nothing, *args, "--collect") == 0 and nothing.calls == []
  assert table.read_text() == written
  assert "collected 3 of 3 runs" in capsys.readouterr().out


def test_collect_reads_runs_finished_by_pretrain_and_linear_eval_commands(tmp_path, monkeypatch):
  """A run directory without sweep_run.json: done when linear/results.json evaluated its
  config (sizes resolved from the data) at its last step, else unfinished, saying why."""
  args = cluster_args(tmp_path)
  runs = sweep_spec.expand(sweep_spec.load_sweep(args[0]), sweep_spec.load_recipe(SMOKE))
  for run, step_short, tau in zip(runs, (0, 1, 0), (None, None, 0.1)):
    run_dir = tmp_path / "out" / run.name
    Fakes().pretrain(run.config, str(run_dir), None)  # Its metrics.jsonl.
    config = run_config.config_to_dict(run.config)
    config["dataset"]["num_train_examples"] = 1000  # As linear-eval resolves it.
    if tau is not None:
      config["target"]["tau_base"] = tau
    total = config_lib.total_steps(run_config.config_from_json(config))
    (run_dir / "linear").mkdir()
    (run_dir / "linear" / "results.json").write_text(json.dumps(dict(
        top1=0.75, top5=0.96, learning_rate=0.4, pretrained_step=total - step_short,
        config=config)))
  nothing = Fakes()
  assert sweep_cli(monkeypatch, nothing, *args, "--collect") == 1 and nothing.calls == []
  rows = read_rows(tmp_path)
  assert [r["status"] for r in rows] == ["done", "unfinished", "unfinished"]
  assert (rows[0]["linear_top1"], rows[0]["linear_lr"], rows[0]["loss"]) == ("0.75", "0.4",
                                                                             str(1 / 3))
  assert "pretraining had not finished" in rows[1]["error"]
  assert "evaluated another config (fields target.tau_base)" in rows[2]["error"]


def test_collect_does_not_count_a_finished_run_of_another_config(tmp_path, monkeypatch):
  args = cluster_args(tmp_path, TAUS[:1])
  assert sweep_cli(monkeypatch, Fakes(), *args, "--run=0") == 0
  nothing = Fakes()
  assert sweep_cli(monkeypatch, nothing, *args, "--collect", "--config.seed=7") == 1
  row, = read_rows(tmp_path)
  assert row["status"] == "unfinished" and "different config" in row["error"]
  assert nothing.calls == []


def test_printed_commands_run_exactly_the_sweeps_runs_through_the_cli(tmp_path, monkeypatch,
                                                                     capsys):
  workdir = tmp_path / "out"
  assert sweep_cli(monkeypatch, Fakes(), EXPERIMENTS["augmentations"], f"--base={SMOKE}",
                   f"--workdir={workdir}", "--print-commands", "--config.seed=3") == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert not workdir.exists()  # Printed, ran nothing.
  expected = runs_of("augmentations")
  assert len(lines) == len(expected)
  fakes = Fakes()
  for index, (line, (name, c)) in enumerate(zip(lines, expected.items())):
    argv = shlex.split(line)
    assert argv[:4] == ["byol-jax", "sweep", EXPERIMENTS["augmentations"], f"--run={index}"]
    assert sweep_cli(monkeypatch, fakes, *argv[2:]) == 0
    ran, run_dir = fakes.configs[name]
    c.unlock()
    c.seed = 3
    assert run_dir == str(workdir / name) and flat(ran) == flat(c)
  assert fakes.calls == [(step, name) for name in expected for step in ("pretrain", "linear")]


@pytest.mark.parametrize("given", [
    ["--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=0",
     "--heartbeat_timeout=30", "--initialization_timeout=600"],
    ["--distributed"],
    [],
])
def test_printed_commands_carry_the_multihost_flags_as_given(tmp_path, monkeypatch, capsys,
                                                             given):
  dashed = [flag.replace("_", "-") for flag in given]  # The CLI takes both spellings.
  assert sweep_cli(monkeypatch, Fakes(), *cluster_args(tmp_path), "--print-commands",
                   *dashed) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  multihost = tuple(f"--{name}" for name in command_line.MULTIHOST)
  assert len(lines) == 3
  for line in lines:
    # Only the flags given, in the form the CLI reads: no default is spelt out.
    assert sorted(a for a in shlex.split(line) if a.startswith(multihost)) == sorted(given)


def test_a_process_other_than_0_runs_its_share_and_writes_no_sweep_file(tmp_path, monkeypatch):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  fakes = Fakes()
  assert run_main(tmp_path, fakes, write_sweep(tmp_path, TAUS[:1])) == 0
  assert fakes.calls == [("pretrain", "t0"), ("linear", "t0")]
  assert sorted(os.listdir(tmp_path / "out")) == ["t0"]
  assert os.listdir(tmp_path / "out" / "t0") == ["metrics.jsonl"]  # The fake's own file.
