"""8-bit weights (opt-in): a Transformer whose matmul weights are held in 8 bits, with one scale per
output channel (symmetric, qwix's absmax: scale = the channel's largest |weight| / 127.5 for int8,
/ 448 for e4m3; the scales in the parameter dtype).

Modes (MODES):
  int8         weight-only: the weights int8, the activations in the compute dtype.
  fp8          the weights float8_e4m3fn and, in the decoder layers' projections, the activations
               too (e4m3, one scale per token, computed on the fly): each projection is a dot of
               two fp8 operands, its scales applied to the output.
  fp8-weights  weight-only, the weights float8_e4m3fn.

What is quantized:
- The decoder layers' projections (q/k/v, o, gate/up, down: PROJECTIONS), by qwix (its PtqProvider
  and a QtRule): each kernel becomes qwix's quantized array (`kernel.array.qvalue`, `.scale`), and
  qwix intercepts the model's `__call__` to run those dots. Attention's own einsums, norms, RoPE and
  the KV caches stay in the compute dtype.
- The output head, weight-only in every mode, as a QuantizedTable (qwix does not reach it:
  Transformer.logits is a second method, and a tied head is also read by the embedding lookup).
  The head is a large share of a small model's bytes (Qwen2.5-0.5B's tied 152k x 896 head is 27%
  of its weights) and is read whole at every pass.
- A tied head is the embedding table: quantized with one scale per row (the head's output
  channel), and a lookup dequantizes only the rows it reads (QuantizedEmbed). An untied model's
  input embedding stays as it is: a lookup reads a few rows per token, so 8 bits would save memory
  but no time.

How the matmuls run. Weight-only (int8, fp8-weights): the weight is dequantized (converted to the
compute dtype and multiplied by its scales) as the dot's operand, so XLA upcasts: the GEMM itself is
one of the compute dtype (bf16 x bf16). On CPU the compiled HLO shows a fusion that converts and
scales the s8 weight into a float32 buffer ahead of a separate dot. On a GPU, XLA's GEMM fusion can
take the convert and the scaling into the GEMM (a Triton GEMM reading s8), so that only 8 bits per
weight cross memory; whether it does at a shape is read off a profile (a loop fusion reading s8 and
writing bf16 ahead of the GEMM means it did not, and the weight crossed memory three times). fp8:
the dot's operands are both f8e4m3fn (the StableHLO dot_general takes fp8 x fp8, the scales
multiply its output): on GPUs with fp8 tensor cores (H100, H200) XLA can run it as an fp8 GEMM (a
profile names the kernel); on CPU it upcasts.

Every decoder runs the quantized model as it is: it is a Transformer (a subclass qwix makes) with
the same methods. A model is quantized whole on its device (`quantize`), or built abstract
(`abstract_quantized`) for a checkpoint of quantized weights to be loaded into; `quantized_params`
quantizes any part of a model's parameters, so a converter can go one parameter at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx, traverse_util

from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer


@dataclasses.dataclass(frozen=True)
class Mode:
    """The 8-bit type of the weights and, where the projections' activations are quantized too, theirs."""

    weights: str
    activations: str | None = None


MODES = {
    "int8": Mode("int8"),
    "fp8": Mode("float8_e4m3fn", "float8_e4m3fn"),
    "fp8-weights": Mode("float8_e4m3fn"),
}

# The modules qwix quantizes, by their path in the model (qwix's '/'-joined module path).
PROJECTIONS = r"layers/\d+/(self_attn/(qkv_proj|o_proj)|mlp/(gate_up_proj|down_proj))"


