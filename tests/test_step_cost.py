"""What a step costs besides BYOL's maths: monitors read on logged steps only (the collapse
guard from sparse readings). The collectives of the compiled update are pinned in
test_train.py, next to the tiny config they are counted on."""
import pytest

from byol_jax import loop


def _guards(**kw):
  args = dict(max_nonfinite=3, collapse_threshold=0.05, collapse_patience=100,
              stop_on_collapse=True)
  args.update(kw)
  return loop.Guards(**args)


COLLAPSED = dict(nonfinite=0.0, collapse_std=1e-5)
HEALTHY = dict(nonfinite=0.0, collapse_std=0.25)
UNMONITORED = dict(nonfinite=0.0)  # A step that is not logged: no monitor values.


def test_collapse_patience_counts_steps_between_sparse_readings():
  g = _guards()
  g.check(50, COLLAPSED, 16)  # The first reading stands for its own step only.
  for step in range(51, 100):
    g.check(step, UNMONITORED, 16)
  assert g.collapsed_steps == 1
  g.check(100, COLLAPSED, 16)  # 50 more steps: 51 < patience 100.
  assert g.collapsed_steps == 51
  with pytest.raises(loop.CollapseError, match="101 steps .*step 150"):
    g.check(150, COLLAPSED, 16)


def test_a_healthy_reading_resets_and_unmonitored_steps_never_count():
  g = _guards(collapse_patience=2)
  g.check(1, COLLAPSED, 16)
  g.check(2, HEALTHY, 16)
  for step in range(3, 50):
    g.check(step, UNMONITORED, 16)
  assert g.collapsed_steps == 0 and not g.warned
