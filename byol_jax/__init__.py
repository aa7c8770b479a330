"""byol_jax: Bootstrap Your Own Latent (Grill et al. 2020) in JAX/Haiku."""
__version__ = "0.1.0"
