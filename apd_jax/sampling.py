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


# The nucleus is read from this many of the largest logits whenever every row's filter ends
# among them (a top-k, not a sort of the vocabulary: on a CPU the sort was most of a sampled
# APD pass); any row whose nucleus is wider sends the batch through the full sort.
NUCLEUS_CANDIDATES = 64


def _kept_count(cum: jax.Array, top_p: jax.Array, top_k: jax.Array, vocab: int) -> jax.Array:
    """How many of the descending-ordered tokens the filters keep [..., 1], from their cumulative
    probabilities `cum`: the prefix through the first token past top_p, then at most top_k."""
    n_keep_p = 1 + jnp.sum(cum[..., :-1] <= top_p, axis=-1, keepdims=True)  # keep[i] = cum[i-1] <= top_p
    n_keep_p = jnp.where(top_p < 1.0, n_keep_p, vocab)
    return jnp.where(top_k > 0, jnp.minimum(n_keep_p, top_k), n_keep_p)


def filter_logits(logits: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside the top-p nucleus, then outside the top-k, to -inf.

    top_p >= 1 and top_k <= 0 disable their filter. As in the reference, the
    nucleus keeps every token up to and including the first one at which the
    cumulative probability exceeds top_p.
    """
    vocab = logits.shape[-1]
    candidates = min(NUCLEUS_CANDIDATES, vocab)

    def sorted_threshold(x: jax.Array) -> jax.Array:
        ordered = -jnp.sort(-x, axis=-1)  # descending
        n_keep = _kept_count(jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1), top_p, top_k, vocab)
        return jnp.take_along_axis(ordered, n_keep - 1, axis=-1)

    def apply(x: jax.Array) -> jax.Array:
        top = jax.lax.top_k(x, candidates)[0]  # descending, as the sort's first entries
        cum = jnp.cumsum(jnp.exp(top - jax.nn.logsumexp(x, axis=-1, keepdims=True)), axis=-1)
        n_keep = _kept_count(cum, top_p, top_k, vocab)  # exact wherever it is below `candidates`
        exact = (n_keep < candidates) | ((top_k > 0) & (top_k <= candidates) & (n_keep == top_k)) | (candidates == vocab)
        threshold = jax.lax.cond(
            jnp.all(exact), lambda: jnp.take_along_axis(top, jnp.minimum(n_keep, candidates) - 1, axis=-1),
            lambda: sorted_threshold(x))
        return jnp.where(x < threshold, NEG_INF, x)

    # The filters' ordering is the expensive part: skip it when no filter is on.
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
