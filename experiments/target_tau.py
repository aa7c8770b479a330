"""Ablation: the target network's decay rate tau (BYOL Table 5a).

tau_base 0.999 / 0.99 / 0.9 use the paper's cosine schedule (tau rises from tau_base to 1).
The two ends use a constant tau, because a cosine schedule would move them:
  tau = 1: the target never moves, a constant random network. With target.init='copy'
    it is the online network's own initialisation; 'separate' draws it independently
    (both are "a constant random network"; the pair shows whether sharing the init matters).
  tau = 0: the target is the online network of the previous step (stop-gradient only).
Every run sets all three target fields, so the sweep gives the same runs on any recipe.
"""


def _target(tau_base: float, schedule: str, init: str = "copy") -> dict:
  return {"target.tau_base": tau_base, "target.schedule": schedule, "target.init": init}


def get_sweep() -> list[dict]:
  """The runs: [{'name': str, 'overrides': {dotted config field: value}}]."""
  return [
      {"name": "tau_1", "overrides": _target(1.0, "constant")},
      {"name": "tau_1_separate_init", "overrides": _target(1.0, "constant", "separate")},
      {"name": "tau_0.999", "overrides": _target(0.999, "cosine")},
      {"name": "tau_0.99", "overrides": _target(0.99, "cosine")},
      {"name": "tau_0.9", "overrides": _target(0.9, "cosine")},
      {"name": "tau_0", "overrides": _target(0.0, "constant")},
  ]
