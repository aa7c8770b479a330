"""export.py / export_formats.py: the byol_jax format reproduces the checkpoint's online
encoder exactly, whatever the file's name and even where its first bytes look like a pickle
header; the torchvision layout reproduces it in a torchvision-style PyTorch ResNet written
here (torch only, no torchvision), loaded with strict=True.
"""
import json
import os
import pickle
import struct

import jax
import numpy as np
import pytest
import safetensors
import torch
from torch import nn

import authors_reference
import tolerances
from byol_jax import config as config_lib
from byol_jax.weights import export
from byol_jax.weights import encoder_weights
from byol_jax.weights import export_formats
from byol_jax.model import networks
from byol_jax.weights import pretrained
from workdirs import tiny_config, write_workdir
from torchvision_reference import TORCH_ARCHS, TorchResNet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("run")
  c = tiny_config()
  saved = write_workdir(root, c, channels=1, steps=[3])[3]
  out = export.export(str(root), str(root.parent / "encoder.safetensors"), "byol_jax")
  return c, saved, out


@pytest.fixture(scope="module")
def encoder(run):
  return export.load_encoder(run[2])


def test_byol_jax_export_matches_online_encoder_of_checkpoint_exactly(run, encoder):
  c, saved, _ = run
  assert (encoder.image_size, encoder.channels, encoder.dim) == (28, 1, 64)
  images = np.random.RandomState(0).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
  net = networks.make_encoder_network(c.model)
  # Same program as the Encoder's (weights as arguments, not constants): bitwise equal.
  want, _ = jax.jit(lambda p, s, x: net.apply(p, s, None, x, is_training=False))(
      saved.online_params, saved.online_state, images)
  got = encoder(images)
  assert isinstance(got, np.ndarray) and got.shape == (3, 64) and got.dtype == np.float32
  np.testing.assert_array_equal(got, np.asarray(want))
  # The target network differs from the online one, so the test can tell them apart.
  other, _ = net.apply(saved.target_params, saved.target_state, None, images, is_training=False)
  assert np.abs(np.asarray(other) - got).max() > 1e-3


def test_uint8_and_float_images_give_the_same_representation(encoder):
  pixels = np.random.RandomState(1).randint(0, 256, (2, 28, 28, 1)).astype(np.uint8)
  # Two programs of the same maths (the division by 255 inside one, outside the other): the
  # uint8 path no less accurate than the float path against the encoder in float64.
  net = networks.make_encoder_network(encoder.model)
  with jax.enable_x64(True):
    p64, s64 = tolerances.float64((encoder.pretrained.params, encoder.pretrained.state))
    want = tolerances.float64(jax.jit(lambda x: net.apply(p64, s64, None, x, is_training=False)[0])(
        pixels.astype(np.float64) / 255))
  tolerances.assert_no_less_accurate(encoder(pixels), encoder(pixels.astype(np.float32) / 255), want)


def test_export_file_is_safetensors_with_the_encoder_config(run):
  c, saved, out = run
  with safetensors.safe_open(out, framework="np") as f:
    meta, keys = f.metadata(), set(f.keys())
  header = json.loads(meta["config"])
  assert meta["format"] == "byol_jax.encoder" and meta["format_version"] == "1"
  assert (header["image_size"], header["channels"], header["step"]) == (28, 1, 3)
  assert header["model"] == c.model.to_dict()
  assert header["input_mean"] == [np.mean(networks.IMAGE_MEAN)]  # The same float64 mean: exact.
  n_params = sum(len(v) for k, v in saved.online_params.items() if k.startswith("encoder/"))
  assert sum(k.startswith("params:") for k in keys) == n_params
  loaded = pretrained.load(out)
  assert loaded.source == "byol_jax" and loaded.step == 3
  want = {k: v for k, v in saved.online_state.items() if k.startswith("encoder/")}
  layout = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
  assert layout(loaded.state) == layout(want)  # 0-d EMA counters stay 0-d.


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32, 1), np.float32), r"shape \(2, 32, 32, 1\).*\[N, 28, 28, 1\]"),
    (np.zeros((28, 28, 1), np.float32), r"\[N, 28, 28, 1\]"),
    (np.zeros((2, 28, 28, 1), np.int32), "dtype int32.*uint8"),
    (np.full((2, 28, 28, 1), 255.0, np.float32), r"\[0, 1\].*divide 0-255 pixels by 255"),
    (np.full((2, 28, 28, 1), np.nan, np.float32), r"\[0, 1\]"),
])
def test_bad_images_are_refused_with_the_fix(encoder, images, message):
  with pytest.raises(ValueError, match=message):
    encoder(images)


