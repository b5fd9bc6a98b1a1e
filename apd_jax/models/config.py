"""Model configuration for the Qwen2 family: Qwen2.5 (causal) and Dream (bidirectional).

Read from a Hugging Face `config.json` (from_hf_dict) and written back (to_hf_dict);
Dream uses the same field names with model_type "Dream" plus a mask token id (in
config.json or generation_config.json). Presets: the real checkpoints' shapes, a tiny
pair for smoke runs, and the embedded pair's sizes (ModelSize, `apd-jax train`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from apd_jax.text.tokenizer import EOS_ID, MASK_ID, merge_ids

SUPPORTED_MODEL_TYPES = {"qwen2": True, "dream": False}  # model_type -> causal

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
    """Shapes and numerics of one Qwen2-family decoder.

    `causal=True` is Qwen2.5 (verifier, AR baseline); `causal=False` is Dream,
    whose prediction for position i is read at output i - 1 (see model.shift_right).
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
    causal: bool = True
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"
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
            raise ValueError("a bidirectional (Dream) model needs mask_token_id in its config")

    @property
    def is_diffusion(self) -> bool:
        return not self.causal

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
        """from_hf_dict once config_problems found none."""
        model_type = cfg["model_type"].lower()
        heads = cfg["num_attention_heads"]
        # Every eos either file declares (an instruct checkpoint lists <|endoftext|> and <|im_end|>).
        eos_ids = merge_ids(generation.get("eos_token_id"), cfg.get("eos_token_id"))
        mask = generation.get("mask_token_id", cfg.get("mask_token_id"))
        rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        stored = parse_dtype(cfg.get("torch_dtype", cfg.get("dtype", "float32")) or "float32")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim", cfg["hidden_size"] // heads),
            rope_theta=float(rope),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            causal=SUPPORTED_MODEL_TYPES[model_type],
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            model_type=model_type,
            mask_token_id=None if mask is None else int(mask),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=generation.get("pad_token_id", cfg.get("pad_token_id")),
            param_dtype=stored if param_dtype is None else param_dtype,
            dtype=stored if dtype is None else dtype,
        )

    def to_hf_dict(self, storage_dtype: str | None = None) -> tuple[dict, dict]:
        """(config.json, generation_config.json) dicts: Qwen2's fields, or Dream's for a drafter.

        The inverse of `from_hf_dict`; `storage_dtype` is the dtype the weights are saved in
        (default: param_dtype's), which from_hf_dict reads back as the parameter dtype.
        """
        storage_dtype = storage_dtype or jnp.dtype(self.param_dtype).name
        eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (list(self.eos_token_ids) or None)
        first_eos = self.eos_token_ids[0] if self.eos_token_ids else None  # Qwen2 checkpoints' bos is their eos
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # legacy field (Qwen2.5 / Dream checkpoints), and transformers 5's:
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": first_eos,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": storage_dtype,
        }
        if self.causal:
            config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **common,
                      "max_window_layers": self.num_layers, "initializer_range": 0.02}
            generation = {"bos_token_id": first_eos, "eos_token_id": eos, "pad_token_id": self.pad_token_id}
        else:
            config = {"model_type": "Dream", "architectures": ["DreamModel"], **common,
                      "mask_token_id": self.mask_token_id}
            generation = {"mask_token_id": self.mask_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id,
                          "bos_token_id": first_eos}
        return config, generation

    def param_count(self) -> int:
        """Parameters of the model these shapes describe (q/k/v biases included; the head if untied)."""
        h, i, d, q, kv = self.hidden_size, self.intermediate_size, self.head_dim, self.num_heads, self.num_kv_heads
        attn = h * q * d * 2 + 2 * h * kv * d + q * d + 2 * kv * d
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


