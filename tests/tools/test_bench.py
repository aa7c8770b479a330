"""Tests of bench.py and bench_memory.py: the step benchmark's figures and parts; the memory
benchmark (XLA's per-device figures of the compiled update), the batch search against a
budget, and donation of the old state's buffers.

One UpdateMemory (the smoke recipe at 16 px, 4 fake devices) is shared by all tests so
each per-device batch size is compiled once.
"""
import pathlib

import jax
import numpy as np
import pytest

import fakes
from byol_jax.tools import bench
from byol_jax.tools import bench_memory
from byol_jax import parallel
from byol_jax.training import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHANNELS = 1
SIZE = 16


@pytest.fixture(scope="module")
def analyse():
  c = fakes.recipe("byol_fashion_mnist", "smoke")
  c.unlock()
  c.image_size = SIZE
  return bench_memory.UpdateMemory(c, CHANNELS)


def test_bytes_grow_with_batch_by_the_batch_arguments(analyse):
  small, large = analyse(2), analyse(4)
  assert large["temp_bytes"] > small["temp_bytes"] > 0
  # Arguments are state + batch + key: two more examples add two uint8 views and labels.
  extra = 2 * (2 * SIZE * SIZE * CHANNELS + 4)
  assert large["argument_bytes"] - small["argument_bytes"] == extra
  assert large["batch_bytes"] - small["batch_bytes"] == extra
  # The update donates its state: every output but the metrics is written into it.
  state_bytes = sum(int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize
                    for x in jax.tree_util.tree_leaves(analyse.state_shapes))
  assert small["alias_bytes"] == state_bytes
  assert small["total_bytes"] == (small["argument_bytes"] + small["output_bytes"] -
                                  small["alias_bytes"] + small["temp_bytes"] +
                                  2 * small["batch_bytes"])


def test_reported_largest_batch_fits_and_next_power_of_two_does_not(analyse):
  budget = (analyse(2)["total_bytes"] + analyse(4)["total_bytes"]) // 2
  # resolution=2 stops the bisection before batch 3 (one compile fewer).
  found = bench_memory.largest_fitting_batch(lambda b: analyse(b)["total_bytes"], budget, start=2,
                                      resolution=2)
  largest = found["largest"]
  assert (largest, found["smallest_failing"]) == (2, 4)
  assert analyse(largest)["total_bytes"] <= budget
  next_power = 1 << largest.bit_length()
  assert analyse(next_power)["total_bytes"] > budget


@pytest.mark.parametrize("budget, start, largest, failing", [
    (100, 8, 100, 101),  # Doubling 8 -> 128, then bisection to the exact bound.
    (100, 300, 100, 101),  # Start above the budget: halving, then bisection.
    (0, 4, 0, 1),  # Nothing fits.
])
def test_search_finds_the_bound_of_a_linear_cost(budget, start, largest, failing):
  found = bench_memory.largest_fitting_batch(lambda b: b, budget, start=start, resolution=1)
  assert (found["largest"], found["smallest_failing"]) == (largest, failing)


def test_search_stops_at_its_evaluation_cap():
  calls = []
  found = bench_memory.largest_fitting_batch(lambda b: calls.append(b) or 0, 10, start=1,
                                      max_evaluations=5)
  assert len(calls) == found["evaluations"] == 5 and found["smallest_failing"] is None
  assert found["largest"] == 16


def test_update_deletes_the_old_state_buffers(analyse):
  analyse(2)  # Compiles the update at per-device batch 2 (or reuses the compile).
  compiled = analyse.compiled[2]  # The executable the figures describe.
  c, deps = analyse.c, analyse.deps
  state = parallel.replicate(train.init_state(c, deps, jax.random.PRNGKey(0), CHANNELS))
  rng = np.random.default_rng(0)
  shape = (jax.local_device_count(), 2, SIZE, SIZE, CHANNELS)
  batch = parallel.shard(dict(view1=rng.integers(0, 256, shape, np.uint8),
                              view2=rng.integers(0, 256, shape, np.uint8),
                              label=np.zeros(shape[:2], np.int32)))
  old = jax.tree_util.tree_leaves(state)
  new_state, _ = compiled(state, batch, jax.random.PRNGKey(1))
  assert all(x.is_deleted() for x in old)
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new_state))
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(batch))


def test_memory_benchmark_reports_the_saved_activations_of_its_batch(analyse):
  # A budget nothing reaches and one compile: the configured batch only (cached above).
  figures = bench_memory.memory_benchmark(analyse.c, budget_gb=1e6, channels=CHANNELS, max_compiles=1)
  per_device = figures["per_device_batch"]
  assert figures["compiles"] == 1 and figures["largest_per_device_batch"] == per_device
  saved = bench_memory.saved_activations(analyse.c, per_device, CHANNELS)
  assert {k: figures[k] for k in saved} == saved
  assert saved["saved_activation_bytes_float32"] > 0 == saved["saved_activation_bytes_bfloat16"]
  assert figures["saved_activation_gb"] == round(saved["saved_activation_bytes"] / 1024**3, 4)


def test_step_benchmark_parts_add_up_to_the_step(analyse):
  """The step bench on the smoke recipe: its ratios come from its own medians, and the
  parts timed alone (optimiser + EMA, augmentation) leave the heads' remainder."""
  figures = bench.step_benchmark(analyse.c, steps=1, rounds=1, channels=CHANNELS)
  step, encoder = figures["step_ms"], figures["baseline_step_ms"]
  assert step > 0 and encoder > 0
  assert figures["optimizer_ema_ms"] > 0 and figures["augment_ms"] > 0
  # Not float rounding but the figures' decimal rounding: times to 0.01 ms (+-h = 0.005),
  # ratios to 1e-4 (+-5e-5). A ratio a / b of times each off by h moves by at most
  # h (1 + a / b) / (b - h); a difference of 4 times, 4 h, and its own rounding, h.
  h = 0.005
  ratio_bound = lambda a, b: 5e-5 + h * (1 + a / b) / (b - h)  # noqa: E731
  assert abs(figures["overhead_ratio"] - step / encoder) <= ratio_bound(step, encoder)
  assert abs(figures["non_encoder_share"] - (1 - encoder / step)) <= ratio_bound(encoder, step)
  rest = step - encoder - figures["optimizer_ema_ms"] - figures["augment_ms"]
  assert abs(figures["heads_loss_rest_ms"] - rest) <= 5 * h + 1e-9  # + float64 rounding.
  # Counted on the compiled update: a logged step adds the monitors' all-reduces.
  assert figures["collective_bytes_logged"] > figures["collective_bytes"] > 0
