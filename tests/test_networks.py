"""Tests of byol_jax.model.networks, .resnet and .layers: ResNet family, MLP heads, BYOL forward,
precision policies, convolutions and norms.

Compile time dominates on CPU: the networks are tiny (width 1/16, 16 px, batch 2) and run
un-jitted (each eager op compiles once per shape, shared across depths and tests);
parameter counts, names and dtypes come from jax.eval_shape / make_jaxpr; forward-only
tests fill parameters with NumPy (`fake_init`) instead of compiling the random
initialisers; real initialisations are cached per config.
"""
import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from byol_jax import config as config_lib
from byol_jax.model import layers as layers_lib
from byol_jax.model import networks
from byol_jax import parallel
from byol_jax.model import resnet

# RngBitGenerator keys compile far faster on CPU than threefry; values do not matter here.
KEY = jax.random.key(0, impl="rbg")
TINY = dict(encoder="resnet18", stem="small", width=0.0625, projector_hidden=16,
            projector_out=8, predictor_hidden=16, gn_groups=4)


def model_cfg(**overrides):
  c = config_lib.base_config().model
  c.update(TINY)
  c.update(overrides)
  return c


def images(n=2, size=16, seed=0):
  return jnp.asarray(np.random.RandomState(seed).rand(n, size, size, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def init_encoder(**overrides):
  net = networks.make_encoder_network(model_cfg(**overrides))
  return net, *net.init(KEY, images(), True)


@functools.lru_cache(maxsize=None)
def init_byol(**overrides):
  net = networks.make_byol_network(model_cfg(**overrides), num_classes=5)
  return net, *net.init(KEY, images(), True)


def fake_init(net, x, seed=0):
  """Deterministic NumPy-filled params and zero state with the shapes `net.init` makes.

  Tracing init with eval_shape proves it builds; skipping its random initialisers saves
  one compilation per parameter shape.
  """
  rng = np.random.RandomState(seed)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)

  def fill(module, name, s):
    del module
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.randn(*s.shape), s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if name == "w" else 100
    return jnp.asarray(rng.randn(*s.shape) / np.sqrt(fan_in), s.dtype)

  params = hk.data_structures.map(fill, params)
  return params, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)


def shapes_of(net, size=32):
  """(params, state) shapes of a transformed net, traced without compiling."""
  return jax.eval_shape(lambda x: net.init(KEY, x, True),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def abstract_forward(net, size=16, batch=2, is_training=False):
  """(outputs, new_state) shapes of init followed by apply, traced without compiling."""
  def run(x):
    params, state = net.init(KEY, x, True)
    return net.apply(params, state, None, x, is_training)
  return jax.eval_shape(run, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))


def named_shapes(tree, strip_top=True):
  """{'module/param': shape}, the top-level module name removed when strip_top."""
  out = {}
  for module, name, value in hk.data_structures.traverse(tree):
    if strip_top:
      module = module.split("/~/", 1)[1] if "/~/" in module else ""
    out[f"{module}/{name}"] = tuple(value.shape)
  return out


