"""torch_resnet.py: a torchvision-format export of a 'SAME'-padded checkpoint (the BYOL
authors' release) runs in plain PyTorch with byol_jax's representation, to float32
rounding; torchvision's symmetric padding does not; the export's keys and shapes are the
module's (and torchvision's) state_dict, loaded strictly.

The checkpoint is the authors' own format, written by dill as their Checkpointer writes it
(tests/authors_reference.py), converted by `export.export(..., 'torchvision')`, the code of
`byol-jax export --from_release=FILE.pkl --format=torchvision`.

Bound: both float32 results are compared with a float64 run of the same PyTorch network
(the float32 weights and images are exact in float64, so that run is the network's value
to float64 rounding, ~1e-15). Each float32 forward rounds at each of the ~55 layers of a
ResNet-50 (conv, batch norm, residual add) by a few units of float32 rounding (6e-8);
added up along the depth that stays below 55 * 3 * 6e-8 = 1e-5 (tests/weights/test_release.py's
figure), and byol_jax's deviation from the float64 run must also be of the size of
PyTorch's own float32 deviation (within 10x). One pixel of padding in the wrong place moves the
representation by 1e-3 to 1e-1 (measured below), orders of magnitude above both.

Figures are printed with `pytest -s` (docs/pytorch.md quotes them). The 224 px
'symmetric' case is marked slow (a second 224 px compile and float64 run); the 224 px
'same' case, the acceptance figure, runs by default.
"""
import copy

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

import authors_reference as authors
from byol_jax import config as config_lib
from byol_jax import torch_resnet
from byol_jax.model import networks
from byol_jax.weights import encoder_weights
from byol_jax.weights import export
from byol_jax.weights import export_formats
from byol_jax.weights import pretrained
# torchvision's ResNet module tree, mirrored in torch alone (torchvision is not installed).
from torchvision_reference import TORCH_ARCHS, TorchResNet

FLOAT32_BOUND = 1e-5  # Relative L2, float32 vs the float64 run; derived in the docstring.
ROUNDING_RATIO = 10  # byol_jax's float32 deviation / PyTorch's own, at most.
EPS32 = float(np.finfo(np.float32).eps)
# Sizes (H, W): 32 x 32 pads every stride-2 layer asymmetrically (even inputs); 33 x 37 pads
# every layer of the H axis symmetrically (odd inputs), and on the W axis the stride-2 conv
# of layer2 (37 -> 19 -> 10 -> 5) asymmetrically, so a swap of the two axes' pads shows;
# 224 x 224 is the acceptance size (ResNet-50 within 1e-4 relative L2).
SIZES = [(32, 32), (33, 37), (224, 224)]


def relative_deviation(got, want) -> float:
  return float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))


def images(height, width, seed=1) -> np.ndarray:
  """Two RGB images [2, H, W, 3] in [0, 1], NHWC as byol_jax takes them."""
  return np.random.RandomState(seed).uniform(0, 1, (2, height, width, 3)).astype(np.float32)


_FORWARDS = {}


def byol_jax_representation(p, x, padding=None) -> np.ndarray:
  """byol_jax's encoder (as export.Encoder runs it) on x [N, H, W, 3], any H and W."""
  model = p.model.copy_and_resolve_references()
  if padding:
    model.padding = padding
  key = (model.encoder, model.padding, model.get("first_group_projection", False))
  if key not in _FORWARDS:
    net = networks.make_encoder_network(model)
    _FORWARDS[key] = jax.jit(lambda params, state, images: net.apply(
        params, state, None, images, is_training=False)[0])
  return np.asarray(_FORWARDS[key](p.params, p.state, x))


def torch_representation(model, x, dtype=torch.float32) -> np.ndarray:
  """model(x) for x [N, H, W, 3] NHWC float32, run in `dtype` (a float64 copy if asked)."""
  if dtype != torch.float32:
    model = copy.deepcopy(model).to(dtype)
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dtype)).numpy()


