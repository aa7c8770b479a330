"""Recipe search for small grayscale images (not a paper ablation): how the paper's ImageNet
choices fare on 28-px Fashion-MNIST in a short CPU run, one change at a time.

Every run starts from the paper's choices that the Fashion-MNIST recipe later changed
(batch 256, tau_base 0.99, blur with probability 1.0 / 0.1, crops of at least 20% of the image)
and the linear protocol the runs were measured with (raw features, base rates 0.2 ... 0.01),
then changes one thing. Run on the short base `configs/byol_fashion_mnist.py:ablation`; the
measured figures are in experiments/README.md and led to configs/byol_fashion_mnist.py.
"""

PAPER = {
    "batch_size": 256,
    "target.tau_base": 0.99,
    "augment.view1.blur_prob": 1.0,
    "augment.view2.blur_prob": 0.1,
    "augment.crop_area_min": 0.2,
    "linear.standardize": False,
    "linear.learning_rates": (0.2, 0.1, 0.05, 0.02, 0.01),
}


def _run(name: str, **changes) -> dict:
  return {"name": name, "overrides": {**PAPER, **changes}}


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [
      _run("paper_choices"),
      _run("no_blur", **{"augment.view1.blur_prob": 0.0, "augment.view2.blur_prob": 0.0}),
      _run("tau_0.96", **{"target.tau_base": 0.96}),
      _run("base_lr_2", **{"optim.base_lr": 2.0}),
      _run("batch_128", batch_size=128),
      _run("crop_0.35", **{"augment.crop_area_min": 0.35}),
  ]