def test_write_is_atomic_and_leaves_no_partial_file(run, tmp_path, monkeypatch):
  out = tmp_path / "enc.safetensors"
  out.write_bytes(b"previous")

  def fail(fd):
    raise OSError("disk full")
  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    export.export(str(run[2]), str(out), "byol_jax")
  assert out.read_bytes() == b"previous"
  assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]


def test_unknown_format_lists_the_valid_ones(run, tmp_path):
  with pytest.raises(ValueError, match=r"'onnx'.*\['byol_jax', 'torchvision'\]"):
    export.export(str(run[2]), str(tmp_path / "x"), "onnx")


def test_an_export_without_an_extension_loads(run, encoder, tmp_path):
  """Files are recognised by content: `--out=enc` gives a file that loads as surely."""
  out = export.export(str(run[2]), str(tmp_path / "enc"), "byol_jax")
  assert out == str(tmp_path / "enc") and os.listdir(tmp_path) == ["enc"]
  images = np.random.RandomState(2).uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_array_equal(export.load_encoder(out)(images), encoder(images))


def padded_to_header_length(tensors: dict, meta: dict, length: int) -> bytes:
  """A safetensors file of `tensors` and `meta` plus a metadata entry that pads its JSON
  header to `length` bytes (safetensors pads headers with spaces to a multiple of 8).

  Each padding character adds one byte to the unpadded header, so the search starts 8
  below the padding that the header without it leaves to `length`."""
  bare = safetensors.numpy.save(tensors, metadata=dict(meta, padding=""))
  for extra in range(max(0, length - struct.unpack("<Q", bare[:8])[0] - 8), length):
    padded = safetensors.numpy.save(tensors, metadata=dict(meta, padding="x" * extra))
    if struct.unpack("<Q", padded[:8])[0] >= length:
      assert struct.unpack("<Q", padded[:8])[0] == length, "no padding gives that length"
      return padded


@pytest.mark.parametrize("length, head, keep", [
    (0x0480, b"\x80\x04\x00\x00", 1),  # Pickle protocol 4; one tensor keeps it this short.
    (0x10280, b"\x80\x02\x01\x00", None),  # Protocol 2, as the authors' .pkl begin.
    (0x10480, b"\x80\x04\x01\x00", None),  # As a ResNet-50 export at 64 px began.
])
def test_export_whose_length_bytes_look_like_a_pickle_header_loads(length, head, keep, run,
                                                                   tmp_path):
  data = open(run[2], "rb").read()
  tensors = dict(list(safetensors.numpy.load(data).items())[:keep])
  meta = export_formats.safetensors_header(data)["__metadata__"]
  path = tmp_path / "encoder.safetensors"
  path.write_bytes(padded_to_header_length(tensors, meta, length))
  assert path.read_bytes().startswith(head)
  loaded = pretrained.load(str(path))
  assert (loaded.source, loaded.step) == ("byol_jax", 3)
  got = {f"{kind}:{module}:{name}": value for kind, tree in
         (("params", loaded.params), ("state", loaded.state))
         for module, leaves in tree.items() for name, value in leaves.items()}
  assert got.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(got[key], value)


@pytest.mark.parametrize("data", [
    b"",
    b"\x02\x00\x00\x00\x00\x00\x00\x00{}"[:9],  # Header longer than the file.
    b"\x02\x00\x00\x00\x00\x00\x00\x00[]",  # JSON, but not an object.
    b"\x02\x00\x00\x00\x00\x00\x00\x00\xff}",  # Not UTF-8.
    b"\x00\x00\x00\x00\x00\x00\x00\x00",  # Empty header.
    pickle.dumps({"step": 1}, protocol=2),
    pickle.dumps({"step": 1}, protocol=4),
])
def test_what_is_not_laid_out_as_safetensors_is_not_taken_for_it(data):
  assert export_formats.safetensors_header(data) is None
  assert export_formats.safetensors_header(b"\x02\x00\x00\x00\x00\x00\x00\x00{}") == {}


# ---------------------------------------------------------------- torchvision


