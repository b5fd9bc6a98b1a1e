"""The compiled loop of every canvas decoder: the answer in blocks, a forward and a rule per pass.

The answer (max_new_tokens positions after each row's prompt, all masked at first) is cut into
blocks of `block_length`, decoded left to right; a whole-canvas decoder is one block spanning the
answer. Each pass runs the *forward* (`canvas_hidden`: the model over prompt + answer, every block
in the attention, later ones still masked; optionally with classifier-free guidance) and asks the
*rule* which masked positions up to the end of the row's current block (`View.candidates`) to
commit, with which tokens, and whether the row's block is done. A rule is an `nnx.Module` whose
variables are traced; the loop carries its state, so a rule may record what it saw (the Learn2PD
oracle does). With a KV cache (Fast-dLLM's prefix and dual caches, blocks.cached), the forward of a
row's later passes in a block runs a window of the canvas on the cache its first pass wrote; the
cache is carried in the loop state beside the canvas, and those passes' candidates are the masked
positions of the row's current block only (the window's).

A rule that reads positions only relative to the block (`view_size`: LLaDA's, the threshold,
Fast-dLLM's Dream) sees each row's block alone (`block_view`), in every pass, with a cache or
without: the forward gathers each row's hidden states at its block, so the output head and the
rule run on [B, block_length, V] logits, not [B, N, V]. The exception is a pass in which a row at
its block's first pass (or any pass without a cache) still has a mask before its block (a position
that predicted the mask token stays masked): its candidates reach back there, so that pass shows
the rule the whole answer, as it always does for a rule that reads positions in the answer
(Learn2PD's filter).

Rows are right-padded with their own valid lengths, so each row of a ragged batch decodes as it
would alone. A row stops once nothing before its first eos is masked (committed tokens never
change, so its answer up to that eos is final), once its last block is done, or when the loop
reaches its bound of passes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from apd_jax.decoding import continuous
from apd_jax.decoding.blocks.cached import (
    answer_hidden, cached_hidden, check_cacheable, window_answer, window_block, window_widths,
)
from apd_jax.decoding.continuous import Slots
from apd_jax.decoding.generation import Batch, DecoderConfig, GenerationResult, prepare
from apd_jax.models.cache import KVCache
from apd_jax.models.model import Transformer

# Canvas pieces


def build_canvas(prompts: jax.Array, prompt_lens: jax.Array, gen: jax.Array) -> jax.Array:
    """[B, P + N]: each row's prompt followed directly by its generation `gen` [B, N]."""
    b, p = prompts.shape
    n = gen.shape[1]
    canvas = jnp.concatenate([prompts, jnp.zeros((b, n), prompts.dtype)], axis=1)
    idx = prompt_lens[:, None] + jnp.arange(n)
    return canvas.at[jnp.arange(b)[:, None], idx].set(gen)


def canvas_hidden(model: Transformer, prompts: jax.Array, prompt_lens: jax.Array, gen: jax.Array, end: jax.Array,
                  mask_id: int, guided: bool) -> jax.Array:
    """The forward of a pass without a cache: hidden states [B, P + N, H] of prompt + answer `gen`,
    attending up to `end` [B], read as the model's family predicts (Transformer.aligned: Dream's
    shifted by one over the whole canvas, LLaDA's not). guided: [2B, P + N, H], the rows again with
    the prompt replaced by masks after them (LLaDA's classifier-free guidance, one call)."""
    canvas = build_canvas(prompts, prompt_lens, gen)
    if guided:
        canvas = jnp.concatenate([canvas, build_canvas(jnp.full_like(prompts, mask_id), prompt_lens, gen)])
        end = jnp.concatenate([end, end])
    hidden, _ = model(canvas, valid=end)
    return model.aligned(hidden)


def canvas_logits(model: Transformer, hidden: jax.Array, prompt_lens: jax.Array, start: jax.Array, width: int,
                  cfg_scale: jax.Array | None) -> jax.Array:
    """Float32 logits [B, width, V] of each row's answer positions [start, start + width) ([B] start)
    from canvas_hidden's `hidden`, the head run on them alone. With cfg_scale (not None), LLaDA's
    guidance: un + (cfg_scale + 1) * (cond - un), `un` the logits of the prompt-masked rows."""
    if cfg_scale is None:
        return model.logits(answer_hidden(hidden, prompt_lens + start, width))
    both = model.logits(answer_hidden(hidden, jnp.concatenate([prompt_lens + start] * 2), width))
    cond, un = jnp.split(both, 2)
    return un + (cfg_scale + 1) * (cond - un)


