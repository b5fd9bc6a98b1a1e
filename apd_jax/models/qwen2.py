"""The Qwen2 families: Qwen2.5 (causal, model_type "qwen2") and Dream (bidirectional, model_type
"Dream", Qwen2.5's layers and tensor names with a mask token, its prediction for position i read at
output i - 1). Both have q/k/v biases; config.json holds Qwen2's field names in both."""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

from apd_jax.models.family import MODEL, Family, Param, eos_field, field_problems, first_eos
from apd_jax.models.layouts import QKV_FUSED, SAME, STACKED, TRANSPOSED


def _per_layer(module: str, names: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{i}}.{module}.{n}" for n in names.split())


# Flax path ("{i}" is the layer index) -> its description.
PARAMS: dict[str, Param] = {
    "embed_tokens.embedding": Param(("model.embed_tokens.weight",), SAME, P(MODEL, None), "vocab_size"),
    "layers.{i}.input_layernorm.weight": Param(_per_layer("input_layernorm", "weight"), SAME),
    # [hidden, kv_heads, g + 2, head_dim]: whole KV-head groups (their query heads, key and value) per device
    "layers.{i}.self_attn.qkv_proj.kernel": Param(
        _per_layer("self_attn", "q_proj.weight k_proj.weight v_proj.weight"), QKV_FUSED, P(None, MODEL, None, None),
        "num_kv_heads",
    ),
    "layers.{i}.self_attn.qkv_proj.bias": Param(
        _per_layer("self_attn", "q_proj.bias k_proj.bias v_proj.bias"), QKV_FUSED, P(MODEL, None, None),
        "num_kv_heads",
    ),
    "layers.{i}.self_attn.o_proj.kernel": Param(  # [heads * head_dim, hidden]
        _per_layer("self_attn", "o_proj.weight"), TRANSPOSED, P(MODEL, None), "num_heads"
    ),
    "layers.{i}.post_attention_layernorm.weight": Param(_per_layer("post_attention_layernorm", "weight"), SAME),
    "layers.{i}.mlp.gate_up_proj.kernel": Param(  # [hidden, 2, intermediate]
        _per_layer("mlp", "gate_proj.weight up_proj.weight"), STACKED, P(None, None, MODEL), "intermediate_size"
    ),
    "layers.{i}.mlp.down_proj.kernel": Param(  # [intermediate, hidden]
        _per_layer("mlp", "down_proj.weight"), TRANSPOSED, P(MODEL, None), "intermediate_size"
    ),
    "norm.weight": Param(("model.norm.weight",), SAME),
    "lm_head": Param(("lm_head.weight",), TRANSPOSED, P(None, MODEL), "vocab_size"),  # [hidden, vocab]
}

_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def problems(cfg: dict) -> list[str]:
    """What keeps a Qwen2 or Dream config.json dict from describing a model apd_jax runs: fields of
    the wrong type or range, unsupported RoPE or sliding windows, then shapes that do not divide."""
    found = field_problems(
        cfg, required=_REQUIRED_INTS, ints=("num_key_value_heads", "head_dim", "max_position_embeddings"),
        floats=("rope_theta", "rms_norm_eps"), bools=("tie_word_embeddings", "use_sliding_window"),
    )
    for name in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(name)
        if rope is not None and not isinstance(rope, dict):
            found.append(f"{name} {rope!r} must be an object")
        elif rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            found.append(f"{name} {rope!r} is not supported (only the default RoPE)")
    if cfg.get("use_sliding_window") is True:
        found.append("use_sliding_window=true is not supported")
    return found or _shape_problems(cfg)


def _shape_problems(cfg: dict) -> list[str]:
    """Attention shapes that do not divide (once every field is a positive integer)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads, head_dim = cfg.get("num_key_value_heads", heads), cfg.get("head_dim")
    found = []
    if head_dim is None and hidden % heads:
        found.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    elif head_dim is not None and hidden != heads * head_dim:
        found.append(f"hidden_size {hidden} != num_attention_heads {heads} x head_dim {head_dim}")
    if heads % kv_heads:
        found.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return found


def read(cfg: dict) -> dict[str, Any]:
    """ModelConfig's shape and numerics fields from a checked Qwen2 or Dream config.json dict."""
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dict(
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
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
    )


def _common(cfg: Any, storage_dtype: str) -> dict:
    """The config.json fields Qwen2 and Dream share."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # legacy field (Qwen2.5 / Dream checkpoints), and transformers 5's:
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": first_eos(cfg),  # Qwen2 checkpoints' bos is their eos
        "eos_token_id": eos_field(cfg),
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": storage_dtype,
    }


def write_qwen2(cfg: Any, storage_dtype: str) -> tuple[dict, dict]:
    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **_common(cfg, storage_dtype),
              "max_window_layers": cfg.num_layers, "initializer_range": 0.02}
    return config, {"bos_token_id": first_eos(cfg), "eos_token_id": eos_field(cfg), "pad_token_id": cfg.pad_token_id}


def write_dream(cfg: Any, storage_dtype: str) -> tuple[dict, dict]:
    config = {"model_type": "Dream", "architectures": ["DreamModel"], **_common(cfg, storage_dtype),
              "mask_token_id": cfg.mask_token_id}
    generation = {"mask_token_id": cfg.mask_token_id, "eos_token_id": eos_field(cfg), "pad_token_id": cfg.pad_token_id,
                  "bos_token_id": first_eos(cfg)}
    return config, generation


QWEN2 = Family("qwen2", causal=True, shift=False, qkv_bias=True, rope_float32=False, params=PARAMS,
               problems=problems, read=read, write=write_qwen2, vocabulary="qwen2")
DREAM = Family("dream", causal=False, shift=True, qkv_bias=True, rope_float32=False, params=PARAMS,
               problems=problems, read=read, write=write_dream, vocabulary="qwen2")