def count(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_registries_hold_exactly_the_config_names():
  assert tuple(resnet.ENCODERS) == config_lib.ENCODERS
  assert set(resnet.STEMS) == set(config_lib.STEMS)
  assert set(layers_lib.NORMS) == set(config_lib.NORMS)
  assert set(layers_lib.PADDINGS) == set(config_lib.PADDINGS)
  assert set(layers_lib.CONV_IMPLS) == set(config_lib.CONV_IMPLS)
  assert set(networks.PRECISIONS) == set(config_lib.PRECISIONS)
  assert tuple(resnet.ZERO_INITS) == config_lib.ZERO_INITS


# torchvision's totals minus its 1000-way fc layer; the widened ResNets from the BYOL
# paper (Table 1 / appendix), quoted there to 3 significant figures.
@pytest.mark.parametrize("encoder,width,expected,rtol", [
    ("resnet18", 1, 11_689_512 - 513_000, 0),
    ("resnet34", 1, 21_797_672 - 513_000, 0),
    ("resnet50", 1, 25_557_032 - 2_049_000, 0),
    ("resnet101", 1, 44_549_160 - 2_049_000, 0),
    ("resnet152", 1, 60_192_808 - 2_049_000, 0),
    ("resnet50", 2, 94e6, 0.01),
    ("resnet200", 2, 250e6, 0.01),
])
def test_parameter_count_matches_literature(encoder, width, expected, rtol):
  net = networks.make_encoder_network(
      model_cfg(encoder=encoder, width=width, stem="imagenet"))
  params, _ = shapes_of(net)
  n = count(params)
  print(f"{encoder} x{width}: {n:,} parameters")
  assert n == pytest.approx(expected, rel=rtol, abs=0)


HK_NETS = {"resnet18": hk.nets.ResNet18, "resnet50": hk.nets.ResNet50}


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
@pytest.mark.parametrize("v2", [False, True])
def test_names_and_shapes_match_haiku_resnet(encoder, v2):
  ours = networks.make_encoder_network(
      model_cfg(encoder=encoder, width=1, resnet_v2=v2, stem="imagenet"))
  theirs = hk.transform_with_state(
      lambda x, t: HK_NETS[encoder](num_classes=10, resnet_v2=v2)(x, t))
  our_params, our_state = shapes_of(ours)
  their_params, their_state = shapes_of(theirs)
  their_params = {k: v for k, v in their_params.items() if not k.endswith("/~/logits")}
  assert named_shapes(our_params) == named_shapes(their_params)
  assert named_shapes(our_state) == named_shapes(their_state)


def _hk_narrow_resnet(bottleneck, v2, channels):
  """hk.nets.ResNet with one block per group and our channel counts at width 1/16."""
  def forward(x, is_training):
    net = hk.nets.ResNet(
        blocks_per_group=(1, 1, 1, 1), num_classes=channels[-1], resnet_v2=v2,
        bottleneck=bottleneck, channels_per_group=channels,
        use_projection=(bottleneck, True, True, True),
        initial_conv_config=dict(output_channels=4), name="encoder")
    return net(x, is_training)
  return hk.transform_with_state(forward)


@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_forward_matches_haiku_resnet_with_same_weights(bottleneck, v2):
  full = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
  channels = tuple(c // 16 for c in full)
  spec = resnet.ResNetSpec((1, 1, 1, 1), bottleneck, full, (bottleneck, True, True, True))

  def ours_fn(x, is_training):
    return resnet.ResNet(spec, resnet.STEMS["imagenet"], layers_lib.Layers(),
                         width=1 / 16, resnet_v2=v2)(x, is_training)

  ours = hk.transform_with_state(ours_fn)
  theirs = _hk_narrow_resnet(bottleneck, v2, channels)
  # 64 px through the stride-4 stem gives the 16 px block shapes the other tests compile.
  x = images(size=64)
  params, state = fake_init(ours, x)
  d = channels[-1]
  # An identity logits layer turns hk's classifier output into the pooled features.
  their_params = dict(params, **{"encoder/~/logits": dict(w=jnp.eye(d), b=jnp.zeros(d))})
  their_out, their_state = theirs.apply(their_params, state, None, x, True)
  our_out, our_state = ours.apply(params, state, None, x, True)
  # The same operations in the same order (hk.BatchNorm, the same convolutions), run
  # eagerly op by op: bitwise equal on any machine, no tolerance needed.
  chex.assert_trees_all_equal(our_out, their_out)
  chex.assert_trees_all_equal(our_state, their_state)


# Every block type (basic: ResNet-18, bottleneck: ResNet-50) x version x norm, and every
# depth x version with batch norm. Depth changes only the block counts, which the
# parameter-count tests pin to the literature; this keeps the sweep's tracing affordable.
VARIANTS = ([(e, v2, n) for e in ("resnet18", "resnet50") for v2 in (False, True)
             for n in config_lib.NORMS] +
            [(e, v2, "batch") for e in ("resnet34", "resnet101", "resnet152", "resnet200")
             for v2 in (False, True)])


@pytest.mark.parametrize("encoder,v2,norm", VARIANTS)
def test_variant_builds_and_runs_forward(encoder, v2, norm):
  net = networks.make_encoder_network(model_cfg(encoder=encoder, resnet_v2=v2, norm=norm))
  params, state = fake_init(net, images())
  rep, new_state = net.apply(params, state, None, images(), True)
  expected_dim = {"resnet18": 32, "resnet34": 32}.get(encoder, 128)  # 512/16, 2048/16.
  assert rep.shape == (2, expected_dim) and rep.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(rep)))
  assert networks.representation_dim(model_cfg(encoder=encoder)) == expected_dim
  if norm == "batch":  # Only batch norm keeps statistics, and training moves them.
    assert state and all("batchnorm" in m for m in state)
    assert not all(jnp.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(state), jax.tree.leaves(new_state)))
  else:
    assert not state and not new_state
  has_bias = any(name == "b" for _, name, _ in hk.data_structures.traverse(params))
  assert has_bias == (norm == "none")  # Convs carry a bias only without a norm offset.


