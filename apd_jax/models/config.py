"""Model configuration: shapes and numerics of one model of a registered family (families.py:
Qwen2.5, Dream, LLaDA).

Read from a Hugging Face `config.json` and `generation_config.json` (from_hf_dict: the token ids
and dtype here, the rest by the family's reader) and written back (to_hf_dict, by the family's
writer). Presets: the real checkpoints' shapes, a tiny pair for smoke runs, and the embedded pair's
sizes (ModelSize, `apd-jax train`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from apd_jax.models.families import FAMILIES
from apd_jax.models.family import Family, is_int
from apd_jax.models.llada import LLADA
from apd_jax.models.qwen2 import DREAM, QWEN2
from apd_jax.text.tokenizer import EOS_ID, MASK_ID, merge_ids

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str | Any) -> Any:
    """'bfloat16' / 'float32' / a jnp dtype -> a jnp dtype, with a clear error otherwise."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def below_problems(settings: Any, names: Sequence[str], minimum: int = 1) -> list[str]:
    """'name=value must be >= minimum' for each of the named settings fields below minimum."""
    return [f"{n}={getattr(settings, n)} must be >= {minimum}" for n in names if getattr(settings, n) < minimum]


def raise_problems(what: str, problems: list[str]) -> None:
    """One ValueError naming every problem of a settings object, or nothing when there are none."""
    if problems:
        raise ValueError(f"invalid {what} settings: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one decoder of a registered family (`family`: Qwen2.5, the causal
    verifier and AR baseline; Dream or LLaDA, bidirectional drafters; see family.Family's quirks).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    family: Family = QWEN2
    max_position_embeddings: int = 32768
    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # compute (activation) dtype
    # "xla": apd_jax's einsum attention (every backend); "cudnn": cuDNN's fused flash
    # attention through jax.nn.dot_product_attention (CUDA GPUs, bf16/fp16 only).
    attention: str = "xla"

    def __post_init__(self) -> None:
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size {self.hidden_size} != num_heads {self.num_heads} x head_dim {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: use one of {ATTENTION_IMPLEMENTATIONS}")
        if not self.causal and self.mask_token_id is None:
            raise ValueError(f"a bidirectional ({self.model_type}) model needs mask_token_id in its config")

    @property
    def causal(self) -> bool:
        """Attention to earlier positions only (Qwen2.5); else bidirectional, a diffusion model."""
        return self.family.causal

    @property
    def is_diffusion(self) -> bool:
        return not self.family.causal

    @property
    def model_type(self) -> str:
        """The family's name: config.json's model_type, lower-cased."""
        return self.family.name

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_dict(
        cls,
        cfg: dict,
        generation: dict | None = None,
        *,
        param_dtype: Any = None,
        dtype: Any = None,
        source: str = "config.json",
        generation_source: str = "generation_config.json",
    ) -> "ModelConfig":
        """Build from the dicts of config.json (and generation_config.json, if any), checked by
        config_problems; an error names `source` (the file the dict came from) and every bad field."""
        generation = generation or {}
        for file, problems in ((source, config_problems(cfg)), (generation_source, _id_problems(generation))):
            if problems:
                raise ValueError(f"{file}: " + "; ".join(problems) + "; fix the file or restore the model's original")
        param_dtype = None if param_dtype is None else parse_dtype(param_dtype)
        dtype = param_dtype if dtype is None else parse_dtype(dtype)
        try:
            return cls._from_checked(cfg, generation, param_dtype=param_dtype, dtype=dtype)
        except ValueError as err:  # the dataclass's own checks (e.g. a Dream model without mask_token_id)
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def _from_checked(cls, cfg: dict, generation: dict, *, param_dtype: Any, dtype: Any) -> "ModelConfig":
        """from_hf_dict once config_problems found none: the token ids and dtype here (every family
        names them alike), the shapes by the family's reader."""
        family = FAMILIES[cfg["model_type"].lower()]
        # Every eos either file declares (an instruct checkpoint lists <|endoftext|> and <|im_end|>).
        eos_ids = merge_ids(generation.get("eos_token_id"), cfg.get("eos_token_id"))
        mask = generation.get("mask_token_id", cfg.get("mask_token_id"))
        stored = parse_dtype(cfg.get("torch_dtype", cfg.get("dtype", "float32")) or "float32")
        return cls(
            **family.read(cfg),
            family=family,
            mask_token_id=None if mask is None else int(mask),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=generation.get("pad_token_id", cfg.get("pad_token_id")),
            param_dtype=stored if param_dtype is None else param_dtype,
            dtype=stored if dtype is None else dtype,
        )

    def to_hf_dict(self, storage_dtype: str | None = None) -> tuple[dict, dict]:
        """(config.json, generation_config.json) dicts in the family's fields.

        The inverse of `from_hf_dict`; `storage_dtype` is the dtype the weights are saved in
        (default: param_dtype's), which from_hf_dict reads back as the parameter dtype.
        """
        return self.family.write(self, storage_dtype or jnp.dtype(self.param_dtype).name)

    def param_count(self) -> int:
        """Parameters of the model these shapes describe (q/k/v biases if the family has them; the head if untied)."""
        h, i, d, q, kv = self.hidden_size, self.intermediate_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = h * q * d * 2 + 2 * h * kv * d + (q * d + 2 * kv * d if self.family.qkv_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.vocab_size * h + self.num_layers * layer + h + head

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> "ModelConfig":
        """Read config.json (and generation_config.json when present) from a checkpoint directory."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{cfg_file} not found: a checkpoint directory needs the Hugging Face config.json beside its weights"
            )
        cfg = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else None
        return cls.from_hf_dict(cfg, gen, source=str(cfg_file), generation_source=str(gen_file), **kw)


_TOKEN_IDS = ("eos_token_id", "mask_token_id", "pad_token_id")


def _id_problems(fields: dict) -> list[str]:
    """The token-id fields of config.json or generation_config.json: each null, an id >= 0 or (eos) a list."""
    problems = []
    for name in _TOKEN_IDS:
        value = fields.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(is_int(i) and i >= 0 for i in ids):
            what = "a token id (an integer >= 0)" + (" or a list of them" if name == "eos_token_id" else "")
            problems.append(f"{name} {value!r} must be {what}")
    return problems


def config_problems(cfg: dict) -> list[str]:
    """What keeps a config.json dict from describing a model apd_jax runs: a model_type of no
    registered family, then the family's own checks (each missing field, each field of the wrong type
    or range: integers are JSON integers, not strings or booleans; unsupported features; shapes that
    do not divide), the token ids and the dtype. Empty when there is none."""
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type.lower() not in FAMILIES:
        return [f"unsupported model_type {model_type!r}: apd_jax reads the families "
                f"{sorted(FAMILIES)} (config.json's model_type, any case)"]
    problems = FAMILIES[model_type.lower()].problems(cfg) + _id_problems(cfg)
    for name in ("torch_dtype", "dtype"):
        if cfg.get(name) is not None and cfg[name] not in _DTYPES:
            problems.append(f"{name} {cfg[name]!r} must be one of {sorted(_DTYPES)}")
    return problems


def dream_7b_config(**kw: Any) -> ModelConfig:
    """Dream-v0-Instruct-7B shapes, as its Hugging Face config.json gives them (Dream-org/Dream-v0-Instruct-7B).

    Qwen2.5-7B's architecture (Dream is initialised from it) with bidirectional attention
    and the mask token `<|mask|>` = 151666 added to Qwen2.5's vocabulary.
    """
    base = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=1e6, family=DREAM, tie_word_embeddings=False,
        mask_token_id=151666, eos_token_ids=(151643,), pad_token_id=151643,
        max_position_embeddings=131072,
    )
    return ModelConfig(**(base | kw))


def qwen25_7b_config(**kw: Any) -> ModelConfig:
    """Qwen2.5-7B shapes: Dream's, causal (the paper's AR baseline)."""
    return dream_7b_config(family=QWEN2, mask_token_id=None, **kw)


def qwen25_05b_config(**kw: Any) -> ModelConfig:
    """Qwen2.5-0.5B shapes (the verifier)."""
    base = dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1e6, family=QWEN2, tie_word_embeddings=True,
        eos_token_ids=(151643,), pad_token_id=151643, max_position_embeddings=32768,
    )
    return ModelConfig(**(base | kw))


def llada_8b_config(**kw: Any) -> ModelConfig:
    """LLaDA-8B-Instruct shapes, as its Hugging Face config.json gives them (GSAI-ML/LLaDA-8B-Instruct):
    bidirectional, no q/k/v bias, untied head, the mask token `<|mdm_mask|>` = 126336 and the eos
    `<|endoftext|>` = 126081 (also its pad)."""
    base = dict(
        vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5, family=LLADA,
        tie_word_embeddings=False, mask_token_id=126336, eos_token_ids=(126081,), pad_token_id=126081,
        max_position_embeddings=4096,
    )
    return ModelConfig(**(base | kw))


def tiny_config(causal: bool, **kw: Any) -> ModelConfig:
    """A tiny random-initialisable pair member (smoke runs, CPU benchmarks): Dream-style if not causal."""
    base = dict(
        vocab_size=336 if not causal else 320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, family=QWEN2 if causal else DREAM,
        tie_word_embeddings=causal, mask_token_id=None if causal else 330, eos_token_ids=(2,),
        pad_token_id=2, max_position_embeddings=4096,
    )
    return ModelConfig(**(base | kw))


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The shapes of one member of the embedded pair (`apd-jax train`); `config` adds the rest."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def config(self, *, causal: bool, vocab_size: int, max_len: int, param_dtype: Any, dtype: Any) -> ModelConfig:
        """A verifier (causal, tied embeddings) or a Dream-style drafter with apd_jax.text.tokenizer's special ids."""
        if self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"hidden size {self.hidden} is not a multiple of the head count {self.heads}")
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
            head_dim=self.hidden // self.heads, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=causal, family=QWEN2 if causal else DREAM, max_position_embeddings=max_len,
            mask_token_id=None if causal else MASK_ID,
            eos_token_ids=(EOS_ID,), pad_token_id=EOS_ID, param_dtype=param_dtype, dtype=dtype,
        )


# The embedded pair's sizes (apd_jax/assets): `apd-jax train`'s defaults (apd_jax.training.settings).
DRAFTER_SIZE = ModelSize(hidden=256, layers=8, heads=4, kv_heads=4, intermediate=768)
VERIFIER_SIZE = ModelSize(hidden=192, layers=5, heads=3, kv_heads=3, intermediate=512)
