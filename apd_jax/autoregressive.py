"""Plain autoregressive decoding of a causal model: prefill, then one token per pass.

Prefill and the KV-cached decode loop are one `jax.jit` call with a
`lax.while_loop`; a batch of ragged prompts decodes together, each row at its
own position, stopping at its first eos.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from apd_jax.cache import KVCache
from apd_jax.config import raise_problems
from apd_jax.generation import GenerationResult, check_prompts, finish, knob_problems, pad_prompts, prompt_bucket
from apd_jax.model import Qwen2
from apd_jax.sampling import sample


@dataclasses.dataclass(frozen=True)
class ARConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the model config's
    max_len: int | None = None  # cache capacity; None: max_position_embeddings

    def validate(self) -> None:
        raise_problems("AR", knob_problems(self.max_new_tokens, self.temperature, self.top_p, self.top_k))


@functools.partial(jax.jit, static_argnames=("graph", "max_new", "eos_ids"))
def _decode(graph, params, prompts, prompt_lens, knobs, key, max_new: int, eos_ids: tuple[int, ...]):
    model = nnx.merge(graph, params)
    b, p = prompts.shape
    temperature, top_p, top_k = knobs
    eos = jnp.asarray(eos_ids, jnp.int32)
    hidden, cache = model(prompts, valid=prompt_lens, cache=KVCache.zeros(model.cfg, b, p + max_new))
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    key, step_key = jax.random.split(key)
    token = sample(model.logits(last), step_key, temperature, top_p, top_k)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(token)
    n = jnp.ones((b,), jnp.int32)  # tokens generated per row
    done = jnp.isin(token, eos) | (max_new == 1)

    def cond(carry):
        _, n, done, _, _, _ = carry
        return jnp.any(~done)

    def body(carry):
        out, n, done, token, cache, key = carry
        hidden, cache = model(token[:, None], start=prompt_lens + n - 1, valid=jnp.ones_like(n), cache=cache)
        key, step_key = jax.random.split(key)
        nxt = sample(model.logits(hidden[:, 0]), step_key, temperature, top_p, top_k)
        nxt = jnp.where(done, token, nxt)
        out = out.at[jnp.arange(b), jnp.where(done, max_new, n)].set(nxt, mode="drop")
        n_new = jnp.where(done, n, n + 1)
        done = done | jnp.isin(nxt, eos) | (n_new >= max_new)
        return out, n_new, done, nxt, cache, key

    out, n, done, _, _, _ = jax.lax.while_loop(cond, body, (out, n, done, token, cache, key))
    eos_hit = jnp.isin(jnp.take_along_axis(out, (n - 1)[:, None], axis=1)[:, 0], eos)
    accepted = (jnp.arange(max_new) < n[:, None]).astype(jnp.int32)
    return out, n, accepted, eos_hit, jnp.max(n)


def ar_generate(
    model: Qwen2, prompts: Sequence[Sequence[int]], config: ARConfig = ARConfig(), key: jax.Array | None = None
) -> GenerationResult:
    """Decode a batch of ragged prompts with a causal model, one token per pass."""
    config.validate()
    if not model.cfg.causal:
        raise ValueError("autoregressive decoding needs a causal (Qwen2) model; Dream models use the diffusion decoders")
    rows = check_prompts(prompts, model.cfg.vocab_size)
    capacity = config.max_len or model.cfg.max_position_embeddings
    padded, lengths = pad_prompts(rows, prompt_bucket(max(map(len, rows)), config.max_new_tokens, capacity))
    eos = config.eos_token_ids if config.eos_token_ids is not None else model.cfg.eos_token_ids
    knobs = (jnp.float32(config.temperature), jnp.float32(config.top_p), jnp.int32(config.top_k))
    graph, params = nnx.split(model)
    outputs = _decode(
        graph, params, jnp.asarray(padded), jnp.asarray(lengths), knobs,
        jax.random.key(0) if key is None else key, config.max_new_tokens, tuple(eos),
    )
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos[0] if eos else 0)
    return finish(*outputs, pad_id=pad)