@pytest.fixture(scope="module")
def authors_resnet50(tmp_path_factory):
  """(Pretrained read from the authors' ResNet-50 .pkl, its torchvision-format export)."""
  root = tmp_path_factory.mktemp("release")
  params, state = authors.random_weights("resnet50")
  authors.dill_dump(authors.checkpoint(params, state), root / "pretrain.pkl")
  out = export.export(str(root / "pretrain.pkl"), str(root / "r50_torchvision.safetensors"),
                      "torchvision")
  return pretrained.load(str(root / "pretrain.pkl")), out


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (1, 2), (3, 2), (7, 2)])
def test_same_pads_are_haikus_for_every_input_size(kernel, stride):
  for size in range(1, 80):
    want = jax.lax.padtype_to_pads((size,), (kernel,), (stride,), "SAME")[0]
    assert torch_resnet.same_pads(size, kernel, stride) == tuple(want), size


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_padding_gives_byol_jax_representation_of_the_authors_resnet50(
    authors_resnet50, size):
  p, out = authors_resnet50
  model = torch_resnet.load_export(out)
  assert model.padding == "same" and model.metadata["padding"] == "same"  # From the file.
  x = images(*size)
  got = torch_representation(model, x)
  exact = torch_representation(model, x, torch.float64)
  want = byol_jax_representation(p, x)
  assert got.shape == want.shape == (2, 2048)
  assert np.abs(exact).max() > 0.1  # Non-trivial activations reach the output.
  torch_error = relative_deviation(got, exact)
  byol_jax_error = relative_deviation(want, exact)
  print(f"\nResNet-50 {size[0]}x{size[1]} 'same': relative L2 torch32-vs-byol_jax "
        f"{relative_deviation(got, want):.2e}, byol_jax-vs-float64 {byol_jax_error:.2e}, "
        f"torch32-vs-float64 {torch_error:.2e}")
  assert torch_error <= FLOAT32_BOUND
  assert byol_jax_error <= FLOAT32_BOUND
  assert byol_jax_error <= ROUNDING_RATIO * max(torch_error, EPS32)


@pytest.mark.parametrize("size", [
    (32, 32), pytest.param((224, 224), marks=pytest.mark.slow)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_symmetric_padding_deviates_on_a_same_checkpoint_and_matches_a_symmetric_encoder(
    authors_resnet50, size):
  """torchvision's padding on the release's weights is another network; it is exactly
  byol_jax's encoder with model.padding='symmetric' on those weights."""
  p, out = authors_resnet50
  model = torch_resnet.load_export(out, padding="symmetric")
  x = images(*size)
  got = torch_representation(model, x)
  exact = torch_representation(model, x, torch.float64)
  same = byol_jax_representation(p, x)
  symmetric = byol_jax_representation(p, x, padding="symmetric")
  deviation = relative_deviation(got, same)
  print(f"\nResNet-50 {size[0]}x{size[1]} 'symmetric' on a 'same' checkpoint: relative L2 "
        f"{deviation:.2e}; vs byol_jax padding='symmetric' "
        f"{relative_deviation(got, symmetric):.2e}")
  assert deviation > 100 * FLOAT32_BOUND
  assert relative_deviation(got, exact) <= FLOAT32_BOUND
  assert relative_deviation(symmetric, exact) <= FLOAT32_BOUND


def zero_pretrained(arch: str) -> encoder_weights.Pretrained:
  """byol_jax's encoder `arch` ('same' padding) with all-zero arrays: shapes only."""
  c = config_lib.base_config()
  c.model.update(dict(encoder=arch, padding="same"))
  net = networks.make_encoder_network(c.model)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0),
                                           np.zeros((1, 32, 32, 3), np.float32), True))
  params, state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return encoder_weights.Pretrained(c.model, params, state, 224, 3, 0, "workdir")


