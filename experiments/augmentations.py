"""Ablation: removing image augmentations (BYOL Figure 3b).

The random resized crop runs on the host and is always on; the other five ops have a
probability per view (config.view_preset), and a removal sets it to 0 in both views:
  no_grayscale     grayscale off.
  no_color         colour jitter and grayscale off ("remove colour" in the paper).
  crop_blur_only   flip, colour jitter, grayscale and solarize off; blur as the recipe.
  crop_color_only  flip, blur and solarize off; colour jitter and grayscale as the recipe.
  crop_only        all five off.
Flip counts as an augmentation of its own (the paper ablates it separately), so the
"only" runs drop it. Kept ops keep the recipe's probabilities (e.g. byol_cifar10.py has
blur off, so there crop_blur_only equals crop_only).
"""

OPS = ("flip", "color_jitter", "grayscale", "blur", "solarize")


def _without(*ops: str) -> dict:
  return {f"augment.{view}.{op}_prob": 0.0 for view in ("view1", "view2") for op in ops}


def _only(*kept: str) -> dict:
  return _without(*[op for op in OPS if op not in kept])


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [
      {"name": "baseline", "overrides": {}},
      {"name": "no_grayscale", "overrides": _without("grayscale")},
      {"name": "no_color", "overrides": _without("color_jitter", "grayscale")},
      {"name": "crop_blur_only", "overrides": _only("blur")},
      {"name": "crop_color_only", "overrides": _only("color_jitter", "grayscale")},
      {"name": "crop_only", "overrides": _only()},
  ]
