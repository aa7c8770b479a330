"""bfloat16's activation memory, measured backend-independently
(bench_memory.saved_tensors), and the rematerialised norms that make it half of float32's
without changing any value.

Everything here is traced on shapes except the remat comparison, which runs one small
loss and gradient on the host (no pmap).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax.tools import bench_memory
from byol_jax import config as config_lib
from byol_jax.model import networks

PER_DEVICE = 4
SIZE = 16
CHANNELS = 3
NUM_CLASSES = 5


def tiny_config(precision: str, encoder: str = "resnet18", norm: str = "batch"):
  c = config_lib.base_config()
  c.batch_size, c.image_size, c.precision = PER_DEVICE, SIZE, precision
  c.dataset.num_classes = NUM_CLASSES
  c.model.update(dict(encoder=encoder, width=0.125, stem="small", norm=norm, gn_groups=4,
                      projector_hidden=32, projector_out=16, predictor_hidden=32))
  return config_lib.validate(c)


def without_remat_norms(monkeypatch):
  """Networks built from now on compute their norms without hk.remat (the pre-fix policy)."""
  build = networks._layers_from_config
  monkeypatch.setattr(networks, "_layers_from_config",
                      lambda *a, **k: dataclasses.replace(build(*a, **k), remat_norms=False))


def _loss_head_shapes(c) -> set:
  # The loss reads the network's float32 outputs: normalised predictions and targets
  # [b, projector_out], their norms [b, 1], the probe's softmax [b, classes].
  return {(PER_DEVICE, 1), (PER_DEVICE, c.model.projector_out), (PER_DEVICE, NUM_CLASSES)}


@pytest.mark.parametrize("encoder, norm", [("resnet50", "batch"), ("resnet18", "group_ws")])
def test_bfloat16_saves_bf16_activations_at_most_0_6x_float32s_bytes(encoder, norm):
  """bf16 keeps each saved network activation in 2 bytes instead of 4.

  With F the float32 activation bytes float32 training saves, bf16 saves at most F / 2
  of bf16 activations (the same tensors or fewer: the remat'ed norms keep only their
  input), plus what no precision changes: the ReLU masks M (bool) and the loss's float32
  per-example vectors L on the network's float32 outputs. So ratio <= 1/2 + (M + L) / 2T
  with T = F + M the float32 total. Each mask element comes with the saved 4-byte ReLU
  output it masks, so M <= F / 4 and M / T <= 1/5: ratio <= 0.6 (+ L / 2T, a few [b, 16]
  vectors, negligible).
  """
  f32 = bench_memory.saved_tensors(tiny_config("float32", encoder, norm), PER_DEVICE, CHANNELS)
  bf16 = bench_memory.saved_tensors(tiny_config("bfloat16", encoder, norm), PER_DEVICE, CHANNELS)
  act = lambda tensors, dtype: sum(t.nbytes for t in tensors if t.activation and t.dtype == dtype)
  # Under bf16 the only float32 activations are the loss's, on the network's outputs.
  leftover = {t.shape for t in bf16 if t.activation and t.dtype == np.float32}
  assert leftover <= _loss_head_shapes(tiny_config("bfloat16", encoder, norm)), leftover
  assert act(f32, jnp.bfloat16) == 0
  assert 0 < act(bf16, jnp.bfloat16) <= act(f32, np.float32) / 2
  masks = lambda tensors: sum(t.nbytes for t in tensors if t.activation and t.dtype == bool)
  assert masks(bf16) == masks(f32) <= act(f32, np.float32) / 4
  total = lambda tensors: sum(t.nbytes for t in tensors if t.activation)
  assert total(bf16) <= 0.6 * total(f32)


def test_saved_activation_figures_add_up_and_split_the_weights_off():
  c = tiny_config("bfloat16")
  figures = bench_memory.saved_activations(c, PER_DEVICE, CHANNELS)
  by_dtype = {k: v for k, v in figures.items() if k.startswith("saved_activation_bytes_")}
  assert {"saved_activation_bytes_float32", "saved_activation_bytes_bfloat16"} <= set(by_dtype)
  assert figures["saved_activation_bytes"] == sum(by_dtype.values())
  # The non-activations are the bf16 casts of the online weights, which do not grow with
  # the batch: at least one copy of every conv and linear kernel.
  net = networks.make_byol_network(c.model, NUM_CLASSES, precision="bfloat16")
  params = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x, True)[0],
                          jax.ShapeDtypeStruct((2, SIZE, SIZE, CHANNELS), jnp.float32))
  kernels = sum(2 * int(np.prod(v.shape)) for m, vs in params.items() for k, v in vs.items()
                if k == "w" and not m.startswith("classifier"))
  assert figures["saved_non_activation_bytes"] >= kernels
  # Doubling the batch doubles the activations and leaves the weights alone.
  double = bench_memory.saved_activations(c, 2 * PER_DEVICE, CHANNELS)
  assert double["saved_activation_bytes"] == 2 * figures["saved_activation_bytes"]
  assert double["saved_non_activation_bytes"] == figures["saved_non_activation_bytes"]


def test_without_remat_norms_bfloat16_saves_float32_feature_maps(monkeypatch):
  """The bug the remat'ed norms fix: float32 norms keep float32 copies of their inputs."""
  without_remat_norms(monkeypatch)
  saved = bench_memory.saved_tensors(tiny_config("bfloat16"), PER_DEVICE, CHANNELS)
  assert any(t.activation and t.dtype == np.float32 and len(t.shape) == 4 for t in saved)


def _loss_grads_and_state(c):
  """One online forward and backward of the network, op by op (no jit).

  The loss projects the predictions and the probe's logits on fixed random directions,
  so every output's gradient path (predictor, projector, encoder, classifier) is used.
  """
  net = networks.make_byol_network(c.model, NUM_CLASSES, axis_name=None, precision=c.precision)
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (PER_DEVICE, SIZE, SIZE, CHANNELS)).astype(np.float32)
  directions = {k: rng.normal(size=(PER_DEVICE, d)).astype(np.float32)
                for k, d in (("prediction", c.model.projector_out), ("logits", NUM_CLASSES))}
  params, state = net.init(jax.random.PRNGKey(0), images, is_training=True)

  def loss(p):
    out, new_state = net.apply(p, state, None, images, is_training=True)
    return sum(jnp.sum(out[k] * v) for k, v in directions.items()), new_state

  with jax.disable_jit():
    return jax.value_and_grad(loss, has_aux=True)(params)


def test_remat_norms_change_no_value_of_the_loss_gradients_or_bn_state(monkeypatch):
  """hk.remat recomputes each norm from the same bf16 input with the same operations, so
  op by op the loss, every gradient and the updated BN statistics are bit-for-bit the same.

  (Jitted, XLA fuses the two programs differently: float32 sums round in another order,
  about 1e-6 relative, and bf16's rounding of the cotangents flowing back amplifies that
  to about 1e-2 of a leaf's largest gradient; that is the compiler's doing, not remat's.)
  Every norm kind is wrapped by the same code (layers.Layers.norm_layer); batch norm, the
  one with state, is checked.
  """
  c = tiny_config("bfloat16")  # Batch norm: its statistics are state, updated inside remat.
  remat = _loss_grads_and_state(c)
  without_remat_norms(monkeypatch)
  plain = _loss_grads_and_state(c)
  leaves = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  for (path, a), (_, b) in zip(leaves(remat), leaves(plain), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  assert any(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(remat[1]))
