"""Fast-dLLM's approximate KV caches as forwards of the block decoder (blocks.loop): a row's first
pass in a block (its step 0) is a *refresh*, the whole canvas through the model, writing every
position's K/V into the row's cache; its later passes in that block run a *window* of the canvas
on that cache.

- "prefix": the window runs from the block's start to the end of the answer; it attends to the
  refreshed K/V before the block and to its own fresh K/V (Fast-dLLM's generate_with_prefix_cache).
- "dual": the window is the block alone; it attends to the refreshed K/V before and after the block
  and to its own K/V, written over the block's in the cache each pass (Fast-dLLM's
  generate_with_dual_cache and its replace_position), a fixed-shape update.

The rules are the loop's own, as without a cache; the window passes' candidates are the masked
positions of the row's current block only. Against Fast-dLLM's samplers (equal token for token in
tests/test_block_cache.py): its threshold rule keeps confidence >= threshold, apd_jax's >
(ThresholdConfig: 1.0 stays one token per pass); they differ only where a float32 probability
equals the threshold exactly. apd_jax's threshold rule never predicts the mask token, Fast-dLLM's
may (a position predicting it stays masked, and its loop stays in that block until the position
predicts another token; with LLaDA's rule, past the block's steps it fails). Confidences are
float32 probabilities, Fast-dLLM's float64 (from the same float32 logits). A block whose first pass
commits all of it is done; Fast-dLLM runs one more (empty) pass there. Fast-dLLM's dynamic threshold
(`factor`) is not in the published code these tests run (NVlabs/Fast-dLLM 24cc59e), so not here.

Fixed shapes: the cache holds the whole canvas for every row ([B, P + N] positions), each row's
window starts at its own block. The prefix window has one compiled width per block, N - k * block,
the pass taking the widest its rows need (k the lowest block of a row in a window pass); what lies
past a row's end is padding, its K/V written beyond the row's end or dropped, never attended to.
Rows refresh at different passes: a pass runs the window forward when any running row is past its
block's first pass and the full forward when any running row is at it, each row keeping its own
(one forward in most passes; both only where rows of a ragged batch are at different steps). In
continuous batching (blocks.slots) rows at a refresh wait for each other (its refresh_group), so one
full forward serves several.
A rule that reads positions only relative to the block (blocks.loop view_size: LLaDA's, the
threshold, Fast-dLLM's Dream; not Learn2PD's filter, whose features hold the position in the
answer) sees each row's block alone (blocks.loop block_view) in window and refresh passes alike
(`window_block`): a refreshing row's hidden states are gathered at its block from the whole
canvas, a window row's are its window's first block_length, and the head and the rule run on
[B, block, V] logits, not [B, N, V]. A pass where a refreshing row still has a mask before its
block (it predicted the mask token), and every pass of a rule that reads positions in the answer,
show the rule the whole answer (`window_answer`), the window rows' logits placed at their
positions. Either way the pass runs its forward once (`cached_hidden`), so each window width and
the refresh are compiled once, not once per view (the prefix cache compiles a window per block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from apd_jax.models.cache import KVCache
from apd_jax.models.model import Transformer

CACHE_MODES = ("none", "prefix", "dual")


def cache_problems(cache: str) -> list[str]:
    """What is wrong with a cache setting."""
    return [] if cache in CACHE_MODES else [f"cache={cache!r}: use one of {CACHE_MODES}"]


def check_cacheable(model: Transformer, cache: str, guided: bool, rule: nnx.Module) -> None:
    """Refuse what the cached forwards do not run: classifier-free guidance (Fast-dLLM's cached
    samplers have none), and a shifted family (Dream) under a rule that does not commit each block's
    first position in the block's first pass (its `commits_block_start_first`: Fast-dLLM's Dream
    rule's): a window reads Dream's outputs shifted within itself, as Fast-dLLM's Dream code does, so
    its first position's prediction there is its own output, not the one before it."""
    if cache_problems(cache):
        raise ValueError(cache_problems(cache)[0])
    if cache == "none":
        return
    if model.cfg.family.shift and not getattr(rule, "commits_block_start_first", False):
        raise ValueError(f"cache={cache!r} runs a {model.cfg.model_type} model only with Fast-dLLM's Dream rule "
                         "(--decoder dream-block, DreamBlockConfig); this rule decodes it with cache='none'")
    if guided:
        raise ValueError(f"cache={cache!r} does not run classifier-free guidance (as Fast-dLLM's cached samplers); "
                         "use cfg_scale=0 or cache='none'")