@pytest.mark.parametrize("stem,stride,pools",
                         [("imagenet", 2, 1), ("small", 1, 0), ("small_s2", 2, 0)])
def test_stem_first_conv_and_max_pool(stem, stride, pools):
  net = networks.make_encoder_network(model_cfg(stem=stem))
  params, state = shapes_of(net, size=16)
  kernel = 7 if stem == "imagenet" else 3
  assert params["encoder/~/initial_conv"]["w"].shape == (kernel, kernel, 3, 4)
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(
      params, state, jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)).jaxpr
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs[0].params["window_strides"] == (stride, stride)
  assert sum(e.primitive.name == "reduce_window_max" for e in jaxpr.eqns) == pools


def _last_in_block(params, module_suffix, param):
  return {m: v[param] for m, v in params.items()
          if "/block_" in m and m.endswith(module_suffix)}


# The block's closing norm per (encoder, norm): basic blocks have two, bottlenecks three.
@pytest.mark.parametrize("encoder,norm,last", [("resnet18", "batch", "batchnorm_1"),
                                               ("resnet50", "batch", "batchnorm_2"),
                                               ("resnet18", "group_ws", "groupnorm_1"),
                                               ("resnet50", "group_ws", "groupnorm_2")])
@pytest.mark.parametrize("option", ["all", "none", None])  # None: the default.
def test_zero_init_residual_sets_last_norm_scale_in_v1(encoder, norm, last, option):
  overrides = {} if option is None else dict(zero_init_residual=option)
  _, params, _ = init_encoder(encoder=encoder, norm=norm, **overrides)
  # The default ('authors') zeroes bottleneck blocks only, as hk.nets.ResNet's BlockV1.
  zero = option == "all" or (option is None and resnet.ENCODERS[encoder].bottleneck)
  last_scales = _last_in_block(params, last, "scale")
  assert len(last_scales) == sum(resnet.ENCODERS[encoder].blocks_per_group)
  for scale in last_scales.values():
    np.testing.assert_array_equal(scale, 0.0 if zero else 1.0)
  others = [v["scale"] for m, v in params.items() if "scale" in v and not m.endswith(last)]
  assert others and all(np.all(np.asarray(s) == 1.0) for s in others)


@pytest.mark.parametrize("encoder,v2,norm,option", [("resnet18", True, "batch", "all"),
                                                    ("resnet18", False, "none", "all"),
                                                    ("resnet50", False, "none", "authors")])
