"""`byol-jax export` and `load_encoder`: encoders written for transfer, and read back as callables.

`export(source, out, fmt)` writes the online encoder of anything `pretrained.load` reads (a
pretraining workdir, an authors' release .pkl, or a byol_jax export to convert) as one
safetensors file in one of export_formats.FORMATS ('byol_jax' or 'torchvision'; layouts
in export_formats.py), written whole or not at all (files.write_bytes_atomic: a renamed
temporary file locally, one upload on gs://), so `out` is never half a file.
`load_encoder(path)` turns an export (or anything else `pretrained.load` reads) into an
`Encoder`, a function of images.

Names: `out` is used as given, with or without an extension. Files are recognised by
their content (a safetensors header, a pickle header), never by their name, so an export
written to 'enc' loads as surely as one written to 'enc.safetensors'.

This module sits above the loader: export -> pretrained -> {export_formats, release}.
"""
import jax
import jax.numpy as jnp
import numpy as np

from byol_jax.weights import export_formats
from byol_jax.store import files
from byol_jax.model import networks
from byol_jax.weights import encoder_weights
from byol_jax.weights import pretrained as pretrained_lib


class Encoder:
  """A pretrained encoder as a function of images: `encoder(images) -> [N, D]` NumPy.

  Attributes:
    image_size, channels: the input size it was trained at.
    dim: D, the representation size.
    model: the model config section; pretrained: the weights.
  """

  def __init__(self, p: encoder_weights.Pretrained):
    self.pretrained, self.model = p, p.model
    self.image_size, self.channels = p.image_size, p.channels
    self.dim = networks.representation_dim(p.model)
    net = networks.make_encoder_network(p.model)

    def forward(params, state, images):
      if images.dtype == jnp.uint8:  # Traced once per input dtype.
        images = images.astype(jnp.float32) / 255.0
      return net.apply(params, state, None, images.astype(jnp.float32), is_training=False)[0]

    self._forward = jax.jit(forward)
    self._params = jax.device_put(p.params)
    self._state = jax.device_put(p.state)

  def _check(self, images) -> np.ndarray:
    images = np.asarray(images)
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f"images have shape {images.shape}; this encoder takes [N, "
                       f"{', '.join(map(str, want))}] (resize/crop to {self.image_size} px, "
                       f"{self.channels} channel(s)).")
    if images.dtype == np.uint8:
      return images
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images have dtype {images.dtype}; pass uint8 (0-255) or float in "
                       "[0, 1].")
    low, high = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0.0 and high <= 1.0):
      raise ValueError(f"float images must lie in [0, 1]; these range over [{low}, {high}] "
                       "(divide 0-255 pixels by 255, or pass them as uint8).")
    return images

  def __call__(self, images) -> np.ndarray:
    """images [N, H, W, C] uint8 0-255 or float [0, 1] -> representations [N, D] float32."""
    return np.asarray(self._forward(self._params, self._state, self._check(images)))


def load_encoder(path: str) -> Encoder:
  """An Encoder from a byol_jax export (or anything else `pretrained.load` reads).

  Args:
    path: the export (any file name; local or gs://), a workdir or an authors' .pkl.
  """
  return Encoder(pretrained_lib.load(path))


def write(p: encoder_weights.Pretrained, out: str, fmt: str = "byol_jax") -> str:
  """Writes a Pretrained encoder to `out` in format `fmt`, atomically.

  Args:
    p: the encoder.
    out: the file to write (local or gs://; replaced whole if it exists; any name).
    fmt: one of export_formats.FORMATS.

  Returns:
    out, the path written.

  Raises:
    ValueError: unknown format (the valid ones are listed) or an architecture the format
      cannot express; nothing is written then.
  """
  files.write_bytes_atomic(out, export_formats.encode(p, fmt))
  return str(out)


def export(source: str, out: str, fmt: str = "byol_jax") -> str:
  """`byol-jax export`: the online encoder of `source` written to `out`.

  Args:
    source: a pretraining workdir (newest intact checkpoint, read-only), an authors'
      release .pkl, or a byol_jax export (to convert it to torchvision's layout).
    out: the file to write (replaced atomically if it exists).
    fmt: 'byol_jax' or 'torchvision'.

  Returns:
    out.
  """
  export_formats.check_format(fmt)  # Before reading a possibly large checkpoint.
  return write(pretrained_lib.load(source), out, fmt)
