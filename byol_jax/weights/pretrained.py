"""One place that turns "a pretrained thing on disk" into an encoder's weights.

`load(path)` accepts a pretraining workdir (its newest intact checkpoint, read without
writing anything), a byol_jax export (export_formats.py's safetensors layout) or a
release checkpoint of the BYOL authors (.pkl, release.py), and returns the online encoder's
parameters and batch-norm state under the names `networks.make_encoder_network` uses,
with the model config needed to build that network. `resolve(config, spec)` also accepts
two baseline words: `random`, the recipe's encoder with random weights (`random_init`),
which every evaluation command can be run on (`--pretrained=random`), and `pixels`, the
standardised raw pixels (baselines.py) for the linear protocol and kNN only
(`--pretrained=pixels`).

This is the hub that knows the formats: it imports their readers (export_formats,
release), which know nothing of it; export.py, which writes exports from anything loaded
here, sits above it. Paths are local or gs:// (files.py).
"""
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from byol_jax.store import checkpoint_reader
from byol_jax.weights import encoder_weights
from byol_jax.weights import export_formats
from byol_jax.store import files
from byol_jax.weights import release
from byol_jax.store import run_config

# The types every reader returns, re-exported: callers know this module only.
ENCODER_PREFIX = encoder_weights.ENCODER_PREFIX
SOURCES = encoder_weights.SOURCES
Pretrained = encoder_weights.Pretrained
config_from_json = encoder_weights.config_from_json
RANDOM = "random"  # The `--pretrained` value for a randomly initialised encoder.


def encoder_subtree(tree: Mapping[str, Any]) -> dict:
  """The 'encoder/...' modules of a Haiku params/state dict, as host NumPy arrays."""
  return {module: {name: np.asarray(value) for name, value in leaves.items()}
          for module, leaves in tree.items() if module.startswith(ENCODER_PREFIX)}


def _saved_channels(layout: Any, workdir: str) -> int:
  try:
    return int(layout["online_params"]["encoder/~/initial_conv"]["w"].shape[2])
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"the checkpoint in {workdir} has no online_params['encoder/~/"
                     f"initial_conv']['w'] ({e!r}); it was not written by byol-jax pretrain.")


def load_workdir(workdir: str) -> Pretrained:
  """The online encoder of a pretraining workdir's newest intact checkpoint (read-only).

  Corrupt or unfinished newer steps are skipped with a logged error. Nothing is written
  into the workdir.

  Raises:
    FileNotFoundError: no config.json or no checkpoint. RuntimeError: none intact.
  """
  from byol_jax.training import train  # Local: train pulls in the optimiser stack.
  config_path = files.join(workdir, run_config.CONFIG_FILE)
  if not files.is_file(config_path):
    raise FileNotFoundError(f"{config_path} not found: {workdir} is not a pretraining workdir "
                            "(byol-jax pretrain writes config.json beside checkpoints/).")
  c = config_from_json(files.read_json(config_path))
  step = checkpoint_reader.intact_step(workdir)
  channels = _saved_channels(checkpoint_reader.step_layout(workdir, step), workdir)
  deps = train.make_deps(c)
  template = jax.eval_shape(lambda key: train.init_state(c, deps, key, channels),
                            jax.random.PRNGKey(0))
  state = checkpoint_reader.restore_step(workdir, step, template)
  return Pretrained(model=c.model, params=encoder_subtree(state.online_params),
                    state=encoder_subtree(state.online_state), image_size=int(c.image_size),
                    channels=channels, step=step, source="workdir")


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


def load(path: "str | os.PathLike") -> Pretrained:
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


def random_init(c: ml_collections.ConfigDict, bn_batches: int = 50) -> Pretrained:
  """The recipe's encoder with random weights: the baseline a pretrained encoder must beat.

  Weights are drawn as pretraining draws them (seed `c.seed + 1`, so not the pretraining
  run's own initialisation). Batch-norm moving statistics are estimated on `bn_batches`
  centre-cropped training batches (training-mode forward passes, decay model.bn_decay), so
  the baseline is not crippled by the initial statistics (mean 0, variance 1).

  Args:
    c: the run config (model, data set, image size, batch size, seed).
    bn_batches: training batches for the batch-norm statistics (0: keep the initial ones).

  Returns:
    Pretrained with source 'random' and step 0.
  """
  from byol_jax.data import pipelines  # Local: data pulls in TensorFlow.
  from byol_jax.model import networks
  net = networks.make_encoder_network(c.model)
  channels = pipelines.num_channels(c)
  dummy = np.zeros((2, c.image_size, c.image_size, channels), np.float32)
  params, state = net.init(jax.random.PRNGKey(c.seed + 1), dummy, is_training=True)
  update = jax.jit(lambda s, x: net.apply(params, s, None, x, is_training=True)[1])
  if bn_batches > 0:
    source = pipelines.eval_dataset(c, c.dataset.train_split, local_device_count=1)
    for i, batch in enumerate(source):
      if i == bn_batches:
        break
      state = update(state, np.asarray(batch["image"][0], np.float32) / 255.0)  # uint8 -> [0, 1].
  host = lambda tree: jax.tree_util.tree_map(np.asarray, tree)  # noqa: E731
  return Pretrained(model=c.model, params=host(params), state=host(state),
                    image_size=int(c.image_size), channels=channels, step=0, source=RANDOM)


def resolve(c: ml_collections.ConfigDict, spec: "str | os.PathLike | Pretrained") -> Pretrained:
  """`--pretrained` as the evaluation commands read it: a Pretrained is returned as is,
  'random' gives `random_init(c)`, 'pixels' `baselines.pixels_baseline(c)` (not an
  encoder: build its features with `baselines.feature_network`), anything else is a path
  for `load`."""
  if isinstance(spec, Pretrained):
    return spec
  if os.fspath(spec) == RANDOM:
    return random_init(c)
  from byol_jax.evaluation import baselines  # Local: it pulls in the networks.
  if os.fspath(spec) == baselines.PIXELS:
    return baselines.pixels_baseline(c)
  return load(spec)