def descending_rank(score: jax.Array) -> jax.Array:
    """[B, N] int: each entry's rank in its row, 0 = largest; ties go to the lower index."""
    b, n = score.shape
    order = jnp.argsort(-score, axis=1, stable=True)
    return jnp.zeros((b, n), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(n, dtype=jnp.int32))


def most_confident(confidence: jax.Array, masked: jax.Array) -> jax.Array:
    """[B, N] bool: the single most confident masked position of each row with any."""
    return masked & (descending_rank(jnp.where(masked, confidence, -jnp.inf)) == 0)


def first_index(flags: jax.Array) -> jax.Array:
    """[B]: the first True column of each row, or the row width when none."""
    return jnp.where(jnp.any(flags, axis=1), jnp.argmax(flags, axis=1), flags.shape[1])


def decoded(gen: jax.Array, mask_id: int, eos: jax.Array) -> jax.Array:
    """[B] bool: no mask is left before the row's first eos (or anywhere, without eos)."""
    first_eos = first_index(jnp.isin(gen, eos))
    before = jnp.arange(gen.shape[1]) < first_eos[:, None]
    return ~jnp.any((gen == mask_id) & before, axis=1)


def prepare_canvas(model: Transformer, config: DecoderConfig, prompts: Sequence[Sequence[int]], key) -> Batch:
    """The shared set-up (generation.prepare) for a diffusion model (Dream, LLaDA), whose prompts may
    not hold its mask."""
    cfg = model.cfg
    if cfg.causal or cfg.mask_token_id is None:
        raise ValueError(f"diffusion decoding needs a bidirectional model (Dream or LLaDA) with a mask token, "
                         f"not a {cfg.model_type} model")
    return prepare(config, prompts, key, cfg, mask_id=cfg.mask_token_id)


def block_size(block_length: int | None, max_new_tokens: int) -> int:
    """The positions of a block: block_length, or the whole answer when None."""
    return max_new_tokens if block_length is None else block_length


def block_problems(block_length: int | None, max_new_tokens: int) -> list[str]:
    """What is wrong with a block_length setting (None, one block, is always right)."""
    if block_length is None:
        return []
    if block_length < 1:
        return [f"block_length={block_length} must be >= 1 (None: one block)"]
    if max_new_tokens % block_length:
        return [f"block_length={block_length} must divide max_new_tokens={max_new_tokens} (the answer is cut into "
                "whole blocks)"]
    return []


class Blocks:
    """The blocks of a block decoder's settings, for a settings class with the fields
    max_new_tokens and block_length (None: one block)."""

    @property
    def block_size(self) -> int:
        return block_size(self.block_length, self.max_new_tokens)

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_size


class BlockSteps(Blocks):
    """The passes and blocks of a block decoder's settings, for a settings class with the fields
    steps (None: max_new_tokens, one token per step) and block_length (None: one block): each block
    gets steps / blocks passes."""

    @property
    def step_count(self) -> int:
        return self.max_new_tokens if self.steps is None else self.steps

    def step_problems(self) -> list[str]:
        """What is wrong with steps and block_length (none: an empty list)."""
        blocks = block_problems(self.block_length, self.max_new_tokens)
        if self.step_count < 1:
            return [f"steps={self.steps} must be >= 1 (None: max_new_tokens)"] + blocks
        if not blocks and self.max_new_tokens >= 1 and self.step_count % self.num_blocks:
            return [f"steps={self.steps} must be a multiple of the number of blocks {self.num_blocks} "
                    "(max_new_tokens / block_length): each block gets steps / blocks passes"]
        return blocks


