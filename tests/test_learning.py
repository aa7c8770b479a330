"""Proof that BYOL learns on real data (Fashion-MNIST).

Marked slow (about half an hour on 2 CPU cores): run with `pytest -m slow`. It runs the
README's pretraining command on the real Fashion-MNIST idx files from Debian's
dataset-fashion-mnist package, then the recipe's linear protocol on the frozen encoder,
and compares with the same architecture with random weights whose batch-norm statistics
were estimated on the training images (so the baseline is not crippled by untrained
moving averages).
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fakes
from byol_jax import config as config_lib
from byol_jax import data
from byol_jax import linear_eval
from byol_jax import networks
from byol_jax import pretrained
from byol_jax import sources

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_TOP1 = 0.88  # The goal for the README's CPU run (not reached yet: 79.18% measured).
MARGIN_OVER_RANDOM = 0.05


def recipe(data_dir, **overrides):
  sys.path.insert(0, str(ROOT / "configs"))
  import byol_fashion_mnist
  c = byol_fashion_mnist.get_config()
  c.unlock()
  c.dataset.data_dir = data_dir
  return config_lib.validate(fakes.set_fields(c, overrides))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not os.path.isdir(sources.FASHION_MNIST_DIR):
    pytest.fail(f"{sources.FASHION_MNIST_DIR} is missing: run `bash scripts/setup.sh` as root "
                "(it installs Debian's dataset-fashion-mnist).")
  out = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare_fashion_mnist(sources.FASHION_MNIST_DIR, out)
  return out


def random_encoder(c, batches: int = 50) -> pretrained.Pretrained:
  """Random weights; batch-norm moving statistics estimated on `batches` training batches."""
  net = networks.make_encoder_network(c.model)
  channels = data.num_channels(c)
  params, state = net.init(jax.random.PRNGKey(c.seed + 1),
                           np.zeros((2, c.image_size, c.image_size, channels), np.float32),
                           is_training=True)
  update_stats = jax.jit(lambda s, x: net.apply(params, s, None, x, is_training=True)[1])
  source = data.eval_dataset(c, c.dataset.train_split, local_device_count=1)
  for i, batch in enumerate(source):
    if i == batches:
      break
    state = update_stats(state, np.asarray(batch["image"][0], np.float32) / 255.0)
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  return pretrained.Pretrained(model=c.model, params=host(params), state=host(state),
                               image_size=c.image_size, channels=channels, step=0,
                               source="workdir")


def run_cli(*args, timeout=3600):
  """The byol-jax command as a user runs it: 1 CPU device and XLA's normal optimisation
  (the fast-compile flags tests/conftest.py sets would slow a long run down)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "byol_jax", *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  print(proc.stdout[-3000:], proc.stderr[-3000:])
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_run_reaches_target_and_beats_random_encoder(data_dir, tmp_path):
  """README's main command, then the recipe's linear protocol on its encoder and on a
  random encoder of the same architecture."""
  recipe_flags = ["--config=configs/byol_fashion_mnist.py", f"--config.dataset.data_dir={data_dir}"]
  start = time.monotonic()
  run_cli("pretrain", *recipe_flags, f"--workdir={tmp_path / 'byol'}")
  pretrain_minutes = (time.monotonic() - start) / 60
  run_cli("linear-eval", *recipe_flags, f"--pretrained={tmp_path / 'byol'}",
          f"--workdir={tmp_path / 'byol_linear'}")
  byol = json.loads((tmp_path / "byol_linear" / "results.json").read_text())["top1"]
  c = recipe(data_dir)
  random = linear_eval.run(c, random_encoder(c), str(tmp_path / "random_linear"),
                           print_fn=print)["top1"]
  print(f"linear top-1: BYOL {byol:.2%}, random encoder {random:.2%} (seed {c.seed}); "
        f"pretraining took {pretrain_minutes:.1f} min")
  assert byol >= random + MARGIN_OVER_RANDOM
  assert byol >= TARGET_TOP1
