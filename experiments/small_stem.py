"""Encoder shape for 28-px images (not a paper ablation): stems that keep more resolution,
and the predictor's learning rate, on a short Fashion-MNIST base.

The recipe's ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) takes 28 px to 7 px
before the first block, so the last stage of ResNet-18 works on 1x1 maps. Runs here:
- `imagenet_x1`: the base as is (ImageNet stem, predictor lr x1), the reference.
- `imagenet_x10`: the predictor's learning rate x10 (optim.predictor_lr_multiplier).
- `small_s2_x10`: the 'small_s2' stem (3x3 stride-2 conv, no max-pool: 28 -> 14 px before
  the first block; about 4x the ImageNet stem's encoder FLOPs per image at the same width)
  with the predictor's learning rate x10.
Measured on `configs/byol_fashion_mnist.py:ablation` (width 1/4) with
`--config.num_epochs=0.5` (234 steps of batch 128), seed 0; figures, images/s and
commands in experiments/README.md ("Recipe search for 28-px images"). The stride-1 'small' stem (28 px into the first
block, ~16x the ImageNet stem's cost) is left out: too slow for a 15-minute CPU recipe.
"""

RUNS = {
    "imagenet_x1": {"model.stem": "imagenet", "optim.predictor_lr_multiplier": 1.0},
    "imagenet_x10": {"model.stem": "imagenet", "optim.predictor_lr_multiplier": 10.0},
    "small_s2_x10": {"model.stem": "small_s2", "optim.predictor_lr_multiplier": 10.0},
}


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [{"name": name, "overrides": dict(overrides)} for name, overrides in RUNS.items()]
