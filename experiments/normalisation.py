"""Ablation: normalisation layers (Richemond et al. 2020, "BYOL works even without batch statistics").

model.norm applies to the encoder and to the hidden layer of both MLP heads:
'batch' (cross-replica BatchNorm, the paper), 'none' (no normalisation: collapses with the
default init) and 'group_ws' (GroupNorm + Weight Standardisation, no batch statistics).
"""

NORMS = ("batch", "none", "group_ws")


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [{"name": f"norm_{norm}", "overrides": {"model.norm": norm}} for norm in NORMS]
