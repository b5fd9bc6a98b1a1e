"""The decoder in Flax NNX that runs every registered family (Qwen2.5, Dream, LLaDA: pre-norm
RMSNorm blocks, RoPE, grouped-query attention, SwiGLU); a family's quirks (attention mask, q/k/v
bias, RoPE precision, logit shift) are read from `ModelConfig.family`.

Names follow Qwen2's Hugging Face names, but q/k/v and gate/up are each one fused projection
(fewer, larger matmuls; each family's parameter table maps them to its HF tensors). A call runs a
window of tokens per row at absolute positions and, given a KVCache, attends to the cache plus the
window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from apd_jax.models.cache import KVCache, attention_mask
from apd_jax.models.config import ModelConfig

_init = nnx.initializers.normal(0.02)  # Hugging Face's initializer_range


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jnp.ones((cfg.hidden_size,), cfg.param_dtype))
        self.eps = cfg.rms_norm_eps
        self.dtype = cfg.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype) -> jax.Array:
    """As Hugging Face: normalise in float32, cast to `dtype`, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, Hugging Face layout (rotate_half): x [B, S, H, D], positions [B, S]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _linear(n_in: int, n_out: int, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, kernel_init=_init, rngs=rngs
    )


def _einsum(
    spec: str, kernel_shape: tuple[int, ...], cfg: ModelConfig, rngs: nnx.Rngs, bias: bool = False
) -> nnx.Einsum:
    """A fused projection: one kernel holding several Hugging Face Linear weights (checkpoint.py splits them)."""
    return nnx.Einsum(
        spec, kernel_shape, kernel_shape[1:] if bias else None, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_init, rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query attention, q, k and v in one projection: `qkv_proj.kernel` is [hidden, kv_heads,
    g + 2, head_dim], per KV head its g query heads (HF's query head j is KV head j // g), its key
    and its value, so a mesh splitting kv_heads keeps each group and its cache heads on one device.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        h, d, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads
        self.qkv_proj = _einsum(
            "bsh,hkcd->bskcd", (h, kvh, cfg.num_heads // kvh + 2, d), cfg, rngs, bias=cfg.family.qkv_bias
        )
        self.o_proj = _linear(cfg.num_heads * d, h, cfg, rngs)
        self.cfg = cfg

    def __call__(self, x, positions, kv_end, cache: KVCache | None, layer: int):
        cfg = self.cfg
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, KVH, g + 2, D]
        g = qkv.shape[3] - 2
        q = qkv[:, :, :, :g].reshape(b, s, cfg.num_heads, cfg.head_dim)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        if cfg.family.rope_float32:  # rotated in float32, then back to the compute dtype
            q = rope(q.astype(jnp.float32), positions, cfg.rope_theta).astype(q.dtype)
            k = rope(k.astype(jnp.float32), positions, cfg.rope_theta).astype(k.dtype)
        else:
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        if cache is None:
            keys, values, k_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions
        else:
            cache = cache.write(layer, k, v, positions)
            keys, values = cache.k[layer], cache.v[layer]  # [B, KVH, T, D]
            k_pos = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=positions.dtype), (b, cache.max_len))
        mask = attention_mask(positions, k_pos, kv_end, cfg.causal)
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        if cfg.attention == "cudnn":
            out = _cudnn_attention(q, keys, values, mask)
        else:
            out = _gqa_attention(q, keys, values, mask)
        return self.o_proj(out.reshape(b, s, -1)), cache