def random_pretrained(encoder_name, padding="symmetric", seed=0, **model):
  """Pretrained with He-scaled random kernels and non-trivial random batch-norm values."""
  c = config_lib.base_config()
  c.model.update(dict(encoder=encoder_name, padding=padding, **model))
  net = networks.make_encoder_network(c.model)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0),
                                           np.zeros((1, 32, 32, 3), np.float32), True))
  params, state = authors_reference.random_values(shapes, seed)
  return encoder_weights.Pretrained(c.model, params, state, 32, 3, 11, "workdir")


def torch_representation(p, path, images, dtype=np.float32):
  block, layers = TORCH_ARCHS[p.model.encoder]
  model = TorchResNet(block, layers)
  model.fc = nn.Identity()
  with safetensors.safe_open(path, framework="pt") as f:
    meta = f.metadata()
    state_dict = {k: f.get_tensor(k) for k in f.keys()}
  model.load_state_dict(state_dict, strict=True)
  model = model.to(getattr(torch, np.dtype(dtype).name))  # float64: the reference run.
  model.eval()
  mean, std = np.array(json.loads(meta["input_mean"])), np.array(json.loads(meta["input_std"]))
  x = torch.from_numpy(((images - mean) / std).astype(dtype).transpose(0, 3, 1, 2))
  with torch.no_grad():
    return model(x).numpy(), meta


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_layout_matches_haiku_for_symmetric_padding(arch, tmp_path):
  p = random_pretrained(arch)
  out = export.write(p, str(tmp_path / f"{arch}.safetensors"), "torchvision")
  images = np.random.RandomState(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  want = export.Encoder(p)(images)
  got, meta = torch_representation(p, out, images)
  assert got.shape == want.shape == (2, networks.representation_dim(p.model))
  assert np.abs(want).max() > 0.1  # Non-trivial activations reach the output.
  # Against the torch model in float64, byol_jax's float32 representation is no less accurate
  # than torch's own float32 one (a layout error would put it far off).
  exact, _ = torch_representation(p, out, images, np.float64)
  tolerances.assert_no_less_accurate(want, got, exact)
  assert (meta["arch"], meta["padding"], meta["source"]) == (arch, "symmetric", "workdir")
  assert json.loads(meta["input_std"]) == list(networks.IMAGE_STD)  # Through JSON: exact.


def test_torchvision_bn_counter_becomes_num_batches_tracked():
  sd = export_formats.torchvision_state_dict(random_pretrained("resnet18"))
  assert sd["bn1.num_batches_tracked"].dtype == np.int64
  assert int(sd["layer2.0.downsample.1.num_batches_tracked"]) == 7
  assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
  assert "fc.weight" not in sd


@pytest.mark.parametrize("model, reason", [
    (dict(resnet_v2=True), "resnet_v2=True"),
    (dict(width=2.0), "model.width=2.0"),
    (dict(stem="small"), "model.stem='small'"),
    (dict(norm="group_ws"), "model.norm='group_ws'"),
    (dict(norm="none"), "model.norm='none'"),
    (dict(encoder="resnet200"), "model.encoder='resnet200'"),
    (dict(encoder="resnet18", first_group_projection=True), "first_group_projection=True.*no "
                                                                 "projection shortcut in layer1.0"),
])
def test_torchvision_refuses_what_it_cannot_express(model, reason, tmp_path):
  c = config_lib.base_config()
  c.model.update(model)
  p = encoder_weights.Pretrained(c.model, {}, {}, 32, 3, 0, "workdir")
  with pytest.raises(ValueError, match=f"cannot export to torchvision.*{reason}"):
    export.write(p, str(tmp_path / "x"), "torchvision")
  assert not (tmp_path / "x").exists()


def test_torchvision_refuses_grayscale():
  p = random_pretrained("resnet18")._replace(channels=1)
  with pytest.raises(ValueError, match="channels=1; torchvision's ResNets take RGB"):
    export_formats.torchvision_state_dict(p)


def test_same_padding_exports_with_a_recorded_note(tmp_path):
  p = random_pretrained("resnet18", padding="same")
  out = export.write(p, str(tmp_path / "same.safetensors"), "torchvision")
  with safetensors.safe_open(out, framework="np") as f:
    meta = f.metadata()
  assert meta["padding"] == "same" and "symmetric" in meta["padding_note"]
  with pytest.raises(ValueError, match="torchvision-format export.*--format=byol_jax"):
    pretrained.load(out)  # PyTorch's file, not byol_jax's.
