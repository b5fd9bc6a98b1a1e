"""The LLaDA family (model_type "llada"): a bidirectional transformer in OLMo's layout, as the
published modeling_llada.py (shipped with GSAI-ML/LLaDA-8B-Instruct) builds it with its "llama"
block: RMSNorm, RoPE computed in float32, separate q/k/v projections without bias, SwiGLU with
`ff_proj` the activated branch (silu(ff_proj(x)) * up_proj(x)), an untied head `ff_out` unless
weight_tying. Its prediction for position i is read at output i (no shift).

config.json holds OLMo's field names. A field left out takes the published ModelConfig's default
(e.g. block_type "sequential", weight_tying true), as the published code would; what that code
would build differently from the llama block apd_jax runs is refused, naming the field. The
embedding has `embedding_size` rows (at least vocab_size, padded): the published model's logits
cover all of them, and so do apd_jax's (ModelConfig.vocab_size is that row count).
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

from apd_jax.models.family import MODEL, Family, Param, eos_field, field_problems, head_problems
from apd_jax.models.layouts import QKV_FUSED, SAME, STACKED, TRANSPOSED


def _block(names: str) -> tuple[str, ...]:
    return tuple(f"model.transformer.blocks.{{i}}.{n}.weight" for n in names.split())


# The Flax paths of model.Transformer (the same module runs every family) -> LLaDA's tensors.
PARAMS: dict[str, Param] = {
    "embed_tokens.embedding": Param(("model.transformer.wte.weight",), SAME, P(MODEL, None), "vocab_size"),
    "layers.{i}.input_layernorm.weight": Param(_block("attn_norm"), SAME),
    "layers.{i}.self_attn.qkv_proj.kernel": Param(
        _block("q_proj k_proj v_proj"), QKV_FUSED, P(None, MODEL, None, None), "num_kv_heads"
    ),
    "layers.{i}.self_attn.o_proj.kernel": Param(_block("attn_out"), TRANSPOSED, P(MODEL, None), "num_heads"),
    "layers.{i}.post_attention_layernorm.weight": Param(_block("ff_norm"), SAME),
    "layers.{i}.mlp.gate_up_proj.kernel": Param(
        _block("ff_proj up_proj"), STACKED, P(None, None, MODEL), "intermediate_size"
    ),
    "layers.{i}.mlp.down_proj.kernel": Param(_block("ff_out"), TRANSPOSED, P(MODEL, None), "intermediate_size"),
    "norm.weight": Param(("model.transformer.ln_f.weight",), SAME),
    "lm_head": Param(("model.transformer.ff_out.weight",), TRANSPOSED, P(None, MODEL), "vocab_size"),
}

_REQUIRED_INTS = ("d_model", "n_heads", "n_layers", "vocab_size")
_OPTIONAL_INTS = ("n_kv_heads", "mlp_hidden_size", "mlp_ratio", "embedding_size", "max_sequence_length")
# field -> (the value apd_jax runs, the published ModelConfig's default when the field is absent)
_FIXED: dict[str, tuple[Any, Any]] = {
    "block_type": ("llama", "sequential"),
    "layer_norm_type": ("rms", "default"),
    "activation_type": ("silu", "swiglu"),
    "rope": (True, False),
    "rope_full_precision": (True, True),
    "alibi": (False, False),
    "include_bias": (False, False),
    "layer_norm_with_affine": (True, True),
    "attention_layer_norm": (False, False),
    "input_emb_norm": (False, False),
    "scale_logits": (False, False),
    "block_group_size": (1, 1),
}
_FALSE_OR_NULL = ("include_qkv_bias", "bias_for_layer_norm")  # null: inherits include_bias (false)


def _kv_heads(cfg: dict) -> int | None:
    """The published ModelConfig.effective_n_kv_heads; None where it raises (n_kv_heads contradicts
    multi_query_attention)."""
    heads, kv, mqa = cfg["n_heads"], cfg.get("n_kv_heads"), cfg.get("multi_query_attention")
    if kv is None:
        return 1 if mqa is True else heads
    if mqa is None:
        return kv
    should_be = 1 if mqa else heads
    return kv if kv == should_be else None


def problems(cfg: dict) -> list[str]:
    """What keeps a LLaDA config.json dict from describing a model apd_jax runs as the published code
    does: fields of the wrong type or range, settings of another block than LLaDA's, then shapes
    that do not divide."""
    found = field_problems(cfg, required=_REQUIRED_INTS, ints=_OPTIONAL_INTS, floats=("rope_theta", "rms_norm_eps"),
                           bools=("weight_tying", "multi_query_attention"))
    for name, (want, default) in _FIXED.items():
        value = cfg.get(name, default)
        if not (type(value) is type(want) and value == want):
            given = f"{name} {value!r}" if name in cfg else f"{name} is missing (the published code then uses {default!r})"
            found.append(f"{given}: apd_jax runs LLaDA's {name} {want!r} only")
    for name in _FALSE_OR_NULL:
        if cfg.get(name) is not None and cfg[name] is not False:
            found.append(f"{name} {cfg[name]!r}: apd_jax runs LLaDA without these biases (false or null) only")
    if found:
        return found
    kv = _kv_heads(cfg)
    if kv is None:
        return [f"n_kv_heads {cfg['n_kv_heads']} contradicts multi_query_attention "
                f"{cfg['multi_query_attention']!r}; set multi_query_attention to null"]
    found = head_problems(cfg["d_model"], cfg["n_heads"], kv, ("d_model", "n_heads", "n_kv_heads"))
    if cfg.get("embedding_size") is not None and cfg["embedding_size"] < cfg["vocab_size"]:
        found.append(f"embedding_size {cfg['embedding_size']} is smaller than vocab_size {cfg['vocab_size']}")
    return found


def read(cfg: dict) -> dict[str, Any]:
    """ModelConfig's shape and numerics fields from a checked LLaDA config.json dict."""
    return dict(
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"],
        num_layers=cfg["n_layers"],
        num_heads=cfg["n_heads"],
        num_kv_heads=_kv_heads(cfg),
        head_dim=cfg["d_model"] // cfg["n_heads"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=cfg.get("weight_tying", True),
        max_position_embeddings=cfg.get("max_sequence_length", 1024),
    )


def write(cfg: Any, storage_dtype: str) -> tuple[dict, dict]:
    """LLaDA's config.json (every field the published code reads that apd_jax fixes, written out)
    and generation_config.json. No auto_map: a directory apd_jax writes holds no modeling code for
    transformers' trust_remote_code to import (a converted one copies its source's config and code)."""
    config = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "d_model": cfg.hidden_size,
        "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "n_layers": cfg.num_layers,
        "mlp_hidden_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "weight_tying": cfg.tie_word_embeddings,
        **{name: want for name, (want, _) in _FIXED.items()},
        "include_qkv_bias": False,
        "bias_for_layer_norm": False,
        "multi_query_attention": None,
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": eos_field(cfg),
        "pad_token_id": cfg.pad_token_id,
        "use_cache": False,
        "torch_dtype": storage_dtype,
    }
    return config, {"eos_token_id": eos_field(cfg), "pad_token_id": cfg.pad_token_id}


LLADA = Family("llada", causal=False, shift=False, qkv_bias=False, rope_float32=True, params=PARAMS,
               problems=problems, read=read, write=write, vocabulary="llada")