# What a rule sees and decides


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class View:
    """What a rule sees of the loop in a pass."""

    passes: jax.Array  # scalar: passes run before this one
    gen: jax.Array  # [B, N]: the answer so far, masks where not committed
    candidates: jax.Array  # [B, N] bool: masked positions up to the end of the row's current block
    block_start: jax.Array  # [B] int: the first position of the row's current block
    step: jax.Array  # [B] int: passes the row has run in its current block
    limit: jax.Array  # [B] int: positions the row decodes (padding after)
    eos: jax.Array  # [E]: the stop ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Commit:
    """A rule's decision: `tokens` where `transfer` (the loop keeps only candidates), whether the row's
    block is done, and the row's new limit (End-of-Text lowers it; the positions after it become
    padding, hidden from attention)."""

    tokens: jax.Array  # [B, N]
    transfer: jax.Array  # [B, N] bool
    block_done: jax.Array  # [B] bool
    limit: jax.Array  # [B] int


def block_emptied(view: View, transfer: jax.Array, limit: jax.Array) -> jax.Array:
    """[B] bool: `transfer` commits every candidate before `limit` (the block is done when it empties)."""
    return ~jnp.any(view.candidates & ~transfer & (jnp.arange(transfer.shape[1]) < limit[:, None]), axis=1)


def block_view(view: View, size: int) -> View:
    """`view` over each row's current block alone ([B, size] from its block_start), positions
    relative to the block: what a rule that reads positions only relative to the block sees
    (canvas_pass, `view_size`)."""
    idx = view.block_start[:, None] + jnp.arange(size)
    take = lambda x: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    return View(view.passes, take(view.gen), take(view.candidates), jnp.zeros_like(view.block_start), view.step,
                view.limit - view.block_start, view.eos)


def view_size(rule: nnx.Module, block_length: int) -> int | None:
    """The positions of the View canvas_pass shows `rule` and runs the head on: block_length when the
    rule reads positions only relative to the block (its `reads_positions_in_block`: LLaDA's, the
    threshold, Fast-dLLM's Dream; not Learn2PD's filter, whose features hold the position in the
    answer), None (the whole answer) otherwise."""
    return block_length if getattr(rule, "reads_positions_in_block", False) else None


def placed_commit(commit: Commit, gen: jax.Array, block_start: jax.Array) -> Commit:
    """A Commit made on block_view, back at the answer's positions (nothing transferred elsewhere)."""
    rows = jnp.arange(gen.shape[0])[:, None]
    idx = block_start[:, None] + jnp.arange(commit.tokens.shape[1])
    return Commit(gen.at[rows, idx].set(commit.tokens), jnp.zeros(gen.shape, bool).at[rows, idx].set(commit.transfer),
                  commit.block_done, commit.limit + block_start)


# The loop


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CanvasState:
    """The loop state: the answer so far and each row's progress."""

    passes: jax.Array  # scalar: passes run
    gen: jax.Array  # [B, N]: the generated positions, masks where not decoded yet
    accepted: jax.Array  # [B, passes bound]: tokens committed per row and pass
    key: jax.Array
    block: jax.Array  # [B]: the row's current block
    step: jax.Array  # [B]: passes the row has run in it
    limit: jax.Array  # [B]: positions the row decodes
    rule: nnx.State  # the rule's variables, as it leaves them
    cache: KVCache | None  # the K/V of each row's canvas (blocks.cached), None without a cache

    @classmethod
    def start(cls, b: int, n: int, bound: int, mask_id: int, key: jax.Array, rule: nnx.State,
              cache: KVCache | None) -> CanvasState:
        """Every position masked, nothing committed yet, each row in its first block."""
        zeros = jnp.zeros((b,), jnp.int32)
        return cls(jnp.int32(0), jnp.full((b, n), mask_id, jnp.int32), jnp.zeros((b, bound), jnp.int32), key,
                   zeros, zeros, jnp.full((b,), n, jnp.int32), rule, cache)


def canvas_outputs(state: CanvasState, eos: jax.Array):
    """(tokens, lengths, accepted, stopped at eos, passes): what `finish` takes. A row's
    length runs through its first eos, else over the whole canvas."""
    n = state.gen.shape[1]
    first_eos = first_index(jnp.isin(state.gen, eos))
    hit = first_eos < n
    return state.gen, jnp.where(hit, first_eos + 1, n), state.accepted, hit, state.passes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Passed:
    """What one pass leaves of each row: its answer, tokens committed, block, step in it, limit and
    cache (a row not running keeps its own)."""

    gen: jax.Array  # [B, N]
    committed: jax.Array  # [B] int: positions the pass committed
    block: jax.Array  # [B]
    step: jax.Array  # [B]
    limit: jax.Array  # [B]
    cache: KVCache | None