def test_zero_init_residual_zeroes_last_conv_without_a_closing_norm(encoder, v2, norm, option):
  _, params, _ = init_encoder(encoder=encoder, resnet_v2=v2, norm=norm,
                              zero_init_residual=option)
  last = "conv_2" if resnet.ENCODERS[encoder].bottleneck else "conv_1"
  kernels = _last_in_block(params, last, "w")
  assert len(kernels) == sum(resnet.ENCODERS[encoder].blocks_per_group)
  assert all(not np.any(np.asarray(w)) for w in kernels.values())
  assert np.any(np.asarray(params["encoder/~/block_group_0/~/block_0/~/conv_0"]["w"]))


@pytest.mark.parametrize("option", ["all", True])  # True: a legacy config.json's 'all'.
def test_zero_init_residual_rejects_v2_with_weight_standardisation(option):
  with pytest.raises(ValueError, match="zero_init_residual"):
    networks.make_encoder_network(
        model_cfg(resnet_v2=True, norm="group_ws", zero_init_residual=option))
  # 'authors' and 'none' zero nothing in v2 blocks, so every encoder takes them.
  for encoder in ("resnet18", "resnet50"):
    for fine in ("authors", "none", False):
      shapes_of(networks.make_encoder_network(model_cfg(
          encoder=encoder, resnet_v2=True, norm="group_ws", zero_init_residual=fine)), 16)


@pytest.mark.parametrize("encoder,width,expected", [
    ("resnet18", 1, 512), ("resnet34", 2, 1024), ("resnet18", 0.125, 64),
    ("resnet50", 1, 2048), ("resnet200", 2, 4096), ("resnet50", 0.3, 614),
])
def test_representation_dim(encoder, width, expected):
  cfg = model_cfg(encoder=encoder, width=width)
  assert networks.representation_dim(cfg) == expected
  if width < 1:  # The network itself agrees on the rounding (traced only).
    net = networks.make_encoder_network(cfg)
    out, _ = abstract_forward(net, size=32)
    assert out.shape == (2, expected)


def test_byol_outputs_and_top_level_modules():
  net, params, state = init_byol()
  out, _ = net.apply(params, state, None, images(), True)
  assert {k.split("/")[0] for k in params} == {"encoder", "projector", "predictor",
                                              "classifier"}
  assert {k: v.shape for k, v in out.items()} == dict(
      representation=(2, 32), projection=(2, 8), prediction=(2, 8), logits=(2, 5))
  assert networks.representation_dim(model_cfg()) == 32
  assert all(v.dtype == jnp.float32 for v in out.values())
  # Heads as in the authors' release: biased hidden layer, bias-free output layer.
  assert named_shapes(params, strip_top=False).items() >= {
      "projector/linear/w": (32, 16), "projector/linear/b": (16,),
      "projector/batch_norm/scale": (1, 16), "projector/linear_1/w": (16, 8),
      "predictor/linear/w": (8, 16), "predictor/linear_1/w": (16, 8)}.items()
  assert "projector/linear_1/b" not in named_shapes(params, strip_top=False)


@pytest.mark.parametrize("norm,module", [("group_ws", "group_norm"), ("none", None)])
def test_head_norm_follows_model_norm(norm, module):
  net = networks.make_byol_network(model_cfg(norm=norm), num_classes=5)
  params, _ = shapes_of(net, size=16)
  head_modules = {m for m in params if m.startswith("projector")}
  expected = {"projector/linear", "projector/linear_1"}
  assert head_modules == expected | ({f"projector/{module}"} if module else set())


def test_without_predictor_prediction_is_the_projection():
  net, params, state = init_byol(use_predictor=False)
  assert not any(k.startswith("predictor") for k in params)
  out, _ = net.apply(params, state, None, images(), True)
  np.testing.assert_array_equal(out["prediction"], out["projection"])


def test_online_classifier_sends_no_gradient_into_the_encoder():
  net, params, state = init_byol()

  def loss(p, output):
    return jnp.sum(net.apply(p, state, None, images(), True)[0][output] ** 2)

  @jax.jit  # One compile beats eager backward ops.
  def grads(p):
    return jax.grad(loss)(p, "logits"), jax.grad(loss)(p, "representation")

  probe_grads, rep_grads = grads(params)
  encoder_modules = [m for m in params if m.startswith("encoder")]
  for module in encoder_modules:
    for g in probe_grads[module].values():
      np.testing.assert_array_equal(g, 0.0)
  assert any(np.any(np.asarray(g)) for g in probe_grads["classifier"].values())
  # The same encoder parameters do get gradient from a loss on the representation.
  assert all(np.any(np.asarray(rep_grads[m]["w"])) for m in encoder_modules if "conv" in m)


