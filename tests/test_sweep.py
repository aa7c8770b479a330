"""Sweeps: every experiments/ file expands over every recipe into valid configs whose changes
are only the intended fields; bad overrides fail before any run; a sweep with fake
pretrain / linear-eval functions writes the right table, skips finished runs, records a
failure and goes on; the plot is a PNG.

On a cluster (through cli.main, the fakes standing in for the training): --run=I runs run I
alone and resumably, an index out of range exits 2 naming the range; --collect tabulates
finished runs and lists the others while calling no training function; the --print-commands
lines, run through the CLI, run exactly the sweep's runs and carry the multi-host flags."""
import csv
import json
import os
import pathlib
import shlex
import struct

import jax
import numpy as np
import pytest

import tolerances
from byol_jax import cli
from byol_jax.cli import command_line
from byol_jax.training import augment
from byol_jax import config as config_lib
from byol_jax.training import optim
from byol_jax.jobs import sweep
from byol_jax.jobs import sweep_spec
from byol_jax.store import run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = {p.stem: str(p) for p in sorted((ROOT / "experiments").glob("*.py"))}
RECIPES = [str(ROOT / "configs" / spec) for spec in (
    "byol_imagenet.py", "byol_imagenet.py:r200x2-1000", "byol_imagenette.py",
    "byol_cifar10.py:cpu", "byol_fashion_mnist.py")]
SMOKE = str(ROOT / "configs" / "byol_fashion_mnist.py:smoke")
# The only fields each ablation may change (prefixes of dotted names).
INTENDED = {
    "target_tau": ("target.",),
    "predictor": ("model.use_predictor",),
    "predictor_lr": ("target.", "optim.predictor_lr_multiplier"),
    "normalisation": ("model.norm", "optim.predictor_lr_multiplier"),
    "small_stem": ("model.stem", "optim.predictor_lr_multiplier"),
    "batch_size": ("batch_size",),
    "augmentations": ("augment.view1.", "augment.view2."),
    "small_images": ("batch_size", "target.tau_base", "augment.view1.blur_prob",
                     "augment.view2.blur_prob", "augment.crop_area_min", "optim.base_lr",
                     "linear.standardize", "linear.learning_rates"),
}
DEVICE_OPS = ("flip", "color_jitter", "grayscale", "blur", "solarize")


def flat(c, prefix=""):
  out = {}
  for key, value in c.items():
    if hasattr(value, "items"):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def test_every_experiment_file_has_intended_fields():
  assert sorted(EXPERIMENTS) == sorted(INTENDED)


@pytest.mark.parametrize("base", RECIPES)
@pytest.mark.parametrize("experiment", sorted(INTENDED))
def test_expansion_validates_and_changes_only_intended_fields(experiment, base):
  base_config = sweep_spec.load_recipe(base)
  before = flat(base_config)
  runs = sweep_spec.expand(sweep_spec.load_sweep(EXPERIMENTS[experiment]), base_config)
  assert len({r.name for r in runs}) == len(runs) >= 2
  for run in runs:
    config_lib.validate(run.config)
    after = flat(run.config)
    assert after.keys() == before.keys()
    changed = {k for k in after if after[k] != before[k]}
    assert all(k.startswith(INTENDED[experiment]) for k in changed), (run.name, changed)
    for key, value in run.overrides.items():
      assert after[key] == value, (run.name, key)


def runs_of(experiment, base=SMOKE):
  runs = sweep_spec.expand(sweep_spec.load_sweep(EXPERIMENTS[experiment]),
                           sweep_spec.load_recipe(base))
  return {r.name: r.config for r in runs}


def tau_at(c, steps):
  schedule = optim.tau_schedule(c.target.tau_base, config_lib.total_steps(c), c.target.schedule)
  return np.array([float(schedule(s)) for s in steps])


