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

from apd_jax.models.cache import KVCache
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, check_config, prepare
from apd_jax.models.model import Qwen2
from apd_jax.decoding.sampling import Knobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ARConfig(DecoderConfig):
    """Plain autoregressive decoding: only the settings every decoder has."""

    what = "AR"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    out: jax.Array  # [B, max_new]: generated tokens
    n: jax.Array  # [B]: tokens generated per row
    done: jax.Array  # [B] bool
    token: jax.Array  # [B]: the last token of each row, the next pass's input
    cache: KVCache
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("graph", "max_new"))
def _decode(graph, params, prompts, prompt_lens, eos, knobs: Knobs, key, max_new: int):
    model = nnx.merge(graph, params)
    b, p = prompts.shape
    hidden, cache = model(prompts, valid=prompt_lens, cache=KVCache.zeros(model.cfg, b, p + max_new))
    last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
    key, step_key = jax.random.split(key)
    token = knobs.sample(model.logits(last), step_key)
    state = _State(
        out=jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(token), n=jnp.ones((b,), jnp.int32),
        done=jnp.isin(token, eos) | (max_new == 1), token=token, cache=cache, key=key,
    )

    def cond(state: _State) -> jax.Array:
        return jnp.any(~state.done)

    def body(state: _State) -> _State:
        n, done = state.n, state.done
        hidden, cache = model(state.token[:, None], start=prompt_lens + n - 1, valid=jnp.ones_like(n), cache=state.cache)
        key, step_key = jax.random.split(state.key)
        nxt = jnp.where(done, state.token, knobs.sample(model.logits(hidden[:, 0]), step_key))
        out = state.out.at[jnp.arange(b), jnp.where(done, max_new, n)].set(nxt, mode="drop")
        n_new = jnp.where(done, n, n + 1)
        done = done | jnp.isin(nxt, eos) | (n_new >= max_new)
        return _State(out=out, n=n_new, done=done, token=nxt, cache=cache, key=key)

    state = jax.lax.while_loop(cond, body, state)
    out, n = state.out, state.n
    eos_hit = jnp.isin(jnp.take_along_axis(out, (n - 1)[:, None], axis=1)[:, 0], eos)
    accepted = (jnp.arange(max_new) < n[:, None]).astype(jnp.int32)
    return out, n, accepted, eos_hit, jnp.max(n)


def ar_generate(
    model: Qwen2, prompts: Sequence[Sequence[int]], config: ARConfig = ARConfig(), key: jax.Array | None = None
) -> GenerationResult:
    """Decode a batch of ragged prompts with a causal model, one token per pass."""
    config = check_config(config, ARConfig)
    if not model.cfg.causal:
        raise ValueError("autoregressive decoding needs a causal (Qwen2) model; Dream models use the diffusion decoders")
    batch = prepare(config, prompts, key, model.cfg)
    graph, params = nnx.split(model)
    outputs = _decode(graph, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), batch.eos, Knobs.of(config),
                      batch.key, config.max_new_tokens)
    return batch.finish(*outputs)
