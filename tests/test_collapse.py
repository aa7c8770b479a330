"""The paper's collapse ablations on real data (Fashion-MNIST), through `byol-jax sweep`.

Marked slow (about 15 minutes on 2 CPU cores): run with `pytest -m slow`. Three runs of the
recipe's short ablation base (`configs/byol_fashion_mnist.py:ablation`, seed 0) go through
the sweep command as a user runs it: BYOL as is, BYOL without the predictor, and BYOL with
tau = 0 (the target is the online network of the previous step). BYOL section 5 / Table 5a:
the last two collapse. Each is compared with the linear protocol on a random encoder of the
same architecture (`--pretrained=random`).
"""
import csv
import json
import math

import pytest

import real_runs

pytestmark = pytest.mark.slow

BASE = "configs/byol_fashion_mnist.py:ablation"
SWEEP = '''
def get_sweep():
  return [
      {"name": "byol", "overrides": {}},
      {"name": "no_predictor", "overrides": {"model.use_predictor": False}},
      {"name": "tau_0", "overrides": {"target.tau_base": 0.0, "target.schedule": "constant"}},
  ]
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return real_runs.prepared_fashion_mnist(tmp_path_factory)


def test_no_predictor_and_tau_0_collapse_byol_does_not(data_dir, tmp_path):
  sweep_file = tmp_path / "collapse.py"
  sweep_file.write_text(SWEEP)
  flags = [f"--config={BASE}", f"--config.dataset.data_dir={data_dir}"]
  real_runs.run_cli("sweep", str(sweep_file), f"--base={BASE}", f"--workdir={tmp_path / 'sweep'}",
                    f"--config.dataset.data_dir={data_dir}")
  real_runs.run_cli("linear-eval", *flags, "--pretrained=random",
                    f"--workdir={tmp_path / 'random'}")
  random = json.loads((tmp_path / "random" / "results.json").read_text())["top1"]
  with open(tmp_path / "sweep" / "results.csv") as f:
    rows = {row["name"]: row for row in csv.DictReader(f)}
  # collapse_std is the per-dimension std of the l2-normalised online projection: about
  # 1/sqrt(projector_out) when the batch is spread out, 0 for a constant output.
  spread = {name: float(row["collapse_std"]) * math.sqrt(128) for name, row in rows.items()}
  top1 = {name: float(row["linear_top1"]) for name, row in rows.items()}
  print(f"linear top-1 {top1}, random encoder {random:.4f}; collapse_std * sqrt(d) {spread}")
  assert all(row["status"] == "done" for row in rows.values()), rows
  assert spread["byol"] > 0.5
  assert top1["byol"] >= random + 0.02
  for name in ("no_predictor", "tau_0"):
    assert spread[name] < 0.05, (name, spread[name])  # The loop's collapse threshold.
    assert top1[name] <= random + 0.01, (name, top1[name], random)
