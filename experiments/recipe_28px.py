"""A recipe for 28-px images within ~15 CPU minutes (not a paper ablation): one-at-a-time
changes to the README main recipe with the predictor's learning rate x10, on a 1-epoch base.

Base: `configs/byol_fashion_mnist.py` (ResNet-18 width 1/2, ImageNet stem, batch 128,
tau_base 0.96) with `--config.num_epochs=1 --config.optim.predictor_lr_multiplier=10`
(468 steps). Runs:
- `ref`: the base as is.
- `width_1`: width 1 (512-d representation instead of 256-d; ~2-3x the cost per image).
- `batch_64`: batch 64 (twice the updates for the same images; the learning rate scales
  with the batch as in the paper, lr = base_lr x batch / 256).
- `base_lr_2`: base_lr 2.0 (the recipe's 1.0 was chosen with the predictor's lr x1).
- `tau_0.99`: tau_base 0.99 (the recipe's 0.96 was chosen with the predictor's lr x1).
- `crop_0.5`: random crops of at least 50% of the image (recipe: 35%).
Command, figures and wall times: experiments/README.md, "Recipe search for 28-px images".
"""

RUNS = {
    "ref": {},
    "width_1": {"model.width": 1.0},
    "batch_64": {"batch_size": 64},
    "base_lr_2": {"optim.base_lr": 2.0},
    "tau_0.99": {"target.tau_base": 0.99},
    "crop_0.5": {"augment.crop_area_min": 0.5},
}


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [{"name": name, "overrides": dict(overrides)} for name, overrides in RUNS.items()]
