"""The cached block decoder's kinds of pass, counted, bounded and timed apart.

With Fast-dLLM's caches (decoding.blocks.cached) a block's first pass is a *refresh* (the whole
canvas through the model, its K/V written into the cache) and its later passes are *window*
passes (the block alone, dual; the answer from the block's start, prefix), so a whole call's mean
per pass mixes very different costs; a pass in which rows of a batch are at different steps runs
both forwards (*mixed*). Here:

- `pass_kinds`: which forwards each pass ran, derived from the result's per-pass commits and the
  rule's end of a block (all its positions committed; LLaDA's rule and Dream's schedule also end it
  after their steps). At one row, or rows in step, each block has one refresh and the rest windows;
  rows of a batch at different steps make passes that run both.
- `kind_work`: each kind's least work (bounds.Work) at the row's shapes.
- `time_kinds`: each kind timed alone at the call's own shapes: the decoder's own pass
  (blocks.loop.canvas_pass: the forward, the rule, the commit) with every row at its block's first
  step (refresh), at a later one (window), or both (mixed: rows of a batch at different steps), as
  many passes as the call ran of that kind in one compiled loop carrying the cache, as the
  decoder's loop does. What a whole call spends besides (its loop state's updates) is what counts x
  these times leave of its time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.bench.bounds import Work
from apd_jax.bench.timing import call_times, median_time
from apd_jax.decoding.blocks.cached import window_widths
from apd_jax.decoding.blocks.dream import DreamBlockConfig
from apd_jax.decoding.blocks.llada import LLaDAConfig
from apd_jax.decoding.blocks.loop import canvas_pass, prepare_canvas, view_size
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.decoding.generation import GenerationResult
from apd_jax.models.cache import KVCache
from apd_jax.models.model import Transformer

CanvasConfig = LLaDAConfig | ThresholdConfig | DreamBlockConfig


def canvas_rule(model: Transformer, cfg: CanvasConfig) -> nnx.Module:
    """The rule the config's generate function runs (llada_generate, dream_block_generate, threshold_generate)."""
    return cfg.block_rule(model)


def _fixed_steps(cfg: CanvasConfig) -> int | None:
    """Passes after which the rule ends a block whatever is left in it (None: only once it is all committed)."""
    if isinstance(cfg, LLaDAConfig) or (isinstance(cfg, DreamBlockConfig) and cfg.threshold is None):
        return cfg.step_count // cfg.num_blocks
    return None


def _row_blocks(accepted: np.ndarray, block: int, fixed: int | None, num_blocks: int) -> list[int] | None:
    """Passes each block of one row took (its commits per pass `accepted`), None if it did not finish them."""
    counts, filled, step = [], 0, 0
    for k in accepted:
        if len(counts) == num_blocks:
            break
        filled, step = filled + int(k), step + 1
        if filled >= block or step == fixed:
            counts.append(step)
            filled = step = 0
    return counts if len(counts) == num_blocks else None


def pass_kinds(result: GenerationResult, cfg: CanvasConfig) -> list[tuple[bool, int | None]] | None:
    """Per pass of the call, (whether a row refreshed, the lowest block among the rows that ran a window,
    None if none did): the full forward runs in the first kind of pass, the window forward (as wide as
    that block needs) in the second, both where rows are at different steps. Derived from each row's
    commits per pass (result.accepted) and the rule's end of a block; None where a row's commits do not
    finish every block within the call's passes (it stopped early, or a position predicted the mask and
    stayed masked)."""
    rows = [_row_blocks(a, cfg.block_size, _fixed_steps(cfg), cfg.num_blocks)
            for a in result.accepted[:, : result.passes]]
    if any(r is None for r in rows) or max(sum(r) for r in rows) != result.passes:
        return None
    # Each row's (block, step) in each of its passes.
    steps = [[(k, s) for k, count in enumerate(r) for s in range(count)] for r in rows]
    kinds = []
    for i in range(result.passes):
        now = [row[i] for row in steps if i < len(row)]
        windows = [k for k, s in now if s > 0]
        kinds.append((any(s == 0 for _, s in now), min(windows) if windows else None))
    return kinds


def forwards(kind: tuple[bool, int | None], work) -> list[Work]:
    """The Work of the forwards a pass of `kind` (pass_kinds) runs: work(None) for the refresh, work(k)
    for the window of block k."""
    refresh, block = kind
    return ([work(None)] if refresh else []) + ([] if block is None else [work(block)])


def kind_work(cfg: CanvasConfig, batch: int, prompt_len: int, block: int | None, filtered: bool) -> Work:
    """The least work of a pass of `batch` rows: block None, the whole canvas (a refresh writes its
    K/V into the cache; without a cache every pass is one); else the window pass of block `block`,
    its width per the cache mode, reading the cached K/V outside its window. Either way the head
    runs on each row's block alone (every rule here reads positions only relative to the block:
    blocks.loop view_size)."""
    n, size = cfg.max_new_tokens, cfg.block_size
    canvas = prompt_len + n
    if block is None:
        written = canvas if cfg.cache != "none" else 0
        return Work(tokens=batch * canvas, heads=batch * size, kv_written=batch * written, filtered=filtered)
    start = block * size  # the window's first answer position
    width = size if cfg.cache == "dual" else n - start
    read = canvas - size if cfg.cache == "dual" else prompt_len + start
    return Work(tokens=batch * width, heads=batch * size, kv_read=batch * read, kv_written=batch * width,
                filtered=filtered)


