"""Every parameter of the model described once: its Flax path, the Hugging Face tensors it holds
and their layout (checkpoint.py converts by it), and its split over a device mesh (sharding.py
places by it). A new parameter is one entry here.

Layouts:
  "same":  one tensor, stored as is;
  "T":     one Linear weight, HF [out, in] -> Flax [in, out];
  "qkv":   the q, k, v Linear weights (or, 1-D, their biases) -> [in, kv_heads, g + 2, head_dim]
           (model.Attention: per KV head its g query heads, its key, its value);
  "stack": the gate and up Linear weights -> [in, 2, intermediate] (model.MLP).
Partition specs name the mesh's `model` axis (sharding.py's tensor parallelism); Flax kernels
are [in, out]. `split` is the ModelConfig field the `model` axis must divide.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P

MODEL = "model"  # the mesh axis of tensor parallelism (sharding.py)
LAYOUTS = ("same", "T", "qkv", "stack")


@dataclasses.dataclass(frozen=True)
class Param:
    hf: tuple[str, ...]  # Hugging Face tensor names; "{i}" is the layer index
    layout: str
    spec: P = P()  # over the mesh; P() is replicated
    split: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} must be one of {LAYOUTS}")


def _per_layer(module: str, names: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{i}}.{module}.{n}" for n in names.split())


# Flax path ("{i}" is the layer index) -> its description.
PARAM_TABLE: dict[str, Param] = {
    "embed_tokens.embedding": Param(("model.embed_tokens.weight",), "same", P(MODEL, None), "vocab_size"),
    "layers.{i}.input_layernorm.weight": Param(_per_layer("input_layernorm", "weight"), "same"),
    # [hidden, kv_heads, g + 2, head_dim]: whole KV-head groups (their query heads, key and value) per device
    "layers.{i}.self_attn.qkv_proj.kernel": Param(
        _per_layer("self_attn", "q_proj.weight k_proj.weight v_proj.weight"), "qkv", P(None, MODEL, None, None),
        "num_kv_heads",
    ),
    "layers.{i}.self_attn.qkv_proj.bias": Param(
        _per_layer("self_attn", "q_proj.bias k_proj.bias v_proj.bias"), "qkv", P(MODEL, None, None), "num_kv_heads"
    ),
    "layers.{i}.self_attn.o_proj.kernel": Param(  # [heads * head_dim, hidden]
        _per_layer("self_attn", "o_proj.weight"), "T", P(MODEL, None), "num_heads"
    ),
    "layers.{i}.post_attention_layernorm.weight": Param(_per_layer("post_attention_layernorm", "weight"), "same"),
    "layers.{i}.mlp.gate_up_proj.kernel": Param(  # [hidden, 2, intermediate]
        _per_layer("mlp", "gate_proj.weight up_proj.weight"), "stack", P(None, None, MODEL), "intermediate_size"
    ),
    "layers.{i}.mlp.down_proj.kernel": Param(  # [intermediate, hidden]
        _per_layer("mlp", "down_proj.weight"), "T", P(MODEL, None), "intermediate_size"
    ),
    "norm.weight": Param(("model.norm.weight",), "same"),
    "lm_head": Param(("lm_head.weight",), "T", P(None, MODEL), "vocab_size"),  # [hidden, vocab]
}


def param_entry(path: str) -> Param:
    """The description of one Flax parameter (e.g. 'layers.3.mlp.down_proj.kernel'), layer index filled in."""
    parts = path.split(".")
    layer = parts[1] if parts[0] == "layers" and len(parts) > 1 else None
    template = ".".join(["layers", "{i}", *parts[2:]]) if layer is not None else path
    if template not in PARAM_TABLE:
        raise ValueError(f"parameter {path!r} is not described in apd_jax.models.params.PARAM_TABLE")
    entry = PARAM_TABLE[template]
    return dataclasses.replace(entry, hf=tuple(n.replace("{i}", layer or "") for n in entry.hf))
