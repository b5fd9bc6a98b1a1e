"""apd_jax: Adaptive Parallel Decoding (diffusion drafter + autoregressive verifier) in JAX/Flax.

The public API, importable from here (`from apd_jax import load_model, APDConfig, apd_generate`):
models and tokenizers from checkpoints, every decoder's settings and generate function, the
decoder registry, the result type and the chat helpers. Names are imported on first use, so
`import apd_jax` stays cheap and a command that needs no decoder loads none.
"""

import os
from pathlib import Path

from apd_jax.utils.lazy import lazy_names

# transformers prints advice on import (e.g. "PyTorch was not found", where torch is absent: apd_jax
# uses transformers only for tokenizers and configs); it is not for apd_jax's users. A value the user
# set is kept.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# The small trained drafter/verifier pair shipped with the package (apd_jax/assets/README.md).
ASSETS_DIR = Path(__file__).parent / "assets"

_PUBLIC = {
    "apd_jax.checkpoints": ("load_model", "load_tokenizer", "convert_hf_to_orbax", "convert_orbax_to_hf",
                            "CheckpointError"),
    "apd_jax.models.config": ("ModelConfig",),
    "apd_jax.models.quantize": ("quantize",),
    "apd_jax.decoding.generation": ("DecoderConfig", "GenerationResult"),
    "apd_jax.decoding.apd": ("APDConfig", "apd_generate", "LeftRightConfig", "leftright_generate"),
    "apd_jax.decoding.autoregressive": ("ARConfig", "ar_generate"),
    "apd_jax.decoding.diffusion": ("DiffusionConfig", "diffusion_generate", "ThresholdConfig", "threshold_generate"),
    "apd_jax.decoding.learn2pd": ("Learn2PDConfig", "learn2pd_generate", "load_filter"),
    "apd_jax.decoding.blocks": ("LLaDAConfig", "llada_generate"),
    "apd_jax.decoding.registry": ("DECODERS", "Models", "decoder"),
    "apd_jax.text.chat": ("chat_prompt_ids", "messages", "stop_token_ids"),
}
_names, __getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
__all__ = ["ASSETS_DIR", *_names]
