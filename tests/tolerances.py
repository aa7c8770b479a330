"""Floating-point tolerances derived from the computation, shared by the tests.

A tolerance here is never "what one CPU gave": it is either
- an a-priori rounding bound (Higham, "Accuracy and Stability of Numerical Algorithms",
  2nd ed., ch. 2-4): one float32 operation rounds with relative error at most
  u = 2**-24 = EPS32 / 2, so k elementwise operations on values of size s are off by at
  most about k u s; we count in EPS32 (one ulp at 1.0), which leaves a factor 2 of
  margin. A sum of n terms, in any order (sequential, pairwise, split over devices), is
  off by at most (n - 1) u sum|x_i| / (1 - (n - 1) u) <= `ulps(n, sum|x_i|)`;
  a dot product is the sum of its products. bfloat16 keeps 8 significant bits: relative
  rounding BF16_U = 2**-8 per rounding;
- or a float64 reference of the same computation: a float32 variant (another device count,
  another program) must be no less accurate against it than the float32 baseline, up to a
  small factor (`assert_no_less_accurate`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.training import augment

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23: one float32 ulp at 1.0 (u = EPS32 / 2).
BF16_U = 2.0**-8  # Unit roundoff of bfloat16 (8 significant bits).

# How much less accurate than a float32 baseline a float32 variant of the same maths may be
# (`assert_no_less_accurate`). Their worst-case bounds are the same (a sum split over devices
# or reordered has the same (n - 1) u sum|x_i| bound); their actual errors are independent
# draws of rounding noise, and the ratio of the maxima of two such draws over a leaf of a few
# values is heavy-tailed: measured up to 4.4 (median 1) over 8 batch pairs x 482 leaves of
# the BYOL update on 4 vs 1 devices (tests/training/test_train.py). 8 leaves a factor ~2 over that;
# the bugs these comparisons exist for (a missing pmean, per-device statistics, a wrong
# formula) give ratios over 1e3.
NOISE_FACTOR = 8
# The floor under the baseline's error, in ulps of the largest value of the leaf's module:
# the rounding noise of a float32 sum of n terms is about sqrt(n) ulps of its scale, and the
# computations compared here sum from ~30 to ~1000 terms per value (sqrt: 6 to 30). It holds
# leaves whose exact value is 0 or tiny (a bias before batch norm: pure cancellation) and
# baselines that happen to round to ~0 error.
NOISE_FLOOR_ULPS = 16
# The float64 reference must be a run of the same computation: the baseline must agree with
# it to 1e-3 of the largest value of the whole tree compared (~8,000 ulps: far above float32
# rounding, even the raw-gradient noise of a bias before batch norm), or a reference of some
# other computation would loosen the check instead of failing it.
REFERENCE_AGREEMENT = 1e-3


def ulps(k, scale=1.0):
  """k float32 ulps of `scale` (elementwise, float64): k roundings of values of size |scale|."""
  return k * EPS32 * np.abs(np.asarray(scale, np.float64))


def assert_close(actual, expected, bound, err_msg=""):
  """|actual - expected| <= bound elementwise (bound broadcasts), compared in float64.

  Equal infinities and NaNs in the same places count as equal.
  """
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  bound = np.broadcast_to(np.asarray(bound, np.float64), np.broadcast_shapes(a.shape, e.shape))
  assert a.shape == e.shape or a.size == e.size == 1 or e.ndim == 0, (a.shape, e.shape, err_msg)
  same = (a == e) | (np.isnan(a) & np.isnan(e))
  err = np.where(same, 0.0, np.abs(a - e))
  bad = ~(err <= bound)
  if np.any(bad):
    i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), bad.shape)
    raise AssertionError(
        f"{err_msg}: {int(bad.sum())} of {bad.size} elements off by more than the bound; "
        f"worst at {tuple(int(j) for j in i)}: actual {a[i] if a.ndim else a}, expected "
        f"{e[i] if e.ndim else e}, error {err[i]:.3g} > bound {bound[i]:.3g}")


def assert_trees_close(actual, expected, bound):
  """`assert_close` leaf by leaf; `bound` is a tree like `expected`, or a function of the
  expected leaf that gives its bound."""
  if callable(bound):
    bound = jax.tree_util.tree_map(bound, expected)
  jax.tree_util.tree_map_with_path(
      lambda path, a, e, b: assert_close(a, e, b, jax.tree_util.keystr(path)),
      actual, expected, bound)


def float64(tree):
  """The tree on the host with floating leaves in float64 (integer and bool leaves as they are)."""
  def cast(x):
    x = np.asarray(x)
    return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
  return jax.tree_util.tree_map(cast, tree)


def max_error(actual, reference) -> float:
  """max |actual - reference| over the array, in float64 (0 for an empty array)."""
  a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(a - r))) if r.size else 0.0


def module_scales(reference):
  """Per leaf: max |value| over the leaf and its siblings (the leaves of its Haiku module:
  same path but the last key); a top-level leaf is its own group. Floating leaves only."""
  flat = jax.tree_util.tree_flatten_with_path(reference)[0]
  group = lambda path: path[:-1] if len(path) > 1 else path  # noqa: E731
  scales = {}
  for path, x in flat:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and x.size:
      key = group(path)
      scales[key] = max(scales.get(key, 0.0), float(np.max(np.abs(x))))
  return {jax.tree_util.keystr(p): scales.get(group(p), 0.0) for p, _ in flat}


def assert_no_less_accurate(variant, baseline, reference, factor=NOISE_FACTOR,
                             floor_ulps=NOISE_FLOOR_ULPS):
  """Leaf by leaf: err(variant) <= factor * max(err(baseline), floor).

  err is the max absolute difference from `reference`, a float64 run of the same
  computation; `baseline` is the float32 computation whose accuracy is taken as what float32
  achieves here, and `variant` the float32 computation under test (e.g. another device
  count). floor = floor_ulps EPS32 times the largest |value| of the leaf's module
  (`module_scales`): rounding in a layer is relative to the layer's values, so a leaf whose
  exact value is 0 or tiny (a bias before batch norm gets a gradient of pure cancellation)
  is held to the module's rounding level, not to its own noise. Integer and bool leaves must
  be equal in all three, and the baseline within REFERENCE_AGREEMENT of the reference (of
  the largest |value| in it).
  """
  scales = module_scales(reference)
  whole = max(scales.values(), default=0.0)

  def check(path, v, b, r):
    key = jax.tree_util.keystr(path)
    name = key or "value"
    v, b, r = np.asarray(v), np.asarray(b), np.asarray(r)
    if not np.issubdtype(r.dtype, np.floating):
      assert np.array_equal(v, r) and np.array_equal(b, r), f"{name}: {v} / {b} != {r}"
      return
    err_v, err_b = max_error(v, r), max_error(b, r)
    assert err_b <= REFERENCE_AGREEMENT * whole, (
        f"{name}: the float32 baseline is {err_b:.3g} off its float64 reference (largest value "
        f"{whole:.3g}): the reference does not compute the same thing")
    floor = floor_ulps * EPS32 * scales[key]
    limit = factor * max(err_b, floor)
    assert err_v <= limit, (
        f"{name}: max error {err_v:.3g} against float64 > {factor} x max(baseline error "
        f"{err_b:.3g}, floor {floor:.3g}) = {limit:.3g}")

  jax.tree_util.tree_map_with_path(check, variant, baseline, reference)


def augment_in_float32(images, keys, view_cfg):
  """The default augmentation traced with x64 off inside the float64 program: the same
  random draws (x64 would draw float64 uniforms from other bits) and float32 views as the
  float32 runs; the network then computes in float64."""
  with jax.enable_x64(False):
    views = augment.augment_view(images, keys, view_cfg)
  return views.astype(jnp.float64)
