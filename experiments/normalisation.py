"""Ablation: normalisation layers (Richemond et al. 2020, "BYOL works even without batch statistics").

model.norm applies to the encoder and to the hidden layer of both MLP heads (model.head_norm
'' follows it): 'batch' (cross-replica BatchNorm, the paper), 'none' (no normalisation:
collapses in the paper, 0.1%) and 'group_ws' (GroupNorm + Weight Standardisation of every
convolution, no batch statistics: 73.9% against BatchNorm's 74.3% in the follow-up paper,
ResNet-50, 300 ImageNet epochs).

Each norm is run twice: with the recipe's predictor learning rate (lambda = 1) and with the
predictor's updates scaled by 10 (optim.predictor_lr_multiplier, BYOL Table 5b's remedy for
collapse). Measured on the Fashion-MNIST 'ablation' base (experiments/README.md): with
lambda 1, GroupNorm + WS collapses within ~50 steps (collapse_std x sqrt(128) from 0.49 at
initialisation to 0.02), whatever the heads' norm (GroupNorm or none), GroupNorm's groups
(8 or 32), the target's tau_base (0.99 or 0.996) or the learning rate (0.1 only slows it);
with lambda 10 it dips to 0.06 by step 52, recovers to ~0.6 by step 130 and holds, and its
linear top-1 lands beside BatchNorm's. On a 10-epoch base (`--config.num_epochs=10`): x1 BN
80.69%, no norm 21.90% (collapsed), GN+WS 67.05% (collapsed); x10 BN 82.82%, no norm 80.91%,
GN+WS 79.89% (not collapsed).
"""

NORMS = ("batch", "none", "group_ws")
PREDICTOR_LR_MULTIPLIERS = (1.0, 10.0)


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  runs = []
  for multiplier in PREDICTOR_LR_MULTIPLIERS:
    for norm in NORMS:
      suffix = "" if multiplier == 1.0 else f"_predictor_lr_x{multiplier:g}"
      runs.append({"name": f"norm_{norm}{suffix}",
                   "overrides": {"model.norm": norm,
                                 "optim.predictor_lr_multiplier": multiplier}})
  return runs