def test_tau_runs_follow_the_paper_definitions():
  runs = runs_of("target_tau", RECIPES[0])
  total = config_lib.total_steps(runs["tau_0"])
  steps = [0, total // 2, total]
  # tau_base 0: constant 0 (stop-gradient of online); 1: 1 - 0 x (...) = 1 (constant random
  # network). Both exact in float32.
  np.testing.assert_array_equal(tau_at(runs["tau_0"], steps), 0.0)
  np.testing.assert_array_equal(tau_at(runs["tau_1"], steps), 1.0)
  assert runs["tau_1_separate_init"].target.init == "separate"
  # Cosine from tau_base to 1: 1 - (1 - 0.9)(cos(pi k / K) + 1) / 2 at k = 0, K/2, K.
  # (K // 2 is not K / 2 for odd K: the formula at the steps themselves, in float64.) The
  # schedule's float32 ops: 8 ulps of 1, as in test_optim.
  want = [1 - (1 - 0.9) * (np.cos(np.pi * k / total) + 1) / 2 for k in steps]
  tolerances.assert_close(tau_at(runs["tau_0.9"], steps), want, tolerances.ulps(8, 1.0))
  tolerances.assert_close(want, [0.9, 0.95, 1.0], 0.1 * np.pi / 4 / total + 1e-12)  # |cos| <= pi / 2K.
  for name, c in runs_of("predictor_lr", RECIPES[0]).items():
    np.testing.assert_array_equal(tau_at(c, steps), 0.0, err_msg=name)  # No EMA target: exact.


def test_batch_size_runs_scale_the_peak_lr_linearly():
  for name, c in runs_of("batch_size", RECIPES[0]).items():
    b = int(name.split("_")[1])
    assert c.batch_size == b
    schedule = optim.learning_rate_schedule(c.optim.base_lr, c.batch_size,
                                            config_lib.total_steps(c), config_lib.warmup_steps(c))
    peak = float(schedule(config_lib.warmup_steps(c)))
    # The peak rounded to float32 and the schedule's ops at the end of the warm-up: 4 ulps.
    tolerances.assert_close(peak, 0.3 * b / 256, tolerances.ulps(4, 0.3 * b / 256), name)


# Device ops each augmentation run keeps (at the paper's probability); the rest are 0.
KEPT_OPS = {"baseline": DEVICE_OPS, "no_grayscale": ("flip", "color_jitter", "blur", "solarize"),
            "no_color": ("flip", "blur", "solarize"), "crop_blur_only": ("blur",),
            "crop_color_only": ("color_jitter", "grayscale"), "crop_only": ()}


def test_augmentation_runs_keep_only_their_ops():
  runs = runs_of("augmentations", RECIPES[0])  # ImageNet: the paper's augmentations.
  assert sorted(runs) == sorted(KEPT_OPS)
  for name, ops in KEPT_OPS.items():
    for view in (1, 2):
      paper = config_lib.view_preset(view)
      for op in DEVICE_OPS:
        prob = runs[name].augment[f"view{view}"][f"{op}_prob"]
        assert prob == (paper[f"{op}_prob"] if op in ops else 0.0), (name, view, op)


def test_augmentation_runs_keep_the_recipes_probabilities_of_kept_ops():
  recipe = sweep_spec.load_recipe(SMOKE)  # Fashion-MNIST: no blur in either view.
  baseline = runs_of("augmentations")["baseline"]
  assert baseline.augment.to_dict() == recipe.augment.to_dict()
  assert baseline.augment.view1.blur_prob == 0.0


def test_crop_only_views_are_the_identity_on_the_device():
  c = runs_of("augmentations")["crop_only"]
  image = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(np.float32)
  for view in ("view1", "view2"):
    v = augment.view_config(c.augment[view])
    for seed in range(3):
      draws = augment.sample_view_draws(jax.random.PRNGKey(seed), v)
      np.testing.assert_array_equal(augment.apply_view(image, draws, v), image)


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



# --- On a cluster: --run, --collect, --print-commands, through the CLI ---

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
