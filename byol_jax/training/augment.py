"""On-device image augmentations of BYOL: flip, colour jitter, grayscale, blur, solarize.

They run inside the pmapped train step on the crops the host made (data.py). Each example
has its own PRNG key and the batch is vectorised with `jax.vmap`. The single-image ops are
pure functions of their own (image_ops.py). Semantics follow the paper (Table 6) and,
where it is silent, the authors' release: colour jitter in a random order with a clip to
[0, 1] after each op, grayscale drawn independently of the jitter, a separable Gaussian blur
with zero padding, solarize, then a final clip.

Per-view parameters come from `config.view_preset` (fields `VIEW_FIELDS`); they are Python
constants at trace time, so an op whose probability is 0 is not traced at all.
"""
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.training import image_ops

# Colour-jitter op ids, indices of `JitterParams.position`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """The augmentation parameters of one view (the fields of `config.view_preset`)."""
  flip_prob: float
  color_jitter_prob: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_prob: float
  blur_prob: float
  blur_sigma_min: float
  blur_sigma_max: float
  blur_kernel_fraction: float
  solarize_prob: float
  solarize_threshold: float


VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ViewConfig))


def view_config(view_cfg: Mapping[str, Any] | ViewConfig) -> ViewConfig:
  """Reads and checks a view's fields from a ConfigDict or mapping.

  Raises:
    ValueError: naming a missing field or a value out of its range.
  """
  if isinstance(view_cfg, ViewConfig):
    return view_cfg
  missing = [f for f in VIEW_FIELDS if f not in view_cfg]
  if missing:
    raise ValueError(f"augmentation view config lacks fields {missing}; it needs all of "
                     f"{list(VIEW_FIELDS)} (see byol_jax.config.view_preset).")
  v = ViewConfig(**{f: float(view_cfg[f]) for f in VIEW_FIELDS})
  bounds = {f: (0.0, 1.0) for f in VIEW_FIELDS if f.endswith("_prob")}
  bounds.update(brightness=(0.0, 1.0), contrast=(0.0, 1.0), saturation=(0.0, 1.0),
                hue=(0.0, 0.5), blur_kernel_fraction=(0.0, 1.0))
  for f, (low, high) in bounds.items():
    if not low <= getattr(v, f) <= high:
      kind = "a probability" if f.endswith("_prob") else "a value"
      raise ValueError(f"augment view field {f}={getattr(v, f)} must be {kind} in "
                       f"[{low}, {high}].")
  if not 0.0 < v.blur_sigma_min <= v.blur_sigma_max:
    raise ValueError(f"augment view blur sigma range [{v.blur_sigma_min}, "
                     f"{v.blur_sigma_max}] must satisfy 0 < blur_sigma_min <= blur_sigma_max.")
  return v


# ---------------------------------------------------------------------------------------
# Colour jitter in a random order.

class JitterParams(NamedTuple):
  """One image's colour-jitter draw (scalars, or [B, ...] when vmapped).

  position: int32 [4], a permutation; position[op] is the step (0..3) at which op id
    (BRIGHTNESS, CONTRAST, SATURATION, HUE) runs, so argsort(position) is the order.
  """
  position: Array
  brightness_delta: Array
  contrast_factor: Array
  saturation_factor: Array
  hue_delta: Array


def jitter_params_from_uniform(u: Array, brightness: float, contrast: float,
                               saturation: float, hue: float) -> JitterParams:
  """Colour-jitter parameters from 8 uniforms in [0, 1) (4 for the order, 4 for values).

  Positions are the ranks of the first 4 uniforms (ties broken by index): a uniform
  permutation, without a sort (a sort per example costs compile time under vmap).
  Brightness delta is uniform in [-b, b], contrast and saturation factors in [1-c, 1+c],
  hue delta in [-h, h].
  """
  ids = jnp.arange(4)
  earlier = (u[None, :4] < u[:4, None]) | ((u[None, :4] == u[:4, None]) &
                                           (ids[None, :] < ids[:, None]))
  signed = 2.0 * u[4:8] - 1.0
  return JitterParams(jnp.sum(earlier, axis=1, dtype=jnp.int32), signed[0] * brightness,
                      1.0 + signed[1] * contrast, 1.0 + signed[2] * saturation,
                      signed[3] * hue)


def sample_jitter_params(key: Array, brightness: float, contrast: float, saturation: float,
                         hue: float) -> JitterParams:
  """Draws a colour-jitter order and strengths from one key (see jitter_params_from_uniform)."""
  return jitter_params_from_uniform(jax.random.uniform(key, (8,)), brightness, contrast,
                                    saturation, hue)


