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


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array, count: bool | None = None) -> jax.Array:
    """Set logits outside the top-p nucleus (up to and including the first token past top_p, as
    in the reference), then outside the top-k, to -inf; top_p >= 1 and top_k <= 0 disable them.

    No sort: the cut is the largest probability whose tokens at or above it hold more than top_p
    (or number top_k: the higher of the two cuts), bisected over its float32 bits. Such sums round
    unlike a sorted cumsum: a token within rounding of the cut may fall on the other side
    (BENCHMARKS.md, "the top-p filter"). Each halving reads the probabilities once for the mass
    alone, about twice with the count too. count: whether to count for top-k (False: top_k is off),
    or None to pick by a cond on top_k; under a vmap over per-row knobs that cond would run both
    bisections, so sample_rows picks outside the vmap.
    """

    def apply(x: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(x.astype(jnp.float32), axis=-1)
        keys = jax.lax.bitcast_convert_type(probs, jnp.int32)  # >= 0: integer order is float order

        def cut(counted: bool) -> jax.Array:
            def kept(v: jax.Array) -> jax.Array:
                hit = keys >= v
                nucleus = (top_p < 1.0) & (jnp.sum(jnp.where(hit, probs, 0.0), -1, keepdims=True) > top_p)
                return nucleus | ((top_k > 0) & (jnp.sum(hit, -1, keepdims=True) >= top_k)) if counted else nucleus

            def step(_, bounds):  # kept(lo) (or lo is the smallest key), not kept(hi)
                lo, hi = bounds
                mid = lo + (hi - lo) // 2
                ok = kept(mid)
                return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

            bounds = (jnp.min(keys, -1, keepdims=True), jnp.max(keys, -1, keepdims=True) + 1)
            return jax.lax.fori_loop(0, 30, step, bounds)[0]  # 30 halvings: 1.0's bits are below 2^30

        lo = cut(count) if count is not None else jax.lax.cond(top_k > 0, lambda: cut(True), lambda: cut(False))
        return jnp.where(keys < lo, NEG_INF, x)

    return jax.lax.cond((top_p < 1.0) | (top_k > 0), apply, lambda x: x, logits)


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
    with no noise or filter work, and the filter runs only the searches some sampling row needs
    (batch-level branches around the per-row rule)."""

    def allowed(x: jax.Array) -> jax.Array:
        return x if exclude is None else exclude_token(x, exclude)

    def greedy(x: jax.Array) -> jax.Array:
        return jnp.argmax(allowed(x), axis=-1).astype(jnp.int32)

    def rows(count: bool | None) -> Callable[[jax.Array], jax.Array]:
        """Every row's sample, its logits filtered (filter_logits' `count`) unless count is None."""

        def row(x: jax.Array, key: jax.Array, t: jax.Array, p: jax.Array, k: jax.Array) -> jax.Array:
            scaled = allowed(x) / jnp.where(t > 0, t, 1.0)
            noisy = gumbel_argmax(scaled if count is None else filter_logits(scaled, p, k, count), key)
            return jnp.where(t > 0, noisy, greedy(x))

        return lambda x: jax.vmap(row)(x, keys, temperature, top_p, top_k).astype(jnp.int32)

    # Batch-level branches, so a vmapped cond never runs work no row needs: argmax alone, no filter,
    # the nucleus alone, the nucleus and top-k.
    sampled = temperature > 0
    which = jnp.where(jnp.any(sampled & (top_k > 0)), 3, jnp.where(jnp.any(sampled & (top_p < 1.0)), 2, 1))
    which = jnp.where(jnp.any(sampled), which, 0)
    return jax.lax.switch(which, [greedy, rows(None), rows(False), rows(True)], logits.astype(jnp.float32))
