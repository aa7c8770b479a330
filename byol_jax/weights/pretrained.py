"""One place that turns "a pretrained thing on disk" into an encoder's weights.

`load(path)` accepts a pretraining workdir (its newest intact checkpoint, read without
writing anything), a byol_jax export (export_formats.py's safetensors layout) or a
release checkpoint of the BYOL authors (.pkl, release.py), and returns the online encoder's
parameters and batch-norm state under the names `networks.make_encoder_network` uses,
with the model config needed to build that network. A workdir is read with the encoder
network alone: its config.json builds the network, the network's parameter tree is the
template, and only those arrays are read from the checkpoint.

This is the hub that knows the formats: it imports their readers (export_formats,
release), which know nothing of it; export.py, which writes exports from anything loaded
here, sits above it. The baselines the evaluation commands accept as `--pretrained`
('random', 'pixels') are evaluation/baselines.py's. Paths are local or gs:// (files.py).
"""
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.model import networks
from byol_jax.store import checkpoint_reader
from byol_jax.store import files
from byol_jax.store import run_config
from byol_jax.weights import encoder_weights
from byol_jax.weights import export_formats
from byol_jax.weights import release

# The TrainState fields of the online network, where a workdir's encoder is read from.
ONLINE_FIELDS = ("online_params", "online_state")


def _encoder_part(tree: Mapping[str, Any]) -> dict:
  """The 'encoder/...' modules of a Haiku params/state dict (arrays or their metadata)."""
  return {module: dict(leaves) for module, leaves in tree.items()
          if module.startswith(encoder_weights.ENCODER_PREFIX)}


def _saved_channels(layout: Any, workdir: str) -> int:
  try:
    return int(layout["online_params"]["encoder/~/initial_conv"]["w"].shape[2])
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"the checkpoint in {workdir} has no online_params['encoder/~/"
                     f"initial_conv']['w'] ({e!r}); it was not written by byol-jax pretrain.")


def load_workdir(workdir: str) -> encoder_weights.Pretrained:
  """The online encoder of a pretraining workdir's newest intact checkpoint (read-only).

  Only the encoder's arrays are read, into a template the encoder network gives (built
  from config.json's model section and the saved input channels); every saved encoder
  array must match it in shape and dtype. Corrupt or unfinished newer steps are skipped
  with a logged error. Nothing is written into the workdir.

  Raises:
    FileNotFoundError: no config.json or no checkpoint. RuntimeError: none intact.
    ValueError: the saved encoder does not fit the network config.json describes.
  """
  c = run_config.read_config(workdir)
  step = checkpoint_reader.intact_step(workdir)
  layout = checkpoint_reader.step_layout(workdir, step)
  channels = _saved_channels(layout, workdir)
  net = networks.make_encoder_network(c.model)
  images = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, channels), jnp.float32)
  params, state = jax.eval_shape(
      lambda x: net.init(jax.random.PRNGKey(0), x, is_training=True), images)
  template = dict(zip(ONLINE_FIELDS, (params, state)))
  saved = {field: _encoder_part(layout.get(field, {})) for field in ONLINE_FIELDS}
  online = jax.tree_util.tree_map(
      np.asarray, checkpoint_reader.restore_step(workdir, step, template, saved=saved))
  return encoder_weights.Pretrained(
      model=c.model, params=online["online_params"], state=online["online_state"],
      image_size=int(c.image_size), channels=channels, step=step, source="workdir")


def file_kind(data: bytes) -> str | None:
  """'byol_jax' for a safetensors file, 'release' for a pickle, None for anything else.

  Safetensors is tested first and by its whole structure: its first 8 bytes are a length,
  which can look like a pickle header (an export whose header is 0x10480 bytes long
  starts 80 04 01 00 ...), while a pickle never passes the structural test.
  """
  if export_formats.safetensors_header(data) is not None:
    return "byol_jax"  # Or another safetensors file; read_export says which.
  if release.is_pickle(data):
    return "release"
  return None


def load(path: "str | os.PathLike") -> encoder_weights.Pretrained:
  """Loads a pretrained encoder from a workdir, a byol_jax export or an authors' .pkl.

  A file is recognised by its content (`file_kind`), whatever its name or extension.

  Args:
    path: local or gs://; a pretraining workdir (its newest intact checkpoint; nothing is
      written), a file written by `byol-jax export --format=byol_jax`, or a checkpoint of
      the BYOL authors' release (.pkl, read by a restricted unpickler that runs no code).

  Returns:
    Pretrained with host NumPy params/state named as `networks.make_encoder_network`.

  Raises:
    FileNotFoundError: path missing, or a directory without config.json/checkpoints.
    ValueError: a file of another type (its size and first bytes named), e.g. a
      torchvision-format export.
  """
  path = os.fspath(path)
  if not files.exists(path):
    raise FileNotFoundError(f"pretrained path {path} does not exist; pass a pretraining "
                            "workdir, a byol_jax export (.safetensors) or an authors' .pkl.")
  if files.is_dir(path):
    return load_workdir(path)
  data = files.read_bytes(path)  # Read once: detection and the reader share the bytes.
  kind = file_kind(data)
  if kind == "byol_jax":
    return export_formats.read_export(path, data)
  if kind == "release":
    return release.load_release(path, data=data)
  raise ValueError(f"{path} ({len(data)} bytes, starting {data[:16].hex(' ') or 'empty'}) is "
                   "neither a safetensors export nor a pickle checkpoint; pass a pretraining "
                   "workdir, a byol_jax export or an authors' release .pkl.")