def _rgb_slot(x: Array, params: JitterParams, chosen: Mapping[int, Array]) -> Array:
  out = x
  if BRIGHTNESS in chosen:
    bright = jnp.clip(image_ops.adjust_brightness(x, params.brightness_delta), 0.0, 1.0)
    out = jnp.where(chosen[BRIGHTNESS], bright, out)
  if CONTRAST in chosen:
    contrasted = jnp.clip(image_ops.adjust_contrast(x, params.contrast_factor), 0.0, 1.0)
    out = jnp.where(chosen[CONTRAST], contrasted, out)
  return out


def _hsv_slot(x: Array, params: JitterParams, chosen: Mapping[int, Array]) -> Array:
  if len(chosen) == 1:  # The only HSV op runs here: no choice to make.
    op, = chosen
    if op == SATURATION:
      return jnp.clip(image_ops.adjust_saturation(x, params.saturation_factor), 0.0, 1.0)
    return jnp.clip(image_ops.adjust_hue(x, params.hue_delta), 0.0, 1.0)
  # One round trip serves either op: the other one's parameter is its identity value.
  is_sat = chosen[SATURATION]
  factor = jnp.where(is_sat, params.saturation_factor, 1.0)
  delta = jnp.where(is_sat, 0.0, params.hue_delta)
  return jnp.clip(image_ops.adjust_hsv(x, factor, delta), 0.0, 1.0)


def apply_color_jitter(image: Array, params: JitterParams,
                       ops: Sequence[str] = JITTER_OPS) -> Array:
  """Applies the ops named in `ops` in their drawn order, clipping to [0, 1] after each.

  Ops left out of `ops` are skipped (they are identities when their strength is 0).
  Saturation and hue are skipped for 1-channel images.

  Under vmap a data-dependent order cannot branch, so a naive version runs every op at
  every position (8 RGB->HSV->RGB round trips). Here each HSV op gets one slot, in order,
  and the cheap RGB ops (brightness, contrast) that fall in each gap around them are
  selected per slot: 2 round trips for any order, same result.

  Args:
    image: float [H, W, C], C in {1, 3}, values in [0, 1].
    params: from `sample_jitter_params`.
    ops: static names from JITTER_OPS to apply.

  Returns:
    float [H, W, C] in [0, 1].
  """
  unknown = set(ops) - set(JITTER_OPS)
  if unknown:
    raise ValueError(f"unknown colour-jitter ops {sorted(unknown)}; valid: {list(JITTER_OPS)}.")
  rgb_ops = [o for o in (BRIGHTNESS, CONTRAST) if JITTER_OPS[o] in ops]
  hsv_ops = [o for o in (SATURATION, HUE) if JITTER_OPS[o] in ops and image.shape[-1] == 3]
  rgb_plan, hsv_plan = _jitter_plan(params.position, rgb_ops, hsv_ops)
  x = image
  for gap in range(len(hsv_ops) + 1):
    for rank in range(len(rgb_ops)):
      x = _rgb_slot(x, params, {o: rgb_plan[gap, rank, i] for i, o in enumerate(rgb_ops)})
    if gap < len(hsv_ops):
      x = _hsv_slot(x, params, {o: hsv_plan[gap, i] for i, o in enumerate(hsv_ops)})
  return x


def _jitter_plan(position: Array, rgb_ops: Sequence[int], hsv_ops: Sequence[int]):
  """Which op runs in which slot of `apply_color_jitter`.

  Returns:
    rgb_plan: bool [len(hsv_ops) + 1, len(rgb_ops), len(rgb_ops)]; [gap, rank, i] is true
      when rgb_ops[i] is the rank-th RGB op after `gap` HSV ops have run.
    hsv_plan: bool [len(hsv_ops), len(hsv_ops)]; [slot, i] is true when hsv_ops[i] is the
      slot-th HSV op to run.
  """
  pos_rgb = position[np.asarray(rgb_ops, np.int32)]
  pos_hsv = position[np.asarray(hsv_ops, np.int32)]
  hsv_slot = jnp.sum(pos_hsv[None, :] < pos_hsv[:, None], axis=1)
  gap = jnp.sum(pos_hsv[None, :] < pos_rgb[:, None], axis=1)
  rank = jnp.sum((gap[None, :] == gap[:, None]) & (pos_rgb[None, :] < pos_rgb[:, None]), axis=1)
  rgb_plan = ((gap == np.arange(len(hsv_ops) + 1)[:, None, None]) &
              (rank == np.arange(len(rgb_ops))[None, :, None]))
  hsv_plan = hsv_slot == np.arange(len(hsv_ops))[:, None]
  return rgb_plan, hsv_plan


