"""Token sampling with traced knobs: temperature, then top-p, then top-k (Dream's and HF's order).

All knobs are traced scalars, so sweeping them never recompiles. Sampling is
Gumbel-max (argmax of filtered logits / T + Gumbel noise), which lets APD's paper
rule share one noise draw between the draft and the mixture. Temperature 0 is
greedy (argmax of the raw logits), as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-p nucleus, then outside the top-k, to -inf.

    top_p >= 1 and top_k <= 0 disable their filter. As in the reference, the
    nucleus keeps every token up to and including the first one at which the
    cumulative probability exceeds top_p.
    """

    def apply(x: jax.Array) -> jax.Array:
        ordered = -jnp.sort(-x, axis=-1)  # descending
        cum = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # keep[i] = cum[i-1] <= top_p: the prefix through the first token past top_p
        n_keep_p = 1 + jnp.sum(cum[..., :-1] <= top_p, axis=-1, keepdims=True)
        n_keep_p = jnp.where(top_p < 1.0, n_keep_p, x.shape[-1])
        n_keep = jnp.where(top_k > 0, jnp.minimum(n_keep_p, top_k), n_keep_p)
        threshold = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)
        return jnp.where(x < threshold, NEG_INF, x)

    # The sort over the vocabulary is the expensive part: skip it when no filter is on.
    return jax.lax.cond((top_p < 1.0) | (top_k > 0), apply, lambda x: x, logits)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.gumbel(key, shape, jnp.float32)


def gumbel_argmax(
    logits: jax.Array, noise: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
) -> jax.Array:
    """Sample ids: argmax(filter(logits / T) + noise); T == 0 is plain argmax."""

    def stochastic(x: jax.Array) -> jax.Array:
        return jnp.argmax(filter_logits(x / temperature, top_p, top_k) + noise, axis=-1)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(x, axis=-1)

    return jax.lax.cond(temperature > 0, stochastic, greedy, logits.astype(jnp.float32)).astype(jnp.int32)


def sample(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
) -> jax.Array:
    """One sample per row of `logits` [..., V] with its own Gumbel draw."""
    noise = jax.lax.cond(
        temperature > 0, lambda: gumbel_noise(key, logits.shape), lambda: jnp.zeros(logits.shape, jnp.float32)
    )
    return gumbel_argmax(logits, noise, temperature, top_p, top_k)