def canvas_pass(model: Transformer, decide, prompts: jax.Array, prompt_lens: jax.Array, gen: jax.Array,
                block: jax.Array, step: jax.Array, limit: jax.Array, cache: KVCache | None, running: jax.Array,
                passes: jax.Array, eos: jax.Array, block_length: jax.Array, cfg_scale: jax.Array | None, *,
                mask_id: int, pad_id: int, widths: tuple[int, ...] | None,
                size: int | None) -> tuple[Passed, nnx.State]:
    """One pass of the rows flagged in `running` [B]: the forward (whole canvas, or with a cache the
    refresh of rows at their block's step 0 and the window of the others), `decide(logits, View) ->
    (Commit, rule state)`, and the committed tokens. `passes`: the View's (scalar, or [B] per row).
    `widths`: those of a cached pass's window (blocks.cached), None without a cache. `size`
    (view_size): the block length when the rule reads positions only relative to the block; then
    the head and the rule run on each row's block alone ([B, size, V] logits, block_view), unless a
    refreshing row has a mask left before its block (a position that predicted the mask token),
    which the rule counts among its candidates; None: on the whole answer ([B, N, V]). The fixed
    batch's loop (`_decode`) and continuous batching's (blocks.slots) both run it."""
    n = gen.shape[1]
    j = jnp.arange(n)
    end = prompt_lens + limit
    block_start = block * block_length
    # A pass without a cache runs the whole canvas for every row: each running row refreshes.
    refresh = running if widths is None else running & (step == 0)
    reuse = running & ~refresh
    # A refreshing row's candidates are its masks up to its block's end; a window row's, its block's.
    candidates = ((gen == mask_id) & (j < block_start[:, None] + block_length) & running[:, None]
                  & (refresh[:, None] | (j >= block_start[:, None])))
    view = View(passes, gen, candidates, block_start, step, limit, eos)
    # One forward, whichever positions the head then reads.
    if widths is None:
        hidden = canvas_hidden(model, prompts, prompt_lens, gen, end, mask_id, cfg_scale is not None)
    else:
        window, refreshed, cache = cached_hidden(model, build_canvas(prompts, prompt_lens, gen), cache, prompt_lens,
                                                 end, block, block_start, refresh, reuse, widths, n)

    def whole():
        if widths is None:
            logits = canvas_logits(model, hidden, prompt_lens, jnp.zeros_like(block_start), n, cfg_scale)
        else:
            logits = window_answer(model, window, refreshed, block_start, refresh)
        return decide(logits, view)

    def blocks():
        if widths is None:
            logits = canvas_logits(model, hidden, prompt_lens, block_start, size, cfg_scale)
        else:
            logits = model.logits(window_block(window, refreshed, block_start, refresh, size))
        commit, rule_state = decide(logits, block_view(view, size))
        return placed_commit(commit, gen, block_start), rule_state

    if size is None:
        commit, rule_state = whole()
    else:
        # Only a refreshing row's candidates reach before its block: a mask it left there.
        left = jnp.any(candidates & (j < block_start[:, None]))
        commit, rule_state = jax.lax.cond(left, whole, blocks)
    new = jnp.where(commit.transfer & candidates, commit.tokens, gen)
    new = jnp.where(j < commit.limit[:, None], new, pad_id)
    # A position predicting the mask stays masked (Dream's and LLaDA's published loops allow it).
    committed = (gen == mask_id) & (new != mask_id) & (j < commit.limit[:, None])
    done = commit.block_done & running
    return Passed(new, jnp.sum(committed, axis=1), block + done, jnp.where(done, 0, step + running), commit.limit,
                  cache), rule_state


@functools.partial(jax.jit, static_argnames=("graphs", "max_new", "mask_id", "pad_id", "bound", "guided", "widths",
                                                   "size"))
