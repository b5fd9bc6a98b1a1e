"""Token sampling with traced knobs: temperature, then top-p, then top-k (Dream's and HF's order).

All knobs are traced scalars, so sweeping them never recompiles. Sampling is
Gumbel-max (argmax of filtered logits / T + Gumbel noise), which lets APD's paper
rule share one noise draw between the draft and the mixture. Temperature 0 is
greedy (argmax of the raw logits), as in the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """The traced sampling knobs every decoder passes into its compiled loop (a pytree of scalars).

    temperature (0 is greedy), top_p (1 disables), top_k (0 disables). Decoders with more
    traced knobs subclass it (APD adds R); `of` fills any subclass from a settings object.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @classmethod
    def of(cls, settings: Any) -> Knobs:
        """Each field read from the same-named attribute of `settings`: top_k as int32, the rest float32."""
        return cls(**{
            f.name: jnp.asarray(getattr(settings, f.name), jnp.int32 if f.name == "top_k" else jnp.float32)
            for f in dataclasses.fields(cls)
        })

    @classmethod
    def greedy(cls) -> Knobs:
        return cls(jnp.float32(0.0), jnp.float32(1.0), jnp.int32(0))

    def sample(self, logits: jax.Array, key: jax.Array, exclude: int | None = None) -> jax.Array:
        """`sample` with these knobs."""
        return sample(logits, key, self.temperature, self.top_p, self.top_k, exclude)


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-p nucleus, then outside the top-k, to -inf.

    top_p >= 1 and top_k <= 0 disable their filter. As in the reference, the
    nucleus keeps every token up to and including the first one at which the
    cumulative probability exceeds top_p. The cut is found without sorting the
    vocabulary: it is the largest probability q whose tokens at or above q hold more
    than top_p of the probability or number at least top_k, found by bisecting over
    q's float32 bits (a probability's bits, as an integer, are in its order) in 30
    steps of one masked sum each (two with top-k). Each step reads only the
    probabilities, and a step of top-p alone has a single sum into which the compare
    fuses. On a CPU a sort of the vocabulary was most of a sampled APD pass (4096 tokens
    x 100 positions: 56 ms, then 5.3 ms by bisection); BENCHMARKS.md ("the top-p
    filter") has the H200 figures. The sums round differently from a sorted cumulative
    sum, so a token whose mass sits within float32 rounding of the cut can fall on the
    other side (on the H200, 34 of 1600 flat rows of 13.5k kept tokens differed by one
    token of mass <= 5e-6, none of 1600 peaked ones: docs/benchmarks/2026-12-01-h200/
    topp-filter.txt), and tokens of equal float32 probability are cut together.
    """

    def apply(x: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
        keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0: integer order is float order

        def by_p(v: jax.Array) -> jax.Array:  # [..., 1]: do the tokens at or above v hold more than top_p?
            return jnp.sum(jnp.where(keys >= v, probs, 0.0), -1, keepdims=True) > top_p

        def by_p_or_k(v: jax.Array) -> jax.Array:
            # Keeping min(nucleus, top_k) tokens is cutting at the higher of the two filters' cuts.
            by_k = jnp.sum(keys >= v, -1, keepdims=True) >= top_k
            return ((top_p < 1.0) & by_p(v)) | ((top_k > 0) & by_k)

        def cut(kept: Callable[[jax.Array], jax.Array]) -> jax.Array:
            def step(_, bounds):  # invariant: kept(lo), or lo is the smallest key (then all stay); not kept(hi)
                lo, hi = bounds
                mid = lo + (hi - lo) // 2  # keys are in [0, 2^30]: no overflow
                ok = kept(mid)
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

            bounds = (jnp.min(keys, -1, keepdims=True), jnp.max(keys, -1, keepdims=True) + 1)
            return jax.lax.fori_loop(0, 30, step, bounds)[0]  # 30 halvings: 1.0's bits are below 2^30

        lo = jax.lax.cond(top_k > 0, lambda: cut(by_p_or_k), lambda: cut(by_p))
        return jnp.where(keys < lo, NEG_INF, x)

    # The filters' search is the expensive part: skip it when no filter is on.
    return jax.lax.cond((top_p < 1.0) | (top_k > 0), apply, lambda x: x, logits)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.gumbel(key, shape, jnp.float32)


def gumbel_argmax(logits: jax.Array, key: jax.Array) -> jax.Array:
    """argmax over the last axis of logits + Gumbel noise drawn from `key`: a sample of softmax(logits).

    Written as a max, then the first index that holds it (jnp.argmax's index): XLA:CPU ran
    jnp.argmax's (value, index) reduction over freshly drawn noise at 6.3 ms for [1, 100, 4096],
    this at 2.0 ms (docs/benchmarks/2026-12-01-cpu/sampling-micro.txt).
    """
    z = logits + gumbel_noise(key, logits.shape)
    best = jnp.max(z, axis=-1, keepdims=True)
    return jnp.min(jnp.where(z == best, jnp.arange(z.shape[-1], dtype=jnp.int32), z.shape[-1]), axis=-1)


def exclude_token(logits: jax.Array, token: int) -> jax.Array:
    """Never predict `token` (the mask: a committed mask would still read as masked).

    A select, not a scatter: it fuses into whatever reads the logits instead of copying them.
    """
    return jnp.where(jnp.arange(logits.shape[-1]) == token, NEG_INF, logits)


def sample(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    exclude: int | None = None,
) -> jax.Array:
    """One sample per row of `logits` [..., V]: argmax(filter(logits / T) + Gumbel noise drawn
    from `key`); T == 0 is plain argmax. `exclude`, if given, is an id never returned.

    The noise is drawn inside the T > 0 branch, and the exclusion applied inside both
    branches, so greedy decoding writes no [..., V] buffer besides the logits themselves
    (each would be 60 MB per Dream-7B APD pass at batch 1, 1 GB at batch 16).
    """

    def allowed(x: jax.Array) -> jax.Array:
        return x if exclude is None else exclude_token(x, exclude)

    def stochastic(x: jax.Array) -> jax.Array:
        return gumbel_argmax(filter_logits(allowed(x) / temperature, top_p, top_k), key)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(allowed(x), axis=-1)

    return jax.lax.cond(temperature > 0, stochastic, greedy, logits.astype(jnp.float32)).astype(jnp.int32)
