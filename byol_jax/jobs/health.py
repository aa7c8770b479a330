"""The pretraining job's health guards: non-finite steps and representation collapse.

`Guards.check` reads each step's metrics on the host (the step computes them as global
means, so every process reaches the same verdict at the same step) and raises
NonFiniteError or CollapseError, or warns, as the config's monitor.* fields ask.
"""
import dataclasses
import math

from absl import logging


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class CollapseError(RuntimeError):
  """The collapse monitor stayed near zero and the config asks to stop."""


@dataclasses.dataclass
class Guards:
  """Host-side health counters, updated from each step's metrics."""
  max_nonfinite: int
  collapse_threshold: float  # On collapse_std * sqrt(projector_out); ~1 when healthy.
  collapse_patience: int
  stop_on_collapse: bool
  consecutive_nonfinite: int = 0
  total_nonfinite: int = 0
  collapsed_steps: int = 0
  warned: bool = False
  last_monitored: int | None = None  # The last step whose metrics held collapse_std.

  def check(self, step: int, metrics: dict, dim: int) -> None:
    """Raises NonFiniteError / CollapseError, or warns, from one step's metrics.

    The collapse monitor is computed on logged steps only: metrics without
    'collapse_std' count towards the non-finite guard alone. A collapsed reading counts
    for every step since the previous reading, so the patience stays in steps.
    """
    if metrics["nonfinite"] > 0:
      self.consecutive_nonfinite += 1
      self.total_nonfinite += 1
      logging.warning("step %d: non-finite loss or gradient; the update was skipped "
                      "(%d in a row).", step, self.consecutive_nonfinite)
      if self.consecutive_nonfinite >= self.max_nonfinite:
        raise NonFiniteError(
            f"{self.consecutive_nonfinite} consecutive non-finite steps ending at step {step}; "
            "the last checkpoint holds the last finite state. Lower optim.base_lr or check "
            "the input data, then rerun to resume.")
      return
    self.consecutive_nonfinite = 0
    if "collapse_std" not in metrics:
      return
    since = step - self.last_monitored if self.last_monitored is not None else 1
    self.last_monitored = step
    if metrics["collapse_std"] * math.sqrt(dim) < self.collapse_threshold:
      self.collapsed_steps += max(1, since)
    else:
      self.collapsed_steps, self.warned = 0, False
    if self.collapsed_steps >= self.collapse_patience and not self.warned:
      self.warned = True
      message = (f"COLLAPSE: the projections have had almost no spread for "
                 f"{self.collapsed_steps} steps (collapse_std={metrics['collapse_std']:.2e} at "
                 f"step {step}; healthy is about {1 / math.sqrt(dim):.2e}).")
      if self.stop_on_collapse:
        raise CollapseError(message + " Stopping (monitor.stop_on_collapse=True).")
      logging.error(message)