def check_mode(mode: Any) -> str:
    """`mode` if it names one of MODES, else a ValueError listing them."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"quantize={mode!r}: use one of {', '.join(MODES)} (or none, for the weights as they are)")
    return mode


def quantization(model: Transformer) -> str | None:
    """The mode a model was quantized with, or None for a model of unquantized weights."""
    return getattr(model, "quantization", None)


class QuantizedTable(nnx.Module):
    """A weight matrix held in 8 bits with one scale per row or per column; `table[...]` reads it
    whole, dequantized in the scales' dtype, as a Param reads its value (Transformer.logits reads
    the head so)."""

    def __init__(self, qvalue: jax.Array, scale: jax.Array):
        self.qvalue = nnx.Param(qvalue)
        self.scale = nnx.Param(scale)

    def __getitem__(self, index: Any) -> jax.Array:
        scale = self.scale[...]
        return (self.qvalue[...].astype(scale.dtype) * scale)[index]


class QuantizedEmbed(nnx.Module):
    """The embedding lookup of a QuantizedTable [vocab, hidden] with one scale per row: only the rows
    looked up are dequantized, in the compute dtype (as nnx.Embed gives them)."""

    def __init__(self, embedding: QuantizedTable, dtype: Any):
        self.embedding = embedding
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = jnp.take(self.embedding.qvalue[...], ids, axis=0).astype(self.dtype)
        return rows * jnp.take(self.embedding.scale[...], ids, axis=0).astype(self.dtype)


def _table_values(weight: jax.Array, qtype: str, channel_axis: int) -> dict[str, jax.Array]:
    """{'qvalue', 'scale'} of a head weight, one scale along `channel_axis` (qwix's absmax, as for the layers)."""
    q = qwix.quantize(weight, qtype, channelwise_axes=(channel_axis,))
    return {"qvalue": q.qvalue, "scale": q.scale}


def _head(model: Transformer) -> tuple[tuple[str, ...], int]:
    """The head's parameter path and its output-channel axis: the tied embedding [vocab, hidden]'s
    rows, or lm_head [hidden, vocab]'s columns."""
    return (("embed_tokens", "embedding"), 0) if model.cfg.tie_word_embeddings else (("lm_head",), 1)


def _quantize_head(model: Transformer, qtype: str) -> None:
    """Replace the model's head (and, tied, its embedding) by a QuantizedTable of its current weights."""
    (path, axis), cfg = _head(model), model.cfg
    if cfg.tie_word_embeddings:
        table = QuantizedTable(**_table_values(model.embed_tokens.embedding[...], qtype, axis))
        model.embed_tokens = QuantizedEmbed(table, cfg.dtype)
    else:
        model.lm_head = QuantizedTable(**_table_values(model.lm_head[...], qtype, axis))


def abstract_quantized(cfg: ModelConfig, mode: str) -> Transformer:
    """The structure of the model `cfg` describes, quantized with `mode`: shapes and dtypes only
    (nothing allocated), the quantized weights' leaves in place of the kernels."""
    spec = MODES[check_mode(mode)]
    rule = qwix.QtRule(module_path=PROJECTIONS, weight_qtype=spec.weights, act_qtype=spec.activations)

    def build() -> Transformer:
        # qwix quantizes each kernel the first time its op runs: one call on a single token.
        model = qwix.quantize_model(Transformer(cfg, rngs=nnx.Rngs(0)), qwix.PtqProvider([rule]),
                                    jnp.zeros((1, 1), jnp.int32))
        _quantize_head(model, spec.weights)
        model.quantization = mode
        return model

    return nnx.eval_shape(build)


def quantized_params(params: dict, target: Transformer) -> dict:
    """Unquantized parameters (a pure dict as nnx.to_pure_dict gives it, the whole model's or any
    part of it) -> those of `target` (abstract_quantized's model): each quantized weight's leaves in
    place of it, every other parameter as it is. Computed where the arrays are, in float32 (a bf16
    weight divided by its scale in bf16 would be rounded twice, up to 3/4 of a step off), each leaf
    then stored in target's dtype (the scales in the parameter dtype)."""
    (head, axis), mode = _head(target), MODES[quantization(target)]
    flat = {path: value.astype(jnp.float32) for path, value in traverse_util.flatten_dict(params).items()}
    weight = flat.pop(head, None)
    out = traverse_util.flatten_dict(qwix.quantize_params(traverse_util.unflatten_dict(flat), target)) if flat else {}
    if weight is not None:
        out |= {(*head, name): value for name, value in _table_values(weight, mode.weights, axis).items()}
    dtypes = {path: leaf.get_value().dtype for path, leaf in nnx.to_flat_state(nnx.state(target))}
    return traverse_util.unflatten_dict({path: value.astype(dtypes[path]) for path, value in out.items()})


def quantize(model: Transformer, mode: str) -> Transformer:
    """A copy of `model` with 8-bit weights (`mode`: one of MODES), quantized on the weights' device;
    `model` is left as it is."""
    mode = check_mode(mode)
    if quantization(model) is not None:
        raise ValueError(f"the model is quantized already ({quantization(model)}); quantize its unquantized weights")
    target = abstract_quantized(model.cfg, mode)
    graphdef, state = nnx.split(target)
    # Eager, one weight at a time: a weight's temporaries only, and each small op compiled once per shape.
    nnx.replace_by_pure_dict(state, quantized_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), target))
    return nnx.merge(graphdef, state)