def _dot_operands(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """XLA:CPU has no bf16 x bf16 -> f32 dot (it fails at run time): give it float32 operands there."""
    if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
        return a.astype(jnp.float32), b.astype(jnp.float32)
    return a, b


def _gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention, softmax in float32: q [B,S,H,D], k/v [B,KVH,T,D] (the cache's
    layout), mask [B,S,T]. The queries go head-major ([B, KVH, g*S, D]) first, so neither matmul
    needs its float32 result transposed (BENCHMARKS.md, "head-major attention")."""
    b, s, h, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = h // kvh
    q = q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * s, d)
    scores = jnp.einsum("bkqd,bktd->bkqt", *_dot_operands(q, k), preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(d)
    )
    mask = jnp.broadcast_to(mask[:, None, None], (b, 1, g, s, t)).reshape(b, 1, g * s, t)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqt,bktd->bkqd", *_dot_operands(probs, v), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, kvh, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """cuDNN's fused flash attention, inputs and result as `_gqa_attention` (K/V swapped to the
    [B, T, KVH, D] jax.nn.dot_product_attention reads)."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' needs a CUDA GPU and bf16/fp16 compute (backend {jax.default_backend()}, "
            f"dtype {q.dtype.name}); use attention='xla'"
        )
    return jax.nn.dot_product_attention(
        q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask[:, None], implementation="cudnn"
    )


class MLP(nnx.Module):
    """SwiGLU with gate and up in one projection: `gate_up_proj.kernel` is [hidden, 2, intermediate]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate_up_proj = _einsum("bsh,hci->bsci", (cfg.hidden_size, 2, cfg.intermediate_size), cfg, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, kv_end, cache, layer):
        attn, cache = self.self_attn(self.input_layernorm(x), positions, kv_end, cache, layer)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Transformer(nnx.Module):
    """The decoder of every family: embeddings, decoder layers, final norm and output head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_init, rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            _init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        start: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, S, H] of tokens [B, S] at positions start[b] + [0, S), the first
        valid[b] real; with a cache, their K/V written there and the row's length start + valid."""
        b, s = tokens.shape
        start = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
        valid = jnp.full((b,), s, jnp.int32) if valid is None else valid.astype(jnp.int32)
        positions = start[:, None] + jnp.arange(s, dtype=jnp.int32)
        kv_end = start + valid
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, kv_end, cache, i)
        if cache is not None:
            cache = KVCache(cache.k, cache.v, kv_end)
        return self.norm(x), cache

    def logits(self, hidden: jax.Array, vocab: int | None = None) -> jax.Array:
        """Output head with float32 accumulation: [..., H] -> [..., vocab] float32, the first `vocab` ids."""
        w = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.matmul(*_dot_operands(hidden, w.astype(hidden.dtype)), preferred_element_type=jnp.float32)
        # Slice the output: a column slice of the weight copies the whole head every call.
        return logits if vocab is None else logits[..., :vocab]

    def aligned(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [B, S, H] of a whole window read as the family predicts: a diffusion
        model's output i is then its prediction for position i (Dream's shifted right by one,
        LLaDA's as they are); a causal model's, as they are, predict position i + 1."""
        return shift_right(hidden) if self.cfg.family.shift else hidden


def shift_right(hidden: jax.Array) -> jax.Array:
    """Dream's right shift: its prediction for position i is output i - 1 (output 0 stands for
    itself), the reference's `cat([logits[:, :1], logits[:, :-1]])` applied to hidden states."""
    return jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)


@nnx.jit
def forward_logits(model: Transformer, tokens: jax.Array) -> jax.Array:
    """Logits of a whole sequence without a cache, read as the family predicts (Transformer.aligned)."""
    hidden, _ = model(tokens)
    return model.logits(model.aligned(hidden))


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (Hugging Face's normal(0.02) initialiser)."""
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
    """The same weights under another config of identical parameter shapes and dtypes,
    e.g. `model.cfg.replace(attention="cudnn")`; nothing is copied."""
    target = abstract_model(cfg)
    shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m, nnx.Param))  # noqa: E731
    if shapes(target) != shapes(model):
        raise ValueError("with_config: the new config changes parameter shapes or dtypes; load the model again instead")
    return nnx.merge(nnx.graphdef(target), nnx.state(model))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with shapes and dtypes only: nothing allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@nnx.jit
def token_logprobs(model: Transformer, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(targets[b, s]) [B, S] as the model predicts it at output s (Transformer.aligned: a causal
    model's next token after inputs[b, :s + 1]) and whether each target is the argmax, gathered on
    the device (the [B, S, vocab] log-probabilities never leave it)."""
    hidden, _ = model(inputs)
    logits = model.logits(model.aligned(hidden))
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
