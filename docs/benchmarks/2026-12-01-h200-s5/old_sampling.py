"""Token sampling with traced knobs: temperature, then top-p, then top-k (Dream's and HF's order).

All knobs are traced scalars, so sweeping them never recompiles. Sampling is
Gumbel-max (argmax of filtered logits / T + Gumbel noise), which lets APD's paper
rule share one noise draw between the draft and the mixture. Temperature 0 is
greedy (argmax of the raw logits), as in the reference.
"""

from __future__ import annotations

import dataclasses
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


def _ordered_keys(x: jax.Array) -> jax.Array:
    """int32 keys whose order is the float32 order of `x` (IEEE bits, negatives' magnitude bits flipped)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-p nucleus, then outside the top-k, to -inf.

    top_p >= 1 and top_k <= 0 disable their filter. As in the reference, the
    nucleus keeps every token up to and including the first one at which the
    cumulative probability exceeds top_p. The cut is found without sorting the
    vocabulary: it is the largest logit v whose tokens at or above v hold more than
    top_p of the probability or number at least top_k, found by bisecting over the
    2^32 float32 values in 32 steps of two masked sums each. On a CPU a sort of the
    vocabulary was most of a sampled APD pass (4096 tokens x 100 positions: 56 ms, now
    5.3 ms); on an H200 at Dream's 152064 tokens it is 1.23 ms against the sort's 1.46.
    The sums round differently from a sorted cumulative sum, so a token whose mass sits
    within float32 rounding of the cut can fall on the other side: on the H200, 34 of
    1600 flat rows (13.5k tokens kept each) differed by one token of mass <= 5e-6, none of
    1600 peaked ones (docs/benchmarks/2026-12-01-h200/topp-filter.txt).
    """

    def apply(x: jax.Array) -> jax.Array:
        keys = _ordered_keys(x)
        probs = jax.nn.softmax(x.astype(jnp.float32), axis=-1)

        def kept(v: jax.Array) -> jax.Array:  # is the cut v at or below a filter's? [..., 1]
            # Keeping min(nucleus, top_k) tokens is cutting at the higher of the two filters' cuts.
            above = keys >= v
            by_p = (top_p < 1.0) & (jnp.sum(jnp.where(above, probs, 0.0), -1, keepdims=True) > top_p)
            by_k = (top_k > 0) & (jnp.sum(above, -1, keepdims=True) >= top_k)
            return by_p | by_k

        def step(_, bounds):  # invariant: kept(lo), or lo is the smallest key (then all stay); not kept(hi)
            lo, hi = bounds
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # the floor of (lo + hi) / 2, without overflow
            ok = kept(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo = jnp.min(keys, -1, keepdims=True)
        hi = jnp.max(keys, -1, keepdims=True) + 1  # the largest key is a NaN's, never a logit's: no overflow
        lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
        return jnp.where(keys < lo, NEG_INF, x)

    # The filters' search is the expensive part: skip it when no filter is on.
    return jax.lax.cond((top_p < 1.0) | (top_k > 0), apply, lambda x: x, logits)


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.gumbel(key, shape, jnp.float32)


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
        return jnp.argmax(filter_logits(allowed(x) / temperature, top_p, top_k) + gumbel_noise(key, x.shape), axis=-1)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(allowed(x), axis=-1)

    return jax.lax.cond(temperature > 0, stochastic, greedy, logits.astype(jnp.float32)).astype(jnp.int32)
