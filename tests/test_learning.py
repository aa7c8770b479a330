"""Proof that BYOL learns on real data (Fashion-MNIST).

Marked slow (about 17 minutes on 2 CPU cores): run with `pytest -m slow`. It runs the
README's pretraining command on the real Fashion-MNIST idx files from Debian's
dataset-fashion-mnist package, then the recipe's linear protocol on the frozen encoder,
and compares with the same architecture with random weights whose batch-norm statistics
were estimated on the training images (so the baseline is not crippled by untrained
moving averages).
"""
import json
import time

import pytest

import real_runs

pytestmark = pytest.mark.slow

TARGET_TOP1 = 0.88  # The goal for the README's CPU run (not reached: 81.28-81.50% measured).
MARGIN_OVER_RANDOM = 0.05


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return real_runs.prepared_fashion_mnist(tmp_path_factory)


def test_readme_run_reaches_target_and_beats_random_encoder(data_dir, tmp_path):
  """README's main command, then the recipe's linear protocol on its encoder and on a
  random encoder of the same architecture."""
  recipe_flags = ["--config=configs/byol_fashion_mnist.py", f"--config.dataset.data_dir={data_dir}"]
  start = time.monotonic()
  real_runs.run_cli("pretrain", *recipe_flags, f"--workdir={tmp_path / 'byol'}")
  pretrain_minutes = (time.monotonic() - start) / 60
  top1 = {}
  for name in ("byol", "random"):
    pretrained = tmp_path / "byol" if name == "byol" else "random"
    real_runs.run_cli("linear-eval", *recipe_flags, f"--pretrained={pretrained}",
                      f"--workdir={tmp_path / name / 'linear'}")
    top1[name] = json.loads((tmp_path / name / "linear" / "results.json").read_text())["top1"]
  byol, random = top1["byol"], top1["random"]
  print(f"linear top-1: BYOL {byol:.2%}, random encoder {random:.2%} (seed 0); "
        f"pretraining took {pretrain_minutes:.1f} min")
  assert byol >= random + MARGIN_OVER_RANDOM
  assert byol >= TARGET_TOP1