def window_widths(cache: str, block_length: int, max_new: int) -> tuple[int, ...]:
    """The widths a cached pass's window is compiled at: the block (dual); the answer from block k's
    start, N - k * block_length for each block k (prefix)."""
    if cache == "dual":
        return (block_length,)
    return tuple(max_new - k * block_length for k in range(max_new // block_length))


def _window(model: Transformer, canvas: jax.Array, cache: KVCache, prompt_lens: jax.Array, block_start: jax.Array,
            end: jax.Array, width: int) -> tuple[jax.Array, KVCache]:
    """Hidden states [B, width, H] of the answer positions [block_start, block_start + width) of each
    row, read as the family predicts within the window (Dream's shifted inside it, as Fast-dLLM's
    Dream code reads them), attending to the cache up to the row's `end`; the cache with the
    window's K/V written in."""
    start = prompt_lens + block_start
    cols = start[:, None] + jnp.arange(width)
    tokens = jnp.take_along_axis(canvas, jnp.minimum(cols, canvas.shape[1] - 1), axis=1)
    hidden, cache = model(tokens, start=start, valid=jnp.maximum(end - start, 0), cache=cache)
    return model.aligned(hidden), cache


def _window_branches(model: Transformer, canvas: jax.Array, prompt_lens: jax.Array, block: jax.Array,
                     block_start: jax.Array, end: jax.Array, reuse: jax.Array, widths: tuple[int, ...], read):
    """(branch index, branches) for lax.switch: branch 1 + k runs the window of width widths[k] and
    returns read(hidden, cache), k the lowest block among the rows in `reuse` (the widest window
    they need); branch 0 is left to the caller (no row reuses its cache)."""
    lowest = jnp.min(jnp.where(reuse, block, len(widths) - 1))
    branch = jnp.where(jnp.any(reuse), 1 + jnp.minimum(lowest, len(widths) - 1), 0)

    def window(width: int):
        return lambda c: read(*_window(model, canvas, c, prompt_lens, block_start, end, width))

    return branch, [window(w) for w in widths]


def answer_hidden(hidden: jax.Array, first: jax.Array, width: int) -> jax.Array:
    """[B, width, H]: the canvas positions [first, first + width) of each row of `hidden` [B, S, H]
    ([B] first), clamped to the canvas (a finished row's block may lie past it)."""
    idx = jnp.minimum(first[:, None] + jnp.arange(width), hidden.shape[1] - 1)
    return jnp.take_along_axis(hidden, idx[:, :, None], axis=1)


def _refreshed(model: Transformer, canvas: jax.Array, cache: KVCache, end: jax.Array,
               refresh: jax.Array) -> tuple[jax.Array, KVCache]:
    """The whole canvas through the model: its hidden states [B, P + N, H] read as the family
    predicts (Dream's shifted by one over the whole canvas), and the cache with the rows flagged in
    `refresh` [B] rewritten. The other rows run at positions past the cache, so their writes are
    dropped and their K/V stay as they were, with no select over the whole cache after the forward
    (their hidden states are never read)."""
    start = jnp.where(refresh, 0, cache.max_len)
    hidden, fresh = model(canvas, start=start, valid=end, cache=cache)
    return model.aligned(hidden), KVCache(fresh.k, fresh.v, jnp.where(refresh, fresh.lengths, cache.lengths))


def cached_hidden(model: Transformer, canvas: jax.Array, cache: KVCache, prompt_lens: jax.Array, end: jax.Array,
                  block: jax.Array, block_start: jax.Array, refresh: jax.Array, reuse: jax.Array,
                  widths: tuple[int, ...], n: int) -> tuple[jax.Array, jax.Array, KVCache]:
    """One cached pass's forward, run once whichever logits the pass then reads (window_block or
    window_answer): (window, refreshed, cache). window [B, widths[0], H]: the window of the rows in
    `reuse` [B] on their cache, as wide as the lowest `block` [B] among them needs (window_widths),
    zeros past that width; refreshed [B, N, H]: the answer positions of the whole canvas, their
    cache rewritten, for the rows in `refresh` [B] (zeros when none refreshes). Each forward is
    compiled once (the prefix cache's windows one per block), not once per logits' shape."""
    b, hidden_size, dtype = canvas.shape[0], model.cfg.hidden_size, model.cfg.dtype

    def skip(c: KVCache):
        return jnp.zeros((b, widths[0], hidden_size), dtype), c

    def read(hidden: jax.Array, c: KVCache):
        return jnp.pad(hidden, ((0, 0), (0, widths[0] - hidden.shape[1]), (0, 0))), c

    branch, windows = _window_branches(model, canvas, prompt_lens, block, block_start, end, reuse, widths, read)
    window, cache = jax.lax.switch(branch, [skip, *windows], cache)

    def full(c: KVCache):
        whole, c = _refreshed(model, canvas, c, end, refresh)
        return answer_hidden(whole, prompt_lens, n), c

    refreshed, cache = jax.lax.cond(jnp.any(refresh), full, lambda c: (jnp.zeros((b, n, hidden_size), dtype), c),
                                    cache)
    return window, refreshed, cache


def window_block(window: jax.Array, refreshed: jax.Array, block_start: jax.Array, refresh: jax.Array,
                 size: int) -> jax.Array:
    """[B, size, H]: each row's current block (`size` positions from its block_start [B]) from
    cached_hidden's outputs, a refreshing row's from `refreshed`, a window row's from its window."""
    return jnp.where(refresh[:, None, None], answer_hidden(refreshed, block_start, size), window[:, :size])


def window_answer(model: Transformer, window: jax.Array, refreshed: jax.Array, block_start: jax.Array,
                  refresh: jax.Array) -> jax.Array:
    """Float32 logits [B, N, V] of the whole answer from cached_hidden's outputs: a window row's
    window through the head, placed at its block_start [B], zeros elsewhere (outside the row's
    candidates); a refreshing row's from `refreshed`, the head run on the whole answer only in a
    pass where some row refreshes (a window pass's head reads the window alone)."""
    b, n = refreshed.shape[:2]
    logits = model.logits(window)
    idx = block_start[:, None] + jnp.arange(window.shape[1])
    placed = jnp.zeros((b, n, logits.shape[-1]), logits.dtype).at[jnp.arange(b)[:, None], idx].set(logits, mode="drop")
    return jax.lax.cond(jnp.any(refresh), lambda: jnp.where(refresh[:, None, None], model.logits(refreshed), placed),
                        lambda: placed)
