"""Every command that computes on devices starts the multi-host runtime
(`jax.distributed.initialize`) once, the same way, before its work, from flags, the
environment or a cluster's auto-detection; commands given no multi-host settings, and sweeps
that only print or tabulate, start none.
"""
import contextlib

import jax
import pytest

from byol_jax import cli
from byol_jax.evaluation import finetune
from byol_jax.evaluation import linear_eval
from byol_jax.jobs import loop
from multihost import RECIPE


_MULTIHOST_ARGS = ["--coordinator_address=10.0.0.1:1234", "--num_processes=4",
                   "--process_id=3", "--initialization_timeout=77", "--heartbeat_timeout=33"]
_EXPECTED = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                 initialization_timeout=77, heartbeat_timeout_seconds=33)


@pytest.fixture
def device_work(monkeypatch, tmp_path):
  """Stand-ins for every command's library call and for jax.distributed.initialize: each
  records the initialize calls made before it ran."""
  events = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: events.append(("initialize", kwargs)))

  def stand_in(name, result):
    def run(*args, **kwargs):
      events.append((name, sum(e[0] == "initialize" for e in events)))
      return result
    return run

  monkeypatch.setattr(loop, "pretrain", stand_in("pretrain", {"preempted": False, "step": 1}))
  monkeypatch.setattr(linear_eval, "run",
                      stand_in("linear-eval", {"top1": 0.5, "top5": 1.0, "learning_rate": 0.4}))
  monkeypatch.setattr(linear_eval, "knn_run", stand_in("knn", {}))
  monkeypatch.setattr(finetune, "run", stand_in("finetune", {}))
  sweep_file = tmp_path / "two_runs.py"
  sweep_file.write_text("def get_sweep():\n  return [{'name': 'a', 'overrides': {'seed': 1}},\n"
                        "                        {'name': 'b', 'overrides': {'seed': 2}}]\n")
  return events, str(sweep_file)


_SMOKE = f"--config={RECIPE}:smoke"
_COMMANDS = {
    "pretrain": lambda tmp, sweep_file: ["pretrain", _SMOKE, f"--workdir={tmp}/w"],
    "linear-eval": lambda tmp, sweep_file: ["linear-eval", _SMOKE, "--pretrained=random",
                                            f"--workdir={tmp}/w"],
    "knn": lambda tmp, sweep_file: ["knn", _SMOKE, "--pretrained=random", f"--workdir={tmp}/w"],
    "finetune": lambda tmp, sweep_file: ["finetune", _SMOKE, "--pretrained=random",
                                         f"--workdir={tmp}/w"],
    "sweep": lambda tmp, sweep_file: ["sweep", sweep_file, f"--base={RECIPE}:smoke",
                                      f"--workdir={tmp}/w"],
    "sweep --run": lambda tmp, sweep_file: ["sweep", sweep_file, f"--base={RECIPE}:smoke",
                                            f"--workdir={tmp}/w", "--run=1"],
}


@pytest.mark.parametrize("command", sorted(_COMMANDS))
@pytest.mark.parametrize("how", ["flags", "environment", "cluster"])
def test_every_device_command_starts_the_multihost_runtime_once_before_its_work(
    command, how, device_work, tmp_path, monkeypatch):
  events, sweep_file = device_work
  args = _COMMANDS[command](tmp_path, sweep_file)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  expected = _EXPECTED
  if how == "flags":
    args += _MULTIHOST_ARGS
  elif how == "environment":
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    args += ["--initialization_timeout=77", "--heartbeat_timeout=33"]
  else:  # Cloud TPU, SLURM: jax finds the cluster itself.
    args += ["--distributed", "--initialization_timeout=77", "--heartbeat_timeout=33"]
    expected = dict(initialization_timeout=77, heartbeat_timeout_seconds=33)
  cli.run(["byol-jax", *args])
  assert events[0] == ("initialize", expected), events
  work = events[1:]
  # One start for the whole command: a sweep's runs and their evaluations all run after it.
  assert work and all(count == 1 for _, count in work), events
  runs = {"sweep": 2, "sweep --run": 1}.get(command)
  if runs:
    assert [name for name, _ in work] == ["pretrain", "linear-eval"] * runs
  for name in ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout"):
    assert f"--{name}" in cli.command_usage(command.split()[0])


def test_without_multihost_flags_no_command_starts_the_runtime(device_work, tmp_path,
                                                               monkeypatch):
  events, sweep_file = device_work
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  for make in _COMMANDS.values():
    cli.run(["byol-jax", *make(tmp_path, sweep_file)])
  assert not [e for e in events if e[0] == "initialize"], events


@pytest.mark.parametrize("mode", ["--print_commands", "--collect"])
def test_a_sweep_that_only_prints_or_tabulates_starts_no_runtime(mode, device_work, tmp_path):
  events, sweep_file = device_work
  with pytest.raises(SystemExit) if mode == "--collect" else contextlib.nullcontext():
    # Nothing ran in this workdir, so --collect finds the runs missing (status 1).
    cli.run(["byol-jax", "sweep", sweep_file, f"--base={RECIPE}:smoke",
             f"--workdir={tmp_path}", mode, *_MULTIHOST_ARGS])
  assert events == []
