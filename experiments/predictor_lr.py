"""Ablation: the predictor's learning-rate multiplier lambda without an EMA target (BYOL Table 5b).

The target is the online network of the previous step (tau = 0, constant schedule); the
predictor's updates are scaled by lambda (optim.predictor_lr_multiplier). The paper finds
that a faster predictor (lambda 2-20) avoids collapse even without the moving average;
lambda 0 (a frozen random predictor) and 1 collapse.
"""

MULTIPLIERS = (0.0, 1.0, 2.0, 10.0, 20.0)


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [{"name": f"lambda_{m:g}",
           "overrides": {"target.tau_base": 0.0, "target.schedule": "constant",
                         "optim.predictor_lr_multiplier": m}}
          for m in MULTIPLIERS]
