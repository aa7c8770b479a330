"""The paper's collapse ablation on real data (Fashion-MNIST), through `byol-jax sweep`.

Marked slow (about 12 minutes on 2 idle CPU cores): run with `pytest -m slow`. Two runs of the
recipe's short ablation base (`configs/byol_fashion_mnist.py:ablation`, seed 0) go through
the sweep command as a user runs it: BYOL as is and BYOL without the predictor (BYOL
section 5: the representation collapses). Both are compared with the linear protocol on a
random encoder of the same architecture (`--pretrained=random`).

Measured (seed 0, 2 CPU cores): BYOL 71.60%, no predictor 59.82% (collapse_std * sqrt(d) =
0.037), random encoder 61.02%. The paper's other collapse, tau = 0 (Table 5a: 0.3%), does
not happen at this scale: with the predictor kept, tau = 0 gave 73.64% and a healthy spread
(0.81), better than tau_base 0.96 - so it is not asserted here (experiments/README.md).
"""
import json

import pytest

import real_runs

pytestmark = pytest.mark.slow

BASE = "configs/byol_fashion_mnist.py:ablation"
SWEEP = '''
def get_sweep():
  return [
      {"name": "byol", "overrides": {}},
      {"name": "no_predictor", "overrides": {"model.use_predictor": False}},
  ]
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return real_runs.prepared_fashion_mnist(tmp_path_factory)


def test_without_predictor_byol_collapses_to_no_better_than_random(data_dir, tmp_path):
  sweep_file = tmp_path / "collapse.py"
  sweep_file.write_text(SWEEP)
  flags = [f"--config={BASE}", f"--config.dataset.data_dir={data_dir}"]
  real_runs.run_cli("sweep", str(sweep_file), f"--base={BASE}", f"--workdir={tmp_path / 'sweep'}",
                    f"--config.dataset.data_dir={data_dir}")
  real_runs.run_cli("linear-eval", *flags, "--pretrained=random",
                    f"--workdir={tmp_path / 'random'}")
  random = json.loads((tmp_path / "random" / "results.json").read_text())["top1"]
  rows, spread, top1 = real_runs.sweep_results(tmp_path / "sweep")
  print(f"linear top-1 {top1}, random encoder {random:.4f}; collapse_std * sqrt(d) {spread}")
  assert all(row["status"] == "done" for row in rows.values()), rows
  assert spread["byol"] > 0.5
  assert top1["byol"] >= random + 0.02
  assert spread["no_predictor"] < 0.05  # The loop's collapse threshold.
  assert top1["no_predictor"] <= random + 0.01
