"""Proof that BYOL learns on real data (Fashion-MNIST), at the levels measured.

Marked slow: run with `pytest -m slow tests/learning/test_learning.py` (or `-k` one test). Each test
runs the real command line on the real Fashion-MNIST idx files from Debian's
dataset-fashion-mnist package and asserts what the recipe was measured to do, with margins
taken from the measured run-to-run spread (the data order is not deterministic, so reruns of
one seed differ), never from a goal the recipe does not reach.

- README's main command (5 epochs, ~8-21 minutes of pretraining on 2 cores at 240-650
  images/s): measured 84.55% and 83.86% linear top-1 (seeds 0 and 1); the standardised raw
  pixels 82.81% and the same architecture with random weights 67.22% under the same
  protocol. Asserted: its level, its margin over the raw pixels and over the random
  encoder, each less twice the measured spread.
- The 'long' recipe (40 epochs, 1-3 hours): asserted against its own measurement and
  against the raw-pixel baseline measured with the same protocol.
- GroupNorm + WS on the 'ablation' base: collapses with the recipe's predictor learning
  rate and does not with the predictor's learning rate x10 (experiments/README.md).
"""
import json

import pytest

import real_runs

pytestmark = pytest.mark.slow

# README recipe (predictor lr x10, base_lr 2.0, 5 epochs): seeds 0 and 1. Its spread is the
# two seeds' difference or the earlier recipe's over four reruns (0.73 points), the larger.
RECIPE_MEASURED = (0.8455, 0.8386)
PIXELS_MEASURED, RANDOM_MEASURED = 0.8281, 0.6722  # The same protocol (recipe's grid).
EARLIER_RECIPE_SPREAD = 0.8198 - 0.8125  # 81.25 ... 81.98% in four runs of one seed.
RECIPE_SPREAD = max(max(RECIPE_MEASURED) - min(RECIPE_MEASURED), EARLIER_RECIPE_SPREAD)
RECIPE_FLOOR = min(RECIPE_MEASURED) - 2 * RECIPE_SPREAD
# -0.4 points: the measured gain (+1.05 at the lower seed) is less than twice the spread, so
# this only proves the recipe is not below the pixels by more than the spread allows; the
# earlier recipe (81.25-81.98%, 1.5 points below) fails it.
RECIPE_MARGIN_OVER_PIXELS = min(RECIPE_MEASURED) - PIXELS_MEASURED - 2 * RECIPE_SPREAD
RECIPE_MARGIN_OVER_RANDOM = min(RECIPE_MEASURED) - RANDOM_MEASURED - 2 * RECIPE_SPREAD

# 'long' recipe (measured with the earlier optimiser: predictor lr x1, base_lr 1.0, grid
# 1.0 ... 0.05): 86.18% (raw pixels 82.32% with the same protocol, +3.86 points); this
# test's rerun gave 86.25% (1h52m beside other jobs). Too few runs for a spread of its
# own, so the earlier recipe's (0.73 points) is used, twice.
LONG_MEASURED = 0.8618
LONG_FLOOR = LONG_MEASURED - 2 * EARLIER_RECIPE_SPREAD
LONG_MARGIN_OVER_PIXELS = 0.02

ABLATION = "configs/byol_fashion_mnist.py:ablation"
GN_WS_SWEEP = '''
def get_sweep():
  return [{"name": f"group_ws_x{m:g}",
           "overrides": {"model.norm": "group_ws", "optim.predictor_lr_multiplier": m}}
          for m in (1.0, 10.0)]
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return real_runs.prepared_fashion_mnist(tmp_path_factory)


def linear_top1(config: str, data_dir: str, pretrained: str, workdir) -> float:
  real_runs.run_cli("linear-eval", f"--config={config}", f"--config.dataset.data_dir={data_dir}",
                    f"--pretrained={pretrained}", f"--workdir={workdir}")
  return json.loads((workdir / "results.json").read_text())["top1"]


def test_readme_run_reaches_its_measured_level_and_beats_pixels_and_random(data_dir, tmp_path):
  """README's main command, then the linear protocol on its encoder, on the standardised raw
  pixels and on a random encoder of the same architecture."""
  config = "configs/byol_fashion_mnist.py"
  real_runs.run_cli("pretrain", f"--config={config}", f"--config.dataset.data_dir={data_dir}",
                    f"--workdir={tmp_path / 'byol'}")
  byol = linear_top1(config, data_dir, str(tmp_path / "byol"), tmp_path / "byol" / "linear")
  pixels = linear_top1(config, data_dir, "pixels", tmp_path / "pixels")
  random = linear_top1(config, data_dir, "random", tmp_path / "random")
  print(f"linear top-1: BYOL {byol:.2%}, raw pixels {pixels:.2%}, random encoder {random:.2%};"
        f" floor {RECIPE_FLOOR:.2%}, margins {RECIPE_MARGIN_OVER_PIXELS:.2%} over pixels, "
        f"{RECIPE_MARGIN_OVER_RANDOM:.2%} over random")
  assert byol >= RECIPE_FLOOR
  assert byol >= pixels + RECIPE_MARGIN_OVER_PIXELS
  assert byol >= random + RECIPE_MARGIN_OVER_RANDOM


def test_long_run_reaches_its_measured_level_and_beats_raw_pixels(data_dir, tmp_path):
  """The 'long' recipe end to end (1-3 hours on 2 cores), then the linear protocol on its
  encoder and on the standardised raw pixels (--pretrained=pixels)."""
  config = "configs/byol_fashion_mnist.py:long"
  real_runs.run_cli("pretrain", f"--config={config}", f"--config.dataset.data_dir={data_dir}",
                    f"--workdir={tmp_path / 'long'}", timeout=4 * 3600)
  byol = linear_top1(config, data_dir, str(tmp_path / "long"), tmp_path / "long" / "linear")
  pixels = linear_top1(config, data_dir, "pixels", tmp_path / "pixels")
  print(f"linear top-1: long BYOL {byol:.2%}, raw pixels {pixels:.2%}; floor {LONG_FLOOR:.2%}")
  assert byol >= LONG_FLOOR
  assert byol >= pixels + LONG_MARGIN_OVER_PIXELS


def test_group_norm_ws_collapses_with_the_recipe_predictor_lr_and_not_with_x10(data_dir,
                                                                                tmp_path):
  """Measured (468 steps): x1 collapses (collapse_std x sqrt(128) 0.001, linear 65.21% and,
  in this test, 65.03%); x10 holds (0.64 / 0.65, linear 71.34% / 70.50%); random BN
  encoder 61.02%. This test passed in 12m53s on a 2-core machine shared with another job."""
  sweep_file = tmp_path / "gn_ws.py"
  sweep_file.write_text(GN_WS_SWEEP)
  real_runs.run_cli("sweep", str(sweep_file), f"--base={ABLATION}",
                    f"--workdir={tmp_path / 'sweep'}", f"--config.dataset.data_dir={data_dir}")
  random = linear_top1(ABLATION, data_dir, "random", tmp_path / "random")
  rows, spread, top1 = real_runs.sweep_results(tmp_path / "sweep")
  print(f"linear top-1 {top1}, random encoder {random:.4f}; collapse_std * sqrt(d) {spread}")
  assert all(row["status"] == "done" for row in rows.values()), rows
  assert spread["group_ws_x1"] < 0.05  # The loop's collapse threshold.
  assert spread["group_ws_x10"] > 0.3  # Measured 0.64; healthy BN runs 0.77-0.87.
  # +10.3 points measured; the base's run-to-run spread is up to 3 points.
  assert top1["group_ws_x10"] >= random + 0.05
