"""byol_jax: Bootstrap Your Own Latent (Grill et al. 2020) in JAX/Haiku.

What users import from the package itself:

  from byol_jax import load_encoder
  encoder = load_encoder("encoder.safetensors")  # An export, a workdir or an authors' .pkl.
  features = encoder(images)  # [N, H, W, C] uint8 or float in [0, 1] -> [N, D] NumPy.

Training, evaluation and export run through the `byol-jax` command (byol_jax/cli/).
Everything else lives in the subpackages (see docs/architecture.md) and may change
between versions; `__all__` is the stable surface.
"""
from byol_jax.weights.export import load_encoder

__version__ = "0.1.0"  # Keep in step with setup.py's version.

__all__ = ["__version__", "load_encoder"]
