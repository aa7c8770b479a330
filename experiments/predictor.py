"""Ablation: remove the predictor (BYOL section 5: without it the representation collapses).

Without a predictor the online projection is regressed directly onto the target's.
"""


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [
      {"name": "with_predictor", "overrides": {"model.use_predictor": True}},
      {"name": "no_predictor", "overrides": {"model.use_predictor": False}},
  ]