def color_jitter(image: Array, key: Array, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Array:
  """Random-order colour jitter of one image [H, W, C] in [0, 1]; returns [H, W, C]."""
  params = sample_jitter_params(key, brightness, contrast, saturation, hue)
  return apply_color_jitter(image, params, _enabled(brightness, contrast, saturation, hue))


def _enabled(*strengths: float) -> list[str]:
  # A jitter op of strength 0 is the identity: skip it statically.
  return [name for name, strength in zip(JITTER_OPS, strengths) if strength > 0]


# ---------------------------------------------------------------------------------------
# The per-view pipeline.

class ViewDraws(NamedTuple):
  """One image's random draws: which ops apply (bool scalars) and their parameters."""
  flip: Array
  color_jitter: Array
  grayscale: Array
  blur: Array
  solarize: Array
  jitter: JitterParams
  blur_sigma: Array


def sample_view_draws(key: Array, view: ViewConfig) -> ViewDraws:
  """Draws every random choice of one image's augmentation from its key.

  One call to the generator serves all draws (each threefry call adds compile time under
  vmap). The draws do not depend on which ops are enabled, so turning one op off leaves
  the others' randomness unchanged.
  """
  u = jax.random.uniform(key, (14,))
  # u in [0, 1): `u < p` is never true for p = 0 and always for p = 1.
  applied = u[:5] < jnp.asarray([view.flip_prob, view.color_jitter_prob, view.grayscale_prob,
                                 view.blur_prob, view.solarize_prob], jnp.float32)
  jitter = jitter_params_from_uniform(u[5:13], view.brightness, view.contrast,
                                      view.saturation, view.hue)
  sigma = view.blur_sigma_min + (view.blur_sigma_max - view.blur_sigma_min) * u[13]
  return ViewDraws(applied[0], applied[1], applied[2], applied[3], applied[4], jitter, sigma)


def _maybe(prob: float, applied: Array, fn: Callable[[Array], Array], x: Array) -> Array:
  # prob is a Python constant: 0 traces nothing, 1 needs no select.
  if prob <= 0.0:
    return x
  if prob >= 1.0:
    return fn(x)
  return jnp.where(applied, fn(x), x)


def apply_view(image: Array, draws: ViewDraws, view: ViewConfig) -> Array:
  """Flip -> colour jitter -> grayscale -> blur -> solarize -> clip, per `draws`.

  Args:
    image: float32 [H, W, C], C in {1, 3}, values in [0, 1].
    draws: from `sample_view_draws` (one image's, not batched).
    view: the view's parameters.

  Returns:
    float32 [H, W, C] in [0, 1].
  """
  ops = _enabled(view.brightness, view.contrast, view.saturation, view.hue)
  x = _maybe(view.flip_prob, draws.flip, image_ops.flip_left_right, image)
  if ops:
    x = _maybe(view.color_jitter_prob, draws.color_jitter,
               lambda y: apply_color_jitter(y, draws.jitter, ops), x)
  x = _maybe(view.grayscale_prob, draws.grayscale, image_ops.to_grayscale, x)
  kernel_size = image_ops.blur_kernel_size(image.shape[0], view.blur_kernel_fraction)
  if kernel_size > 1:  # A 1-tap kernel is the identity.
    x = _maybe(view.blur_prob, draws.blur,
               lambda y: image_ops.gaussian_blur(y, draws.blur_sigma, kernel_size), x)
  x = _maybe(view.solarize_prob, draws.solarize,
             lambda y: image_ops.solarize(y, view.solarize_threshold), x)
  return jnp.clip(x, 0.0, 1.0)


def to_unit_range(images: Array) -> Array:
  """uint8 [0, 255] -> float32 [0, 1]; floats are taken as already in [0, 1] (float32)."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _check_batch(images: Array, keys: Array) -> None:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, C] with C in (1, 3); got shape "
                     f"{tuple(images.shape)}.")
  if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
    raise ValueError(f"images must be uint8 (0..255) or float in [0, 1]; got {images.dtype}.")
  typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
  want_ndim = 1 if typed else 2
  if keys.ndim != want_ndim or keys.shape[0] != images.shape[0]:
    raise ValueError(f"keys must hold one PRNG key per example, shaped [{images.shape[0]}, 2] "
                     f"(jax.random.split(key, {images.shape[0]})); got shape "
                     f"{tuple(keys.shape)}.")


def augment_view(images: Array, keys: Array, view_cfg: Mapping[str, Any] | ViewConfig) -> Array:
  """Augments a batch of crops for one view, each example with its own key.

  Args:
    images: [B, H, W, C], C in {1, 3}; uint8 in 0..255 or float in [0, 1].
    keys: [B, 2] uint32 (or [B] typed) PRNG keys, one per example.
    view_cfg: the view's fields (`config.view_preset(1|2)`, or `augment.view1/2`); Python
      constants, read at trace time.

  Returns:
    float32 [B, H, W, C] in [0, 1], without gradient.
  """
  view = view_config(view_cfg)
  images = jnp.asarray(images)
  keys = jnp.asarray(keys)
  _check_batch(images, keys)
  images = to_unit_range(images)
  out = jax.vmap(lambda image, key: apply_view(image, sample_view_draws(key, view), view))(
      images, keys)
  return jax.lax.stop_gradient(out)
