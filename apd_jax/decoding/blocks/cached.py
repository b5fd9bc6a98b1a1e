"""Fast-dLLM's approximate KV caches as forwards of the block decoder (blocks.loop): a row's first
pass in a block (its step 0) is a *refresh*, the whole canvas through the model, writing every
position's K/V into the row's cache; its later passes in that block run a *window* of the canvas
on that cache.

- "prefix": the window runs from the block's start to the end of the answer; it attends to the
  refreshed K/V before the block and to its own fresh K/V (Fast-dLLM's generate_with_prefix_cache).
- "dual": the window is the block alone; it attends to the refreshed K/V before and after the block
  and to its own K/V, written over the block's in the cache each pass (Fast-dLLM's
  generate_with_dual_cache and its replace_position), a fixed-shape update.

Fixed shapes: the cache holds the whole canvas for every row ([B, P + N] positions), each row's
window starts at its own block; the prefix window is max_new_tokens wide for every row (the part
past a row's end is padding, its K/V written beyond the row's end or dropped, never attended to).
Rows refresh at different passes: a pass runs the window forward when any running row is past its
block's first pass and the full forward when any running row is at it, each row keeping its own
(one forward in most passes; both only where rows of a ragged batch are at different steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apd_jax.models.cache import KVCache
from apd_jax.models.model import Qwen2

CACHE_MODES = ("none", "prefix", "dual")


def cache_problems(cache: str) -> list[str]:
    """What is wrong with a cache setting."""
    return [] if cache in CACHE_MODES else [f"cache={cache!r}: use one of {CACHE_MODES}"]


def check_cacheable(model: Qwen2, cache: str, guided: bool) -> None:
    """Refuse what the cached forwards do not run: a shifted family (Dream predicts position i from
    output i - 1, outside a window starting at i) and classifier-free guidance (Fast-dLLM's cached
    samplers have none)."""
    if cache_problems(cache):
        raise ValueError(cache_problems(cache)[0])
    if cache == "none":
        return
    if model.cfg.family.shift:
        raise ValueError(f"cache={cache!r} runs LLaDA (unshifted) models; a {model.cfg.model_type} model decodes "
                         "with cache='none'")
    if guided:
        raise ValueError(f"cache={cache!r} does not run classifier-free guidance (as Fast-dLLM's cached samplers); "
                         "use cfg_scale=0 or cache='none'")


def window_width(cache: str, block_length: int, max_new: int) -> int:
    """Positions of a cached pass's window: the block (dual), or the answer's width (prefix)."""
    return block_length if cache == "dual" else max_new


def _window(model: Qwen2, canvas: jax.Array, cache: KVCache, prompt_lens: jax.Array, block_start: jax.Array,
            end: jax.Array, width: int, n: int) -> tuple[jax.Array, KVCache]:
    """Logits [B, N, V] of the answer positions [block_start, block_start + width) of each row (zero
    elsewhere), the window attending to the cache up to the row's `end`; the cache with the window's
    K/V written in."""
    b = canvas.shape[0]
    start = prompt_lens + block_start
    cols = start[:, None] + jnp.arange(width)
    tokens = jnp.take_along_axis(canvas, jnp.minimum(cols, canvas.shape[1] - 1), axis=1)
    hidden, cache = model(tokens, start=start, valid=jnp.maximum(end - start, 0), cache=cache)
    logits = model.logits(hidden)
    rows = jnp.arange(b)[:, None]
    placed = jnp.zeros((b, n, logits.shape[-1]), logits.dtype)
    return placed.at[rows, block_start[:, None] + jnp.arange(width)].set(logits, mode="drop"), cache


def _keep_rows(rows: jax.Array, new: KVCache, old: KVCache) -> KVCache:
    """`new`'s K/V in the rows flagged by `rows` [B], `old`'s elsewhere."""
    pick = rows[None, :, None, None, None]
    return KVCache(jnp.where(pick, new.k, old.k), jnp.where(pick, new.v, old.v), jnp.where(rows, new.lengths,
                                                                                             old.lengths))


def cached_logits(model: Qwen2, canvas: jax.Array, cache: KVCache, prompt_lens: jax.Array, end: jax.Array,
                  block_start: jax.Array, refresh: jax.Array, reuse: jax.Array, width: int,
                  n: int) -> tuple[jax.Array, KVCache]:
    """One pass's logits [B, N, V] of the generated positions and the cache after it: rows flagged in
    `refresh` [B] from the whole canvas, their cache rewritten; rows in `reuse` [B] from their
    window of `width` positions (window_width) on their cache."""
    b, vocab = canvas.shape[0], model.cfg.vocab_size

    def window(c: KVCache):
        return _window(model, canvas, c, prompt_lens, block_start, end, width, n)

    def skip(c: KVCache):
        return jnp.zeros((b, n, vocab), jnp.float32), c

    logits, cache = jax.lax.cond(jnp.any(reuse), window, skip, cache)

    def full(c: KVCache):
        hidden, fresh = model(canvas, valid=end, cache=c)
        idx = prompt_lens[:, None] + jnp.arange(n)
        refreshed = model.logits(jnp.take_along_axis(model.aligned(hidden), idx[:, :, None], axis=1))
        return jnp.where(refresh[:, None, None], refreshed, logits), _keep_rows(refresh, fresh, c)

    return jax.lax.cond(jnp.any(refresh), full, lambda c: (logits, c), cache)