@pytest.mark.parametrize("arch", list(torch_resnet.ARCHS))
def test_export_keys_and_shapes_are_the_modules_state_dict(arch):
  """What a torchvision-format export of `arch` holds (export_formats.torchvision_state_dict,
  the tensors `encode` writes) is the module's state_dict without 'fc', strictly."""
  exported = export_formats.torchvision_state_dict(zero_pretrained(arch))
  module = torch_resnet.ResNet(arch, num_classes=None)
  assert {k: v.shape for k, v in exported.items()} == {
      k: tuple(v.shape) for k, v in module.state_dict().items()}
  module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  assert module.dim == (512 if arch in ("resnet18", "resnet34") else 2048)


@pytest.mark.parametrize("arch", list(TORCH_ARCHS))
def test_state_dict_is_torchvisions_both_ways(arch):
  """With the classifier (num_classes=1000) the keys, order and shapes are those of
  torchvision's ResNet tree (test_export's mirror); each loads the other strictly."""
  ours = torch_resnet.ResNet(arch, padding="same")
  theirs = TorchResNet(*TORCH_ARCHS[arch])
  assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
      (k, v.shape) for k, v in theirs.state_dict().items()]
  theirs.load_state_dict(ours.state_dict(), strict=True)
  ours.load_state_dict(theirs.state_dict(), strict=True)


def test_strict_loading_refuses_a_missing_or_an_extra_key(authors_resnet50):
  with safetensors.safe_open(authors_resnet50[1], framework="pt") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  model = torch_resnet.ResNet("resnet50", num_classes=None)
  model.load_state_dict(tensors, strict=True)
  missing = dict(tensors)
  del missing["layer3.2.bn2.running_var"]
  with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"layer3.2.bn2.running_var"'):
    model.load_state_dict(missing, strict=True)
  extra = dict(tensors, **{"fc.weight": torch.zeros(1000, 2048)})
  with pytest.raises(RuntimeError, match=r'Unexpected key\(s\).*"fc.weight"'):
    model.load_state_dict(extra, strict=True)


def test_load_export_takes_normalisation_from_the_metadata(authors_resnet50):
  model = torch_resnet.load_export(authors_resnet50[1])
  np.testing.assert_array_equal(model.input_mean.flatten().numpy(),
                                np.float32(networks.IMAGE_MEAN))
  np.testing.assert_array_equal(model.input_std.flatten().numpy(),
                                np.float32(networks.IMAGE_STD))
  assert not model.training and isinstance(model.fc, torch.nn.Identity)
  assert (model.metadata["source"], model.metadata["arch"]) == ("release", "resnet50")


def test_load_export_refuses_a_byol_jax_format_file(tmp_path):
  path = tmp_path / "enc.safetensors"
  path.write_bytes(safetensors.numpy.save(
      {"x": np.zeros(1, np.float32)}, metadata={"format": export_formats.BYOL_JAX_FORMAT}))
  with pytest.raises(ValueError, match="not a byol_jax torchvision-format export.*"
                                       "'byol_jax.encoder'"):
    torch_resnet.load_export(str(path))


def test_authors_resnet18_is_exact_once_its_first_group_projection_is_exported(
    tmp_path, monkeypatch):
  """The authors' ResNet-18 projects the shortcut of layer1.0, which torchvision's lacks;
  the export refuses it (_torchvision_blocker). With that check lifted, the tensors it
  writes load into ResNet(first_group_projection=True) and give byol_jax's values."""
  params, state = authors.random_weights("resnet18")
  authors.dill_dump(authors.checkpoint(params, state), tmp_path / "pretrain.pkl")
  p = pretrained.load(str(tmp_path / "pretrain.pkl"))
  assert p.model.first_group_projection
  monkeypatch.setattr(export_formats, "_torchvision_blocker", lambda p: None)
  out = export.write(p, str(tmp_path / "r18.safetensors"), "torchvision")
  model = torch_resnet.load_export(out)
  assert isinstance(model.layer1[0].downsample, torch.nn.Sequential)
  x = images(32, 32)
  exact = torch_representation(model, x, torch.float64)
  assert relative_deviation(torch_representation(model, x), exact) <= FLOAT32_BOUND
  assert relative_deviation(byol_jax_representation(p, x), exact) <= FLOAT32_BOUND