def test_init_in_evaluation_mode_gives_the_training_mode_trees():
  net = networks.make_byol_network(model_cfg(), num_classes=5)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  train = jax.eval_shape(lambda v: net.init(KEY, v, is_training=True), x)
  evaluation = jax.eval_shape(lambda v: net.init(KEY, v, is_training=False), x)
  for a, b in zip(train, evaluation):  # params, then state
    assert named_shapes(a, False) == named_shapes(b, False)


def test_encoder_params_cut_from_byol_tree_run_the_encoder_network():
  byol, params, state = init_byol()
  encoder = networks.make_encoder_network(model_cfg())
  enc_params = {k: v for k, v in params.items() if k.startswith("encoder")}
  enc_state = {k: v for k, v in state.items() if k.startswith("encoder")}
  enc_shapes, _ = shapes_of(encoder, size=16)
  assert named_shapes(enc_shapes, False) == named_shapes(enc_params, False)
  for is_training in (True, False):
    rep, new_state = encoder.apply(enc_params, enc_state, None, images(), is_training)
    out, byol_state = byol.apply(params, state, None, images(), is_training)
    np.testing.assert_array_equal(rep, out["representation"])
    chex.assert_trees_all_equal(
        new_state, {k: v for k, v in byol_state.items() if k.startswith("encoder")})


def test_cross_replica_batchnorm_matches_one_device_on_the_whole_batch():
  n_dev = 4
  assert jax.local_device_count() >= n_dev, "conftest provides 4 fake CPU devices"
  single, params, state = init_byol()
  # Zero-mean inputs keep batch norm's E[x^2] - E[x]^2 well conditioned in float32.
  x = jnp.asarray(np.random.RandomState(1).randn(8, 16, 16, 3), jnp.float32)
  out, new_state = single.apply(params, state, None, x, True)
  pmapped = networks.make_byol_network(model_cfg(), 5, axis_name=parallel.DEVICE_AXIS)
  apply = jax.pmap(lambda p, s, xs: pmapped.apply(p, s, None, xs, True),
                   axis_name=parallel.DEVICE_AXIS, in_axes=(None, None, 0),
                   devices=jax.local_devices()[:n_dev])
  out_p, state_p = apply(params, state, x.reshape(n_dev, 2, *x.shape[1:]))
  # Against the whole-batch apply in float64: the 4-device outputs and statistics no less
  # accurate than the 1-device ones (tolerances.NOISE_FACTOR x their error or the noise
  # floor).
  with jax.enable_x64(True):
    ref = jax.jit(lambda p, s, v: single.apply(p, s, None, v, True))(*tolerances.float64((params, state, x)))
    ref_out, ref_state = tolerances.float64(ref)
  out_shape = lambda tree: jax.tree.map(lambda a: np.asarray(a).reshape(8, -1), tree)  # noqa: E731
  tolerances.assert_no_less_accurate(out_shape(out_p), out_shape(out), out_shape(ref_out))
  # On the host: indexing the sharded outputs (a[d]) would run a cross-device program.
  state_host = jax.tree.map(np.asarray, state_p)
  for d in range(n_dev):
    tolerances.assert_no_less_accurate(jax.tree.map(lambda a: a[d], state_host), new_state,
                                       ref_state)
  # Statistics of one device's 2 examples alone give visibly different outputs.
  local, _ = single.apply(params, state, None, x[:2], True)
  assert np.max(np.abs(local["projection"] - out["projection"][:2])) > 1e-2