_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_FLOATS = ("rope_theta", "rms_norm_eps")
_OPTIONAL_BOOLS = ("tie_word_embeddings", "use_sliding_window")
_TOKEN_IDS = ("eos_token_id", "mask_token_id", "pad_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_problems(fields: dict) -> list[str]:
    """The token-id fields of config.json or generation_config.json: each null, an id >= 0 or (eos) a list."""
    problems = []
    for name in _TOKEN_IDS:
        value = fields.get(name)
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
            what = "a token id (an integer >= 0)" + (" or a list of them" if name == "eos_token_id" else "")
            problems.append(f"{name} {value!r} must be {what}")
    return problems


def config_problems(cfg: dict) -> list[str]:
    """What keeps a config.json dict from describing a model apd_jax runs: each missing field, each
    field of the wrong type or range (integers are JSON integers, not strings or booleans), shapes
    that do not divide, and unsupported features. Empty when there is none."""
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type.lower() not in SUPPORTED_MODEL_TYPES:
        return [f"unsupported model_type {model_type!r}: apd_jax reads Qwen2-family checkpoints "
                f"(model_type one of {sorted(SUPPORTED_MODEL_TYPES)})"]
    missing = [name for name in _REQUIRED_INTS if name not in cfg]
    problems = [f"required field {name!r} is missing" for name in missing]
    for name in _REQUIRED_INTS + _OPTIONAL_INTS:
        if name in cfg and name not in missing and not (_is_int(cfg[name]) and cfg[name] >= 1):
            problems.append(f"{name} {cfg[name]!r} must be an integer >= 1")
    for name in _OPTIONAL_FLOATS:
        value = cfg.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            problems.append(f"{name} {value!r} must be a number > 0")
    for name in _OPTIONAL_BOOLS:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            problems.append(f"{name} {cfg[name]!r} must be true or false")
    problems += _id_problems(cfg)
    for name in ("torch_dtype", "dtype"):
        if cfg.get(name) is not None and cfg[name] not in _DTYPES:
            problems.append(f"{name} {cfg[name]!r} must be one of {sorted(_DTYPES)}")
    for name in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(name)
        if rope is not None and not isinstance(rope, dict):
            problems.append(f"{name} {rope!r} must be an object")
        elif rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"{name} {rope!r} is not supported (only the default RoPE)")
    if cfg.get("use_sliding_window") is True:
        problems.append("use_sliding_window=true is not supported")
    return problems or _shape_problems(cfg)


def _shape_problems(cfg: dict) -> list[str]:
    """Attention shapes that do not divide (config_problems, once every field is a positive integer)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, head_dim = cfg.get("num_key_value_heads", heads), cfg.get("head_dim")
    problems = []
    if head_dim is None and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    elif head_dim is not None and hidden != heads * head_dim:
        problems.append(f"hidden_size {hidden} != num_attention_heads {heads} x head_dim {head_dim}")
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return problems


def dream_7b_config(**kw: Any) -> ModelConfig:
    """Dream-v0-Instruct-7B shapes, as its Hugging Face config.json gives them (Dream-org/Dream-v0-Instruct-7B).

    Qwen2.5-7B's architecture (Dream is initialised from it) with bidirectional attention
    and the mask token `<|mask|>` = 151666 added to Qwen2.5's vocabulary.
    """
    base = dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=1e6, causal=False, tie_word_embeddings=False,
        model_type="dream", mask_token_id=151666, eos_token_ids=(151643,), pad_token_id=151643,
        max_position_embeddings=131072,
    )
    return ModelConfig(**(base | kw))


def qwen25_7b_config(**kw: Any) -> ModelConfig:
    """Qwen2.5-7B shapes: Dream's, causal (the paper's AR baseline)."""
    return dream_7b_config(causal=True, model_type="qwen2", mask_token_id=None, **kw)


def qwen25_05b_config(**kw: Any) -> ModelConfig:
    """Qwen2.5-0.5B shapes (the verifier)."""
    base = dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1e6, causal=True, tie_word_embeddings=True,
        model_type="qwen2", eos_token_ids=(151643,), pad_token_id=151643, max_position_embeddings=32768,
    )
    return ModelConfig(**(base | kw))


def tiny_config(causal: bool, **kw: Any) -> ModelConfig:
    """A tiny random-initialisable pair member (smoke runs, CPU benchmarks): Dream-style if not causal."""
    base = dict(
        vocab_size=336 if not causal else 320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, causal=causal, tie_word_embeddings=causal,
        model_type="qwen2" if causal else "dream", mask_token_id=None if causal else 330, eos_token_ids=(2,),
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
            tie_word_embeddings=causal, causal=causal, max_position_embeddings=max_len,
            model_type="qwen2" if causal else "dream", mask_token_id=None if causal else MASK_ID,
            eos_token_ids=(EOS_ID,), pad_token_id=EOS_ID, param_dtype=param_dtype, dtype=dtype,
        )


# The embedded pair's sizes (apd_jax/assets): `apd-jax train`'s defaults (apd_jax.training.settings).
DRAFTER_SIZE = ModelSize(hidden=256, layers=8, heads=4, kv_heads=4, intermediate=768)
VERIFIER_SIZE = ModelSize(hidden=192, layers=5, heads=3, kv_heads=3, intermediate=512)
