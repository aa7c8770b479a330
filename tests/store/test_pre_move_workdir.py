"""A workdir written by the flat-module layout (commit 80b3d19, before the subpackages)
resumes and loads under the current code.

tests/fixtures/workdir_pre_move was made by that commit's code: the Fashion-MNIST smoke
recipe (`configs/byol_fashion_mnist.py:smoke`) on `fakes.fashion_mnist_tfds` data,
`num_steps=2`, `checkpoint.every_steps=2` (its TensorBoard events file dropped). Its
config.json and manifest are as that code wrote them.
"""
import json
import pathlib
import shutil

import jax
import numpy as np

import fakes
from byol_jax.jobs import loop
from byol_jax.weights import pretrained

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "workdir_pre_move"


def _smoke_config(data_dir, num_steps):
  return fakes.smoke_config(data_dir, num_steps=num_steps, **{"checkpoint.every_steps": 2})


def _steps(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in rows if "loss" in r]


def test_a_pre_move_workdir_resumes_from_its_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURE, workdir)
  data_dir = fakes.fashion_mnist_tfds(tmp_path / "data")
  result = loop.pretrain(_smoke_config(data_dir, num_steps=4), str(workdir),
                         print_fn=lambda line: None)
  assert result["step"] == 4
  # Steps 1-2 come from the old code's run, 3-4 from this one: resumed at 2, not restarted.
  assert _steps(workdir) == [1, 2, 3, 4]
  assert (workdir / "checkpoints" / "4").is_dir()


def test_a_pre_move_workdir_loads_as_an_encoder():
  p = pretrained.load(str(FIXTURE))
  assert (p.model.encoder, p.step, p.channels, p.image_size) == ("resnet18", 2, 1, 28)
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(p.params)]
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