def test_weight_standardised_kernel_has_zero_mean_unit_variance_per_output():
  w = np.random.RandomState(0).normal(0.3, 0.05, size=(3, 3, 5, 7)).astype(np.float32)
  ws = np.asarray(layers_lib.standardize_kernel(jnp.asarray(w)), np.float64)
  # float32 in the library over n = 45 values per output: its mean is off by n ulps of
  # mean|w|, which shifts every standardised value by that over std (+ 2 ulps of each); its
  # variance (n squares summed, n + 3 ulps), rsqrt and the products move the variance of the
  # result by n + 10 ulps relative, and WS_EPS by WS_EPS / var. Checked in float64.
  n, w64 = 45, w.astype(np.float64)
  scale = np.abs(w64).mean(axis=(0, 1, 2)) / w64.std(axis=(0, 1, 2))
  tolerances.assert_close(ws.mean(axis=(0, 1, 2)), 0.0, tolerances.ulps(n + 3, scale + 1))
  tolerances.assert_close(ws.var(axis=(0, 1, 2)), 1.0, tolerances.ulps(n + 10)
                          + layers_lib.WS_EPS / w64.var(axis=(0, 1, 2)))


def test_weight_standardised_conv_uses_the_standardised_kernel():
  x = np.random.RandomState(1).rand(2, 4, 4, 3).astype(np.float32)
  conv = hk.transform(lambda v: layers_lib.Conv2D(6, 1, standardize=True, name="c")(v))
  params = conv.init(KEY, x)
  w = np.asarray(params["c"]["w"], np.float64)[0, 0]  # [3, 6]
  w_hat = (w - w.mean(0)) / np.sqrt(w.var(0))
  # float32: standardising n = 3 values (the mean: n + 1 ulps of mean|w| over std; std and
  # rsqrt: n / 2 + 4 ulps of each value), then a sum of 3 products (3 ulps of sum|x w|).
  n = w.shape[0]
  w_err = (tolerances.ulps(n + 1, np.abs(w).mean(0) / np.sqrt(w.var(0)))
           + tolerances.ulps(n / 2 + 4 + n, w_hat))
  tolerances.assert_close(conv.apply(params, None, x), np.einsum("nhwc,co->nhwo", x, w_hat),
                          np.einsum("nhwc,co->nhwo", np.abs(x), w_err))


def np_conv(x, w, stride, pad):
  """Direct convolution with explicit symmetric zero padding (torchvision's arithmetic)."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (x.shape[1] + 2 * pad - k) // stride + 1
  out_w = (x.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]), np.float64)
  for i in range(out_h):
    for j in range(out_w):
      patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return out


def np_max_pool(x):
  """3x3 stride-2 max-pool with padding 1 (torch.nn.MaxPool2d(3, 2, 1))."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                             for j in range(out_w)], 1) for i in range(out_h)], 1)


