"""apd_jax: Adaptive Parallel Decoding (diffusion drafter + autoregressive verifier) in JAX/Flax."""

import os
from pathlib import Path

# transformers prints advice on import (e.g. "PyTorch was not found", where torch is absent: apd_jax
# uses transformers only for tokenizers and configs); it is not for apd_jax's users. A value the user
# set is kept.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The small trained drafter/verifier pair shipped with the package (apd_jax/assets/README.md).
ASSETS_DIR = Path(__file__).parent / "assets"
