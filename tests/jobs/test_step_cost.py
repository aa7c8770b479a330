"""What a step costs besides BYOL's maths: monitors read on logged steps only (the collapse
guard from sparse readings) and the profiler switch. The collectives of the compiled
update are pinned in training/test_train.py, next to the tiny config they are counted on."""
import pathlib

import jax
import jax.numpy as jnp
import pytest

import fakes
from byol_jax import config as config_lib
from byol_jax.jobs import health
from byol_jax.jobs import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _guards(**kw):
  args = dict(max_nonfinite=3, collapse_threshold=0.05, collapse_patience=100,
              stop_on_collapse=True)
  args.update(kw)
  return health.Guards(**args)


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
  with pytest.raises(health.CollapseError, match="101 steps .*step 150"):
    g.check(150, COLLAPSED, 16)


def test_a_healthy_reading_resets_and_unmonitored_steps_never_count():
  g = _guards(collapse_patience=2)
  g.check(1, COLLAPSED, 16)
  g.check(2, HEALTHY, 16)
  for step in range(3, 50):
    g.check(step, UNMONITORED, 16)
  assert g.collapsed_steps == 0 and not g.warned


def test_profile_steps_must_be_a_window_from_step_one():
  c = config_lib.base_config()
  for bad in [(0, 3), (5, 2), (1,), (1.5, 2)]:
    c.profile.steps = bad
    with pytest.raises(ValueError, match="profile.steps"):
      config_lib.validate(c)
  c.profile.steps = (2, 2)
  config_lib.validate(c)


def _trace_files(workdir):
  traces = list(pathlib.Path(workdir, loop.PROFILE_DIR).rglob("*.xplane.pb"))
  # The layout TensorBoard's profile plugin reads: plugins/profile/<run>/<host>.xplane.pb.
  assert all(t.relative_to(pathlib.Path(workdir, loop.PROFILE_DIR)).parts[:2] ==
             ("plugins", "profile") for t in traces)
  return traces


def test_profiler_traces_its_window_only_and_copies_it_into_the_workdir(tmp_path):
  step_fn = jax.jit(lambda x: x @ x)
  x = jnp.ones((8, 8))
  with loop.Profiler(str(tmp_path), (2, 3)) as profiler:
    for step in range(1, 6):
      profiler.before(step)
      x = step_fn(x)
      profiler.after(step, x)
      if step == 1:  # Before the window: nothing written yet.
        assert not (tmp_path / loop.PROFILE_DIR).exists()
  traces = _trace_files(tmp_path)
  assert len(traces) == 1 and traces[0].stat().st_size > 0  # One trace, steps 2-3.


def test_profiler_is_off_by_default(tmp_path):
  with loop.Profiler(str(tmp_path), ()) as profiler:
    profiler.before(1)
    profiler.after(1, jnp.ones(()))
  assert not (tmp_path / loop.PROFILE_DIR).exists()


@pytest.mark.slow  # A whole pretrain (~1 min on 2 busy cores); the Profiler tests above are fast.
def test_profile_steps_write_a_trace_into_the_workdir(tmp_path):
  data_dir = fakes.fashion_mnist_tfds(tmp_path / "fmnist")
  c = fakes.recipe("byol_fashion_mnist", "smoke")
  c.unlock()
  # test_loop's 2-step run but for the profile (which changes no compiled program), so
  # the programs come from the compilation cache. The trace stops inside the run.
  fakes.set_fields(c, {"dataset.data_dir": data_dir, "dataset.num_train_examples": 64,
                       "num_steps": 2, "profile.steps": (1, 1)})
  result = loop.pretrain(config_lib.validate(c), str(tmp_path / "run"),
                         print_fn=lambda line: None)
  assert result["step"] == 2
  traces = _trace_files(tmp_path / "run")
  assert len(traces) == 1 and traces[0].stat().st_size > 0
