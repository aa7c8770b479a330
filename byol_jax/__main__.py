"""`python -m byol_jax ...` is the `byol-jax` command."""
from byol_jax import cli

if __name__ == "__main__":
  cli.main()
