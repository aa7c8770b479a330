"""Helpers of the slow tests that run the real command line on the real Fashion-MNIST."""
import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

from byol_jax.data import prepare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def prepared_fashion_mnist(tmp_path_factory) -> str:
  """Debian's Fashion-MNIST idx files prepared as a tfds data set in a fresh folder."""
  if not os.path.isdir(prepare.FASHION_MNIST_DIR):
    pytest.fail(f"{prepare.FASHION_MNIST_DIR} is missing: run `bash scripts/setup.sh` as root "
                "(it installs Debian's dataset-fashion-mnist).")
  out = str(tmp_path_factory.mktemp("tfds"))
  prepare.prepare_fashion_mnist(prepare.FASHION_MNIST_DIR, out)
  return out


def run_cli(*args, timeout=3600):
  """The byol-jax command as a user runs it: 1 CPU device and XLA's normal optimisation
  (the fast-compile flags tests/conftest.py sets would slow a long run down)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "byol_jax", *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  print(proc.stdout[-3000:], proc.stderr[-3000:])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def sweep_results(workdir, projector_out: int = 128):
  """A finished sweep's results.csv: (rows by name, collapse_std x sqrt(projector_out),
  linear top-1). collapse_std is the per-dimension std of the l2-normalised online
  projection: about 1/sqrt(projector_out) when the batch is spread out, 0 for a constant
  output."""
  with open(workdir / "results.csv") as f:
    rows = {row["name"]: row for row in csv.DictReader(f)}
  spread = {name: float(row["collapse_std"]) * math.sqrt(projector_out)
            for name, row in rows.items()}
  top1 = {name: float(row["linear_top1"]) for name, row in rows.items()}
  return rows, spread, top1
