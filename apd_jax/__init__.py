"""apd_jax: Adaptive Parallel Decoding (diffusion drafter + autoregressive verifier) in JAX/Flax."""

from pathlib import Path

# The small trained drafter/verifier pair shipped with the package (apd_jax/assets/README.md).
ASSETS_DIR = Path(__file__).parent / "assets"