def _decode(graphs, params, prompts, prompt_lens, eos, key, block_length, cfg_scale, *, max_new: int, mask_id: int,
            pad_id: int, bound: int, guided: bool, widths: tuple[int, ...] | None, size: int | None):
    """The loop of a fixed batch, every row from the start, one key for the batch; `widths` and
    `size` as canvas_pass takes them."""
    model = nnx.merge(graphs[0], params[0])
    num_blocks = max_new // block_length

    def active(state: CanvasState) -> jax.Array:
        return (state.block < num_blocks) & ~decoded(state.gen, mask_id, eos)

    def cond(state: CanvasState) -> jax.Array:
        return (state.passes < bound) & jnp.any(active(state))

    def body(state: CanvasState) -> CanvasState:
        i = state.passes
        key, rule_key = jax.random.split(state.key)

        def decide(logits: jax.Array, view: View) -> tuple[Commit, nnx.State]:
            rule = nnx.merge(graphs[1], state.rule)
            return rule(logits, rule_key, view), nnx.state(rule)

        passed, rule_state = canvas_pass(
            model, decide, prompts, prompt_lens, state.gen, state.block, state.step, state.limit, state.cache,
            active(state), i, eos, block_length, cfg_scale if guided else None, mask_id=mask_id, pad_id=pad_id,
            widths=widths, size=size)
        return CanvasState(i + 1, passed.gen, state.accepted.at[:, i].set(passed.committed), key, passed.block,
                           passed.step, passed.limit, rule_state, passed.cache)

    b = prompts.shape[0]
    cache = None if widths is None else KVCache.zeros(model.cfg, b, prompts.shape[1] + max_new)
    start = CanvasState.start(b, max_new, bound, mask_id, key, params[1], cache)
    state = jax.lax.while_loop(cond, body, start)
    return canvas_outputs(state, eos), state.rule


def decode_blocks(
    model: Transformer,
    rule: nnx.Module,
    prompts: Sequence[Sequence[int]],
    config: DecoderConfig,
    key: jax.Array | None,
    *,
    block_length: int,
    bound: int,
    cfg_scale: float = 0.0,
    cache: str = "none",
    slots_of: Callable[[list[list[int]], int], Slots] | None = None,
) -> tuple[GenerationResult, nnx.Module]:
    """Decode `prompts` block by block with `rule(logits, key, View) -> Commit`, one compiled call of
    at most `bound` passes: the result (`accepted[b, i]` counts the tokens row b committed in pass
    i) and the rule as the loop left it. cfg_scale > 0 adds LLaDA's guidance (two rows per row).
    cache: "none" (every pass over the whole canvas), "prefix" or "dual" (blocks.cached).
    slots_of(prompts, size): the decoder's slots (blocks.slots.block_slots for `config`); with them a
    call of more than continuous.MAX_ROWS prompts decodes through that many slots
    (continuous.large_call), in the memory of MAX_ROWS rows, and returns the rule as given. Where no
    noise is drawn (temperature 0, and for LLaDA low-confidence remasking) its outputs are the fixed
    batch's up to float rounding (a near-tie may fall the other way); rows that draw noise (a
    sampled row, LLaDA's random remasking) draw it from their own keys, fold_in(key, prompt index),
    not from the fixed batch's one key per pass. Without slots (Dream's own sampler) such a call
    decodes in fixed batches of MAX_ROWS, batch k on fold_in(key, k), `passes` their sum; the rule
    comes back as given."""
    check_cacheable(model, cache, cfg_scale > 0, rule)
    batch = prepare_canvas(model, config, prompts, key)
    slotted = None if slots_of is None else continuous.large_call(batch, slots_of)
    if slotted is not None:
        return slotted, rule
    if len(batch.lengths) > continuous.MAX_ROWS:
        rows, size = batch.rows(), continuous.MAX_ROWS
        parts = [decode_blocks(model, rule, rows[s: s + size], config, jax.random.fold_in(batch.key, s // size),
                               block_length=block_length, bound=bound, cfg_scale=cfg_scale, cache=cache)[0]
                 for s in range(0, len(rows), size)]
        return GenerationResult.concatenate(parts), rule
    graphs, params = zip(nnx.split(model), nnx.split(rule))
    outputs, rule_state = _decode(
        graphs, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), batch.eos, batch.key,
        jnp.int32(block_length), jnp.float32(cfg_scale), max_new=config.max_new_tokens,
        mask_id=model.cfg.mask_token_id, pad_id=batch.pad_id, bound=bound, guided=cfg_scale > 0,
        widths=None if cache == "none" else window_widths(cache, block_length, config.max_new_tokens),
        size=view_size(rule, block_length),
    )
    return batch.finish(*outputs), nnx.merge(graphs[1], rule_state)
