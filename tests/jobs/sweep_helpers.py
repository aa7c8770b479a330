"""Stand-ins for the sweep tests: a sweep file written from a list of runs, fake pretrain /
linear-eval functions that record their calls and derive metrics from the config, and the
calls that run a sweep with them (as a library call or through the CLI).
"""
import csv
import json
import os
import pathlib

from byol_jax import cli
from byol_jax.jobs import sweep
from byol_jax.jobs import sweep_spec
from byol_jax.store import run_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS = {p.stem: str(p) for p in sorted((ROOT / "experiments").glob("*.py"))}
SMOKE = str(ROOT / "configs" / "byol_fashion_mnist.py:smoke")


def flat(c) -> dict:
  """A ConfigDict as {dotted field: value}."""
  return run_config.flatten(c.to_dict())


def runs_of(experiment, base=SMOKE):
  """{run name: config} of experiments/<experiment>.py expanded over the recipe `base`."""
  runs = sweep_spec.expand(sweep_spec.load_sweep(EXPERIMENTS[experiment]),
                           sweep_spec.load_recipe(base))
  return {r.name: r.config for r in runs}


def write_sweep(folder, runs):
  path = folder / "my_sweep.py"
  path.write_text(f"def get_sweep():\n  return {runs!r}\n")
  return str(path)


class Fakes:
  """Fake pretrain / linear-eval recording their calls (and each run's config and
  directory); metrics derived from the config."""

  def __init__(self, fail=(), preempt=(), fail_eval=()):
    self.calls, self.fail, self.preempt = [], set(fail), set(preempt)
    self.fail_eval, self.configs = set(fail_eval), {}

  def pretrain(self, c, workdir, print_fn):
    name = os.path.basename(workdir)
    self.calls.append(("pretrain", name))
    self.configs[name] = (c, workdir)
    if name in self.fail:
      raise RuntimeError(f"boom in {name}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in (1, 2, 3):
        f.write(json.dumps(dict(step=step, loss=1.0 / step, collapse_std=c.target.tau_base / 10,
                                probe_top1=0.1 * step)) + "\n")
      f.write(json.dumps(dict(step=2, loss=0.45)) + "\n")  # A resume repeated step 2.
      f.write(json.dumps(dict(step=3, eval_top1=0.625, eval_top5=0.9)) + "\n")
    return dict(step=3, preempted=name in self.preempt)

  def linear_eval(self, c, pretrained, workdir, print_fn):
    self.calls.append(("linear", os.path.basename(pretrained)))
    assert workdir == os.path.join(pretrained, "linear")
    if os.path.basename(pretrained) in self.fail_eval:
      raise RuntimeError("evaluation crashed")
    return dict(top1=0.5 + c.target.tau_base / 4, top5=0.875, lr=0.1)


TAUS = [dict(name=f"t{i}", overrides={"target.tau_base": tau}) for i, tau in
        enumerate((0.5, 0.9, 0.99))]


def run_main(tmp_path, fakes, sweep_file, **kwargs):
  return sweep.main_like(sweep_file, SMOKE, str(tmp_path / "out"), pretrain_fn=fakes.pretrain,
                         eval_fn=fakes.linear_eval, print_fn=lambda line: None, **kwargs)


def read_rows(tmp_path):
  with open(tmp_path / "out" / "results.csv") as f:
    return list(csv.DictReader(f))


PNG = b"\x89PNG\r\n\x1a\n"


def sweep_cli(monkeypatch, fakes, *argv):
  """`byol-jax sweep ARGV` through cli.main, `fakes` standing in for the training; the exit
  status."""
  monkeypatch.setattr(sweep, "_default_pretrain", fakes.pretrain)
  monkeypatch.setattr(sweep, "_default_linear_eval", fakes.linear_eval)
  try:
    cli.main(["byol-jax", "sweep", *argv])
  except SystemExit as e:
    return e.code
  return 0


def cluster_args(tmp_path, runs=TAUS):
  return [write_sweep(tmp_path, runs), f"--base={SMOKE}", f"--workdir={tmp_path / 'out'}"]