KINDS = ("refresh", "window", "mixed")


def kind_of(refresh: bool, block: int | None) -> str:
    """A pass_kinds entry's kind: every running row refreshes, every one runs its window, or both happen."""
    return "window" if not refresh else "refresh" if block is None else "mixed"


def _pass_program(model: Transformer, rule: nnx.Module, cfg: CanvasConfig, kind: str, pad_id: int):
    """A jitted (params, ids, lengths, eos, key, block, reps, cache) -> (checksum, cache): `reps` passes
    (blocks.loop.canvas_pass, the decoder's own) of every row in block `block`, the answer before it
    decoded and the rest masked, the rows at their block's first step (refresh), at a later one
    (window), or row 0 at the first and the rest later (mixed): the head and the rule run on each
    row's block alone, as in the decoder (blocks.loop view_size). Each pass's prompt differs (ids +
    i), so none of its work is loop-invariant, and the pass's answer feeds the checksum, so none is
    dead."""
    n, size = cfg.max_new_tokens, cfg.block_size
    widths = window_widths(cfg.cache, size, n)
    if kind == "refresh":  # no row reuses its cache, so the window branches never run: one compiles for all
        widths = widths[-1:]
    mask_id, vocab = model.cfg.mask_token_id, model.cfg.vocab_size
    view = view_size(rule, size)
    graphs, _ = zip(nnx.split(model), nnx.split(rule))

    def passes(params, ids, lengths, eos, key, block, reps, cache):
        model = nnx.merge(graphs[0], params[0])
        b = ids.shape[0]
        # The blocks before `block` decoded (a token other than the mask), the rest masked.
        decoded = jnp.where(jnp.arange(n) < block * size, (mask_id + 1) % vocab, mask_id)
        gen = jnp.broadcast_to(decoded, (b, n)).astype(jnp.int32)
        blocks = jnp.full((b,), block, jnp.int32)
        step = jnp.full((b,), int(kind != "refresh"), jnp.int32).at[0].set(int(kind == "window"))
        limit, running = jnp.full((b,), n, jnp.int32), jnp.ones((b,), bool)

        def one(i, carry):
            cache, checksum = carry

            def decide(logits, view):
                rule = nnx.merge(graphs[1], params[1])
                return rule(logits, jax.random.fold_in(key, i), view), nnx.state(rule)

            passed, _ = canvas_pass(model, decide, (ids + i) % vocab, lengths, gen, blocks, step, limit, cache,
                                    running, i, eos, jnp.int32(size), None, mask_id=mask_id, pad_id=pad_id,
                                    widths=widths, size=view)
            return passed.cache, checksum + jnp.sum(passed.gen) + jnp.sum(passed.committed)

        cache, checksum = jax.lax.fori_loop(0, reps, one, (cache, jnp.int32(0)))
        return checksum, cache

    donate = () if jax.default_backend() == "cpu" else (7,)  # XLA:CPU cannot reuse a donated buffer
    return jax.jit(passes, donate_argnums=donate)


def time_kinds(model: Transformer, cfg: CanvasConfig, prompts: Sequence[Sequence[int]],
               counts: dict[tuple[str, int], int], repeats: int) -> dict[tuple[str, int], float]:
    """Seconds of one pass of each (kind, block) in `counts` at the shapes decode_blocks gives `prompts`:
    counts[kind, block] such passes run in one compiled loop, the median of `repeats` such calls after
    two (the first compiles), divided by the passes."""
    rule = canvas_rule(model, cfg)
    batch = prepare_canvas(model, cfg, prompts, jax.random.key(0))
    _, params = zip(nnx.split(model), nnx.split(rule))
    ids, lengths = jnp.asarray(batch.ids), jnp.asarray(batch.lengths)
    cache = [KVCache.zeros(model.cfg, ids.shape[0], ids.shape[1] + cfg.max_new_tokens)]
    programs = {kind: _pass_program(model, rule, cfg, kind, batch.pad_id) for kind in {k for k, _ in counts}}

    def timed(kind: str, block: int, reps: int) -> float:
        def call():
            checksum, cache[0] = programs[kind](params, ids, lengths, batch.eos, batch.key, jnp.int32(block),
                                                jnp.int32(reps), cache[0])
            return checksum

        call_times(call, 2)
        return median_time(call, repeats)[0] / reps

    return {(kind, block): timed(kind, block, reps) for (kind, block), reps in counts.items()}


def filtered_rule(cfg: CanvasConfig) -> bool:
    """The rule filters the logits (top-p or top-k) before its softmax."""
    return cfg.top_p < 1 or cfg.top_k > 0
