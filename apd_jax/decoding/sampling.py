"""Token sampling with traced knobs: temperature, top-p, then top-k (Dream's and HF's order), by
Gumbel-max so APD's paper rule can share one noise draw between draft and mixture."""

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
    """A compiled loop's traced sampling knobs (a pytree of scalars); subclasses add their own
    (APD's R), and `of` fills any of them from a settings object."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @classmethod
    def of(cls, settings: Any) -> Knobs:
        """Each field from the same-named attribute of `settings`: top_k int32, the rest float32."""
        return cls(**{
            f.name: jnp.asarray(getattr(settings, f.name), jnp.int32 if f.name == "top_k" else jnp.float32)
            for f in dataclasses.fields(cls)
        })

    @classmethod
    def greedy(cls) -> Knobs:
        return cls(jnp.float32(0.0), jnp.float32(1.0), jnp.int32(0))

    def rows(self, b: int) -> Knobs:
        """Scalar knobs as per-row [b] vectors (the form `sample_rows` takes)."""
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (b,)), self)

    def sample(self, logits: jax.Array, key: jax.Array, exclude: int | None = None) -> jax.Array:
        """Scalar knobs: one key for the whole of `logits`. Per-row knobs ([B] vectors): `key` holds one
        key per row, and row b's sample depends only on its own logits, key and knobs (`sample_rows`)."""
        if jnp.ndim(self.temperature) == 0:
            return sample(logits, key, self.temperature, self.top_p, self.top_k, exclude)
        return sample_rows(logits, key, self.temperature, self.top_p, self.top_k, exclude)


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-p nucleus (up to and including the first token past top_p, as
    in the reference), then outside the top-k, to -inf; top_p >= 1 and top_k <= 0 disable them.

    No sort: the cut is the largest probability whose tokens at or above it hold more than top_p
    (or number top_k: the higher of the two cuts), searched over its float32 bits (`search_ways`
    candidates a read of the probabilities). Such sums round unlike a sorted cumsum: a token within
    rounding of the cut may fall on the other side (BENCHMARKS.md, "the top-p filter").
    """
    ways = search_ways()

    def apply(x: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
        keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0: integer order is float order

        def kept(v: jax.Array) -> jax.Array:
            """[..., m] bool for candidates v [..., m]: the tokens whose key is >= v hold more than top_p
            (nucleus) or number at least top_k. Both sums always, with no cond on the knobs: a vmap
            over per-row knobs (sample_rows) turns a cond into both branches, two searches."""
            hit = keys[..., :, None] >= v[..., None, :]  # [..., V, m]
            mass = jnp.sum(jnp.where(hit, probs[..., :, None], 0.0), axis=-2)
            count = jnp.sum(hit, axis=-2)
            return ((top_p < 1.0) & (mass > top_p)) | ((top_k > 0) & (count >= top_k))

        lo = largest_kept(kept, jnp.min(keys, -1, keepdims=True), jnp.max(keys, -1, keepdims=True) + 1, ways)
        return jnp.where(keys < lo, NEG_INF, x)

    return jax.lax.cond((top_p < 1.0) | (top_k > 0), apply, lambda x: x, logits)


def search_ways() -> int:
    """Candidates filter_logits tries per read of the probabilities: 16 on an accelerator, where
    the filter is memory-bound (8 reads of the vocabulary, not 30), 2 (bisection) on CPU, where
    each candidate costs a compare per token."""
    return 2 if jax.default_backend() == "cpu" else 16


def largest_kept(kept: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, ways: int) -> jax.Array:
    """The largest v in [lo, hi) with kept(v), for a `kept` true up to some v and false after it,
    given kept(lo) (or lo the smallest key) and [..., 1] bounds below 2^30 apart: each step asks
    kept of ways - 1 evenly spaced candidates at once ([..., ways - 1] -> [..., ways - 1] bool) and
    keeps the sub-range where it turns false, so ceil(30 / log2(ways)) steps end with hi = lo + 1."""
    steps = next(s for s in range(1, 31) if ways**s >= 2**30)
    j = jnp.arange(1, ways, dtype=lo.dtype)

    def step(_, bounds):
        lo, hi = bounds
        span = hi - lo  # floor(j * span / ways), without overflowing int32
        v = lo + j * (span // ways) + (j * (span % ways)) // ways
        ok = kept(v)
        n = jnp.sum(ok, axis=-1, keepdims=True)  # candidates kept: the first n (kept is monotone)
        below = jnp.take_along_axis(v, jnp.maximum(n - 1, 0), axis=-1)
        above = jnp.take_along_axis(v, jnp.minimum(n, ways - 2), axis=-1)
        return jnp.where(n > 0, below, lo), jnp.where(n < ways - 1, above, hi)

    return jax.lax.fori_loop(0, steps, step, (lo, hi))[0]


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.gumbel(key, shape, jnp.float32)


def gumbel_argmax(logits: jax.Array, key: jax.Array) -> jax.Array:
    """A sample of softmax(logits) over the last axis: argmax(logits + Gumbel noise), as a max and
    then its first index, which XLA:CPU runs faster than jnp.argmax (BENCHMARKS.md)."""
    z = logits + gumbel_noise(key, logits.shape)
    best = jnp.max(z, axis=-1, keepdims=True)
    return jnp.min(jnp.where(z == best, jnp.arange(z.shape[-1], dtype=jnp.int32), z.shape[-1]), axis=-1)


def exclude_token(logits: jax.Array, token: int) -> jax.Array:
    """Never predict `token` (the mask: a committed mask would still read as masked). A select,
    not a scatter, so it fuses into whatever reads the logits."""
    return jnp.where(jnp.arange(logits.shape[-1]) == token, NEG_INF, logits)


def sample(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    exclude: int | None = None,
) -> jax.Array:
    """One sample per row of `logits` [..., V], never `exclude`: argmax(filter(logits / T) + Gumbel
    noise), plain argmax at T == 0. Noise and exclusion sit inside the branches, so greedy
    decoding writes no [..., V] buffer besides the logits."""

    def allowed(x: jax.Array) -> jax.Array:
        return x if exclude is None else exclude_token(x, exclude)

    def stochastic(x: jax.Array) -> jax.Array:
        return gumbel_argmax(filter_logits(allowed(x) / temperature, top_p, top_k), key)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(allowed(x), axis=-1)

    return jax.lax.cond(temperature > 0, stochastic, greedy, logits.astype(jnp.float32)).astype(jnp.int32)


def sample_rows(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    exclude: int | None = None,
) -> jax.Array:
    """One sample per position of `logits` [B, ..., V], row b with its own key keys[b] and knobs
    temperature[b], top_p[b], top_k[b] ([B] each): its noise is drawn over its own positions only, so a
    row samples the same in any batch, in any slot. When no row samples the batch takes plain argmax,
    with no noise or filter work (one batch-level branch around the per-row rule)."""

    def allowed(x: jax.Array) -> jax.Array:
        return x if exclude is None else exclude_token(x, exclude)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(allowed(x), axis=-1).astype(jnp.int32)

    def row(x: jax.Array, key: jax.Array, t: jax.Array, p: jax.Array, k: jax.Array) -> jax.Array:
        noisy = gumbel_argmax(filter_logits(allowed(x) / jnp.where(t > 0, t, 1.0), p, k), key)
        return jnp.where(t > 0, noisy, greedy(x))

    def mixed(x: jax.Array) -> jax.Array:
        return jax.vmap(row)(x, keys, temperature, top_p, top_k).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), mixed, greedy, logits.astype(jnp.float32))