@pytest.mark.parametrize("size,kernel", [(8, 3), (9, 3), (8, 7), (9, 7), (8, 1)])
def test_symmetric_padding_stride2_conv_matches_reference(size, kernel):
  x = np.random.RandomState(2).randn(1, size, size, 2).astype(np.float32)

  def run(padding):
    conv = hk.transform(lambda v: layers_lib.Conv2D(3, kernel, 2, padding, name="c")(v))
    params = conv.init(KEY, x)
    return np.asarray(conv.apply(params, None, x)), np.asarray(params["c"]["w"])

  got, w = run("symmetric")
  expected = np_conv(x.astype(np.float64), w.astype(np.float64), 2, kernel // 2)
  # A float32 sum of k x k x C products: k^2 C ulps of the sum of their magnitudes.
  bound = tolerances.ulps(kernel * kernel * x.shape[-1], np_conv(np.abs(x), np.abs(w), 2, kernel // 2))
  tolerances.assert_close(got, expected, bound)
  same, _ = run("same")  # Same init key, so the same kernel.
  if size % 2 == 0 and kernel > 1:  # TF 'SAME' shifts the window by one pixel here.
    assert np.any(np.abs(same - expected) > bound)  # Differs beyond rounding.


@pytest.mark.parametrize("size", [7, 8, 9])
def test_symmetric_max_pool_matches_reference(size):
  x = np.random.RandomState(3).randn(2, size, size, 3).astype(np.float32)
  got = np.asarray(layers_lib.max_pool(jnp.asarray(x), "symmetric"))
  np.testing.assert_array_equal(got, np_max_pool(x))
  # The gradient routes each window's 1 to its maximum, as torch's max-pool does.
  grad = jax.grad(lambda v: jnp.sum(layers_lib.max_pool(v, "symmetric")))(jnp.asarray(x))
  expected = np.zeros_like(x)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  for n, i, j, c in np.ndindex(got.shape):
    window = xp[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
    di, dj = np.unravel_index(np.argmax(window), window.shape)
    expected[n, 2 * i + di - 1, 2 * j + dj - 1, c] += 1
  np.testing.assert_array_equal(grad, expected)
  if size % 2 == 0:
    assert not np.array_equal(np.asarray(layers_lib.max_pool(jnp.asarray(x), "same")), got)


def test_bfloat16_computes_in_bf16_keeps_float32_params_norms_and_outputs():
  net = networks.make_byol_network(model_cfg(), num_classes=5, precision="bfloat16")
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out, new_state = jax.eval_shape(lambda p, s, v: net.apply(p, s, None, v, True),
                                  params, state, x)
  assert {o.dtype for o in out.values()} == {jnp.dtype(jnp.float32)}
  float_state = [s.dtype for s in jax.tree.leaves(new_state) if s.dtype != jnp.int32]
  assert float_state and set(float_state) == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(params, state, x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  for cls, _ in networks.PRECISIONS["bfloat16"]:  # No policy outlives the call.
    assert hk.mixed_precision.get_policy(cls) is None


def test_float32_default_has_no_bf16():
  net = networks.make_byol_network(model_cfg(), num_classes=5)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  params, state = jax.eval_shape(lambda v: net.init(KEY, v, True), x)
  jaxpr = jax.make_jaxpr(lambda p, s, v: net.apply(p, s, None, v, True))(params, state, x)
  assert all(v.aval.dtype != jnp.bfloat16 for e in jaxpr.jaxpr.eqns for v in e.outvars)


@pytest.mark.parametrize("field,value", [
    ("encoder", "resnet9"), ("stem", "cifar"), ("norm", "layer"), ("padding", "valid")])
def test_unknown_model_names_raise_listing_valid_ones(field, value):
  valid = getattr(config_lib, {"encoder": "ENCODERS", "stem": "STEMS", "norm": "NORMS",
                               "padding": "PADDINGS"}[field])
  for make in (networks.make_encoder_network,
               lambda c: networks.make_byol_network(c, num_classes=5)):
    with pytest.raises(ValueError) as err:
      make(model_cfg(**{field: value}))
    assert value in str(err.value) and all(v in str(err.value) for v in valid)


def test_unknown_precision_and_bad_numbers_raise():
  with pytest.raises(ValueError, match="float32.*bfloat16|bfloat16.*float32"):
    networks.make_byol_network(model_cfg(), 5, precision="float16")
  for make in (networks.make_encoder_network, networks.representation_dim):
    with pytest.raises(ValueError, match="width"):
      make(model_cfg(width=0.0))
  with pytest.raises(ValueError, match="gn_groups"):
    networks.make_encoder_network(model_cfg(norm="group_ws", gn_groups=0))
  with pytest.raises(ValueError, match="num_classes"):
    networks.make_byol_network(model_cfg(), num_classes=0)


@pytest.mark.parametrize("channels,max_groups,expected", [
    (64, 32, 32), (4, 32, 4), (38, 32, 19), (24, 16, 12), (7, 4, 1), (8, 1, 1)])
def test_group_count_is_largest_divisor_not_above_gn_groups(channels, max_groups, expected):
  assert layers_lib.group_count(channels, max_groups) == expected
