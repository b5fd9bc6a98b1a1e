"""The block decoder in continuous batching (decoding.continuous): S slots, each a row of the block
loop (blocks.loop canvas_pass) with its own prompt, budget, block progress, cache rows, PRNG key and
rule variables, refilled as rows end.

A slot's state is its canvas (prompt and answer), its block and step in it, its pass count, its rows
of the KV cache and its rule's variables, built from the settings the fixed decoder would run that
row alone with (`row_config`): the request's max_new_tokens, temperature, top_p and top_k, and for
LLaDA's and Fast-dLLM's Dream steps the run's steps per token (steps x budget / max_new_tokens, so
every block keeps the run's steps per block). The canvas holds max_new_tokens (the capacity)
positions; a row's positions past its budget are padding, hidden from attention, so it decodes as
the fixed decoder (`llada_generate`, `threshold_generate`, `dream_block_generate`, and Learn2PD's
`learn2pd_generate`, whose filter reads positions over the row's own budget, a rule variable) on
that row alone with its row config. The rule runs per row (vmapped), each row on its own key, so a
sampled row is the same in any slot and at any slot count. The fixed decoders run a call of more
than continuous.MAX_ROWS prompts through these slots (blocks.loop.decode_blocks).

Refreshes grouped: with a cache, a row's first pass in a block is a refresh, the whole canvas through
the model for every slot, while its other passes run a window. A row at its refresh waits while
fewer than `refresh_group` rows wait and another row can run a window pass, so the full forward runs
for several rows at once; a waiting row's state does not move (nor its key), so its tokens are the
same whenever its refresh runs. Refilled rows enter together at their first refresh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.blocks.cached import check_cacheable, window_widths
from apd_jax.decoding.blocks.loop import Commit, View, canvas_pass, decoded, first_index, prepare_canvas, view_size
from apd_jax.decoding.continuous import Slots, default_group
from apd_jax.decoding.generation import check_config
from apd_jax.models.cache import KVCache
from apd_jax.models.config import raise_problems
from apd_jax.models.model import Transformer


class BlockConfig(Protocol):
    """What the slots read of a decoder's settings (a DecoderConfig), which each settings class they
    run defines next to its rule, so this module names none of them: LLaDAConfig (blocks.llada),
    DreamBlockConfig (blocks.dream), ThresholdConfig and, with a keep rule, any ParallelConfig
    (decoding.diffusion). Its fixed decoder runs the same rule and bound. The rule comes from
    `block_rule(model) -> nnx.Module`, the fixed decoder's rule for the settings on `model` (checking
    what they need of it), in settings with a rule of their own (LLaDA's, Fast-dLLM's Dream, the
    threshold); with block_slots' `keep`, from `parallel_rule(model, keep) -> nnx.Module`, parallel
    decoding's rule around that keep rule (ParallelConfig's)."""

    max_new_tokens: int
    cache: str  # "none", "prefix" or "dual" (blocks.cached)

    @property
    def block_size(self) -> int:
        """The positions of a block (max_new_tokens: one block)."""

    @property
    def pass_bound(self) -> int:
        """The most passes the fixed decoder runs a row."""


Keep = Callable[[BlockConfig], nnx.Module]  # parallel decoding's keep rule for a row's settings


@dataclasses.dataclass(frozen=True)
class Spec:
    """What fixes the compiled slot program's shapes."""

    prompt_len: int  # padded prompt length
    max_new: int  # the canvas's answer positions: the largest budget
    block_length: int  # max_new when the answer is one block
    bound: int  # the most passes a row takes (its accepted counts' width)
    mask_id: int
    pad_id: int
    guided: bool  # LLaDA's classifier-free guidance
    widths: tuple[int, ...] | None  # a cached pass's window widths (blocks.cached); None without a cache
    view_size: int | None  # the rule's view: the block (the head runs on it alone), None: the answer (view_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-row state of S slots; a free slot has no block to decode (blocks 0)."""

    prompts: jax.Array  # [S, P]
    prompt_lens: jax.Array  # [S]
    gen: jax.Array  # [S, N]: the answer, masks where not decoded, padding past the row's budget
    accepted: jax.Array  # [S, bound]: tokens committed in each of the row's passes
    keys: jax.Array  # [S] typed PRNG keys
    block: jax.Array  # [S]: the row's current block
    step: jax.Array  # [S]: passes the row has run in it
    limit: jax.Array  # [S]: positions the row decodes (its budget; End-of-Text lowers it)
    budget: jax.Array  # [S]: the row's max_new_tokens
    blocks: jax.Array  # [S]: the row's number of blocks
    bound: jax.Array  # [S]: the row's most passes
    passes: jax.Array  # [S]: passes the row has run
    rule: nnx.State  # the rule's variables, one row each ([S, ...] leaves)
    cache: KVCache | None
    eos: jax.Array  # [E]
    wait: jax.Array  # scalar: refresh_group
    cfg_scale: jax.Array  # scalar
    steps: jax.Array  # scalar: loop passes run
    committed: jax.Array  # scalar: rows that committed tokens, summed over the passes (occupancy)
    refreshes: jax.Array  # scalar: passes that ran the full forward (every pass without a cache)
    windows: jax.Array  # scalar: passes that ran a window forward


# Settings of one row


def _row_changes(config: BlockConfig, max_new_tokens: int, temperature: float, top_p: float,
                 top_k: int) -> tuple[dict, list[str]]:
    """The fields a request changes in the run's settings (`row_config`), and what keeps them from fitting."""
    changes = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    if getattr(config, "steps", None) is None:
        return changes, []
    changes["steps"], rest = divmod(config.steps * max_new_tokens, config.max_new_tokens)
    if rest:
        return changes, [f"a row gets steps x max_new_tokens / {config.max_new_tokens} passes (the run's steps per "
                         f"token), and {config.steps} x {max_new_tokens} / {config.max_new_tokens} is not whole: "
                         "choose a budget it divides"]
    return changes, []


def row_problems(config: BlockConfig, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> list[str]:
    """What keeps a request's own settings from running with the run's `config` (none: an empty list)."""
    changes, problems = _row_changes(config, max_new_tokens, temperature, top_p, top_k)
    return problems or dataclasses.replace(config, **changes).problems()


def row_config(config: BlockConfig, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> BlockConfig:
    """The settings the fixed decoder runs a request alone with: its own budget and knobs, and with
    `steps` the run's steps per token (steps x max_new_tokens / the run's), which keeps the run's
    steps per block. ValueError naming the request's settings when they do not fit (`row_problems`)."""
    raise_problems(f"a request's (max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}, "
                   f"top_k={top_k})", row_problems(config, max_new_tokens, temperature, top_p, top_k))
    return dataclasses.replace(config, **_row_changes(config, max_new_tokens, temperature, top_p, top_k)[0])


def _fit(leaf: jax.Array, like: jax.Array) -> jax.Array:
    """A row's rule variable at the capacity rule's shape: a per-step table of a smaller budget's
    fewer steps completed with the capacity rule's entries (the row reads only its own steps), so
    rows of the same schedule hold equal tables."""
    leaf, like = jnp.asarray(leaf), jnp.asarray(like)
    return leaf if leaf.shape == like.shape else like.at[tuple(slice(0, n) for n in leaf.shape)].set(leaf)


# The compiled pieces


def _empty(model: Transformer, rule: nnx.State, spec: Spec, size: int, eos: jax.Array, wait: jax.Array,
           cfg_scale: jax.Array) -> SlotState:
    zeros = jnp.zeros((size,), jnp.int32)
    cache = None if spec.widths is None else KVCache.zeros(model.cfg, size, spec.prompt_len + spec.max_new)
    return SlotState(
        prompts=jnp.zeros((size, spec.prompt_len), jnp.int32), prompt_lens=zeros + 1,
        gen=jnp.full((size, spec.max_new), spec.pad_id, jnp.int32), accepted=jnp.zeros((size, spec.bound), jnp.int32),
        keys=jax.random.split(jax.random.key(0), size), block=zeros, step=zeros, limit=zeros, budget=zeros,
        blocks=zeros, bound=zeros, passes=zeros, rule=jax.tree.map(lambda x: jnp.stack([x] * size), rule),
        cache=cache, eos=eos, wait=wait, cfg_scale=cfg_scale, steps=jnp.int32(0),
        committed=jnp.int32(0), refreshes=jnp.int32(0), windows=jnp.int32(0),
    )


def _refill(state: SlotState, slots, ids, lengths, budgets, bounds, rules: nnx.State, keys, spec: Spec) -> SlotState:
    """Slots `slots` [G] (an index >= S is padding, dropped) take new prompts with their budgets, pass
    bounds, rule variables and keys; each starts at its first block, every answer position masked up
    to its budget. Its cache rows are rewritten by its first pass (a refresh)."""
    put = lambda buf, new: buf.at[slots].set(new, mode="drop")  # noqa: E731
    g = ids.shape[0]
    zeros = jnp.zeros((g,), jnp.int32)
    gen = jnp.where(jnp.arange(spec.max_new) < budgets[:, None], spec.mask_id, spec.pad_id).astype(jnp.int32)
    return dataclasses.replace(
        state, prompts=put(state.prompts, ids), prompt_lens=put(state.prompt_lens, lengths), gen=put(state.gen, gen),
        accepted=put(state.accepted, jnp.zeros((g, spec.bound), jnp.int32)), keys=put(state.keys, keys),
        block=put(state.block, zeros), step=put(state.step, zeros), limit=put(state.limit, budgets),
        budget=put(state.budget, budgets), blocks=put(state.blocks, -(-budgets // spec.block_length)),
        bound=put(state.bound, bounds), passes=put(state.passes, zeros), rule=jax.tree.map(put, state.rule, rules),
    )


def _active(state: SlotState, spec: Spec) -> jax.Array:
    """[S] bool: rows with blocks and passes left and a mask before their first eos."""
    return (state.block < state.blocks) & (state.passes < state.bound) & ~decoded(state.gen, spec.mask_id, state.eos)


def _step(model: Transformer, rule_graph, state: SlotState, spec: Spec) -> SlotState:
    """One pass: the running rows (with a cache, rows at a refresh wait while fewer than `wait` do and
    another row can run a window pass) through canvas_pass, the rule per row on the row's own key."""
    active = _active(state, spec)
    at_refresh = active & (state.step == 0)
    full_width = spec.widths is None  # without a cache every pass runs the whole canvas
    if full_width:
        running = active
    else:
        defer = (jnp.sum(at_refresh) < state.wait) & jnp.any(active & ~at_refresh)
        running = active & ~(defer & at_refresh)
    split = jax.vmap(jax.random.split)(state.keys)
    keys = jnp.where(running[:, None], jax.random.key_data(split[:, 0]), jax.random.key_data(state.keys))
    row_keys = split[:, 1]

    def decide(logits: jax.Array, view: View) -> tuple[Commit, nnx.State]:
        def one(rule_state, logits, key, view):
            rule = nnx.merge(rule_graph, rule_state)
            row = View(view.passes, view.gen[None], view.candidates[None], view.block_start[None], view.step[None],
                       view.limit[None], view.eos)
            return jax.tree.map(lambda x: x[0], rule(logits[None], key, row))

        axes = View(0, 0, 0, 0, 0, 0, None)
        # Running rows of one rule state (the same settings) run it unbatched, so the rule's branches on
        # its settings stay branches: a greedy pass draws no noise.
        first = jnp.argmax(running)
        shared = jax.tree.map(lambda x: x[first], state.rule)
        same = jnp.all(jnp.stack([jnp.all((x == x[first]) | ~running.reshape((-1,) + (1,) * (x.ndim - 1)))
                                  for x in jax.tree.leaves(state.rule)]))
        commit = jax.lax.cond(
            same, lambda: jax.vmap(one, in_axes=(None, 0, 0, axes))(shared, logits, row_keys, view),
            lambda: jax.vmap(one, in_axes=(0, 0, 0, axes))(state.rule, logits, row_keys, view))
        return commit, state.rule

    passed, _ = canvas_pass(
        model, decide, state.prompts, state.prompt_lens, state.gen, state.block, state.step, state.limit, state.cache,
        running, state.passes, state.eos, jnp.int32(spec.block_length), state.cfg_scale if spec.guided else None,
        mask_id=spec.mask_id, pad_id=spec.pad_id, widths=spec.widths, size=spec.view_size)
    rows = jnp.arange(state.gen.shape[0])
    return dataclasses.replace(
        state, gen=passed.gen, accepted=state.accepted.at[rows, jnp.where(running, state.passes, spec.bound)].set(
            passed.committed, mode="drop"),
        keys=jax.random.wrap_key_data(keys), block=passed.block, step=passed.step, limit=passed.limit,
        passes=state.passes + running, cache=passed.cache, steps=state.steps + 1,
        committed=state.committed + jnp.sum(running & (passed.committed > 0)),
        refreshes=state.refreshes + jnp.any(running & (full_width | (state.step == 0))).astype(jnp.int32),
        windows=state.windows + (jnp.any(running & (state.step > 0)) & ~full_width).astype(jnp.int32),
    )


def _outputs(state: SlotState, spec: Spec):
    """Each row's answer, its length (through its first eos within its budget, else its budget), tokens
    committed per pass, whether it stopped at an eos, and whether it is done."""
    within = jnp.arange(spec.max_new) < state.budget[:, None]
    first_eos = first_index(jnp.isin(state.gen, state.eos) & within)
    hit = first_eos < state.budget
    return state.gen, jnp.where(hit, first_eos + 1, state.budget), state.accepted, hit, ~_active(state, spec)


@functools.partial(jax.jit, static_argnames=("graphs", "spec", "size"))
def _slots_empty(graphs, params, rule, eos, cfg_scale, wait, spec: Spec, size: int) -> SlotState:
    return _empty(nnx.merge(graphs[0], params[0]), rule, spec, size, eos, wait, cfg_scale)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def _slots_refill(state, slots, ids, lengths, budgets, bounds, rules, keys, spec: Spec) -> SlotState:
    return _refill(state, slots, ids, lengths, budgets, bounds, rules, keys, spec)


@functools.partial(jax.jit, static_argnames=("graphs", "spec"), donate_argnames=("state",))
def _slots_run(graphs, params, state: SlotState, until, spec: Spec) -> SlotState:
    """Passes until at least `until` rows (free slots included) are done, or every row is."""
    model = nnx.merge(graphs[0], params[0])

    def cond(s: SlotState) -> jax.Array:
        active = _active(s, spec)
        return jnp.any(active) & (jnp.sum(~active) < until)

    return jax.lax.while_loop(cond, lambda s: _step(model, graphs[1], s, spec), state)


@functools.partial(jax.jit, static_argnames=("spec",))
def _slots_read(state: SlotState, spec: Spec):
    return _outputs(state, spec)


# The builder


def block_slots(model: Transformer, prompts: Sequence[Sequence[int]], config: BlockConfig, size: int = 32,
                group: int | None = None, *, refresh_group: int | None = None, keep: Keep | None = None) -> Slots:
    """The block decoder's compiled steps over `size` slots for continuous batching
    (`continuous.decode` / `continuous.generate`), for LLaDA's generate (LLaDAConfig), threshold
    decoding (ThresholdConfig), Fast-dLLM's Dream (DreamBlockConfig) and parallel decoding by another
    keep rule (ParallelConfig with `keep`, as Learn2PD's), with their cache: shaped for `prompts`
    (every prompt checked; padded to their longest's bucket) and budgets up to max_new_tokens. A
    request decodes as the fixed decoder on it alone with `row_config`'s settings.
    refresh_group: with a cache, a row at a block's first pass waits while fewer than this many rows
    wait and another row can run a window pass (None: the slot count, so refreshes wait for every
    window pass; 1: each row refreshes at once). A refresh runs the whole canvas for every slot, a
    window pass only the block (dual) or the answer from it (prefix), so the extra window passes
    of waiting rows cost far less than the refreshes they save.
    keep: parallel decoding's keep rule (diffusion.parallel_decode's) for a row's settings, built
    once per distinct settings (its variables are the row's); None: the settings' own rule
    (BlockConfig's block_rule; for ThresholdConfig the threshold's)."""
    if keep is not None and not hasattr(config, "parallel_rule"):
        raise ValueError(f"block_slots: a keep rule is parallel decoding's; {type(config).__name__} settings have "
                         "their own rule: drop keep")
    if keep is None and not hasattr(config, "block_rule"):
        raise ValueError(f"block_slots runs LLaDAConfig, ThresholdConfig or DreamBlockConfig settings (or "
                         f"ParallelConfig settings with a keep rule: for Learn2PD use learn2pd.learn2pd_slots), "
                         f"not {type(config).__name__}")
    config = check_config(config, type(config))

    def rule_of(settings: BlockConfig) -> nnx.Module:
        """The fixed decoder's rule for a row's settings."""
        return settings.block_rule(model) if keep is None else settings.parallel_rule(model, keep(settings))

    rule = rule_of(config)
    guided = getattr(config, "cfg_scale", 0.0) > 0  # LLaDA's classifier-free guidance
    check_cacheable(model, config.cache, guided, rule)
    batch = prepare_canvas(model, config, prompts, None)
    mask_id = model.cfg.mask_token_id
    block_length = config.block_size
    spec = Spec(prompt_len=batch.ids.shape[1], max_new=config.max_new_tokens, block_length=block_length,
                bound=config.pass_bound, mask_id=mask_id, pad_id=batch.pad_id, guided=guided,
                widths=None if config.cache == "none" else window_widths(config.cache, block_length,
                                                                         config.max_new_tokens),
                view_size=view_size(rule, block_length))
    rule_graph, rule_state = nnx.split(rule)
    model_graph, model_state = nnx.split(model)
    graphs, params = (model_graph, rule_graph), (model_state,)
    size = min(size, len(batch.lengths))
    group = default_group(size) if group is None else min(group, size)
    wait = size if refresh_group is None else refresh_group
    if wait < 1:
        raise ValueError(f"refresh_group={refresh_group} must be >= 1 (1: each row refreshes at once)")
    rows: dict[tuple, tuple[int, nnx.State]] = {}  # a row's (bound, rule variables) by its settings

    def row(settings: tuple) -> tuple[int, nnx.State]:
        if settings not in rows:
            own = row_config(config, *settings)
            state = nnx.state(rule_of(own))
            rows[settings] = own.pass_bound, jax.tree.map(_fit, state, rule_state)
        return rows[settings]

    def knobs(temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray):
        return temperature, top_p, top_k

    def refill(state: SlotState, slots, ids, lengths, budgets, knobs, keys) -> SlotState:
        chosen = [row((int(m), float(t), float(p), int(k))) for m, t, p, k in zip(budgets, *knobs)]
        rules = jax.tree.map(lambda *x: jnp.stack(x), *[r for _, r in chosen])
        bounds = np.asarray([b for b, _ in chosen], np.int32)
        return _slots_refill(state, jnp.asarray(slots), jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(budgets),
                             jnp.asarray(bounds), rules, keys, spec)

    cfg_scale = float(getattr(config, "cfg_scale", 0.0))
    return Slots(
        size=size, group=group, prompt_len=spec.prompt_len, max_new=spec.max_new, defaults=config, knobs=knobs,
        pad_id=batch.pad_id,
        empty=lambda: _slots_empty(graphs, params, rule_state, batch.eos, jnp.float32(cfg_scale), jnp.int32(wait), spec,
                                   size),
        refill=refill,
        run=lambda state, until: _slots_run(graphs, params, state, jnp.int32(until), spec),
        read=lambda state: jax.device_get(_slots_read(state, spec)),
        counts=lambda state: (int(state.steps), int(state.committed)),
        problems=functools.partial(row_problems, config),
    )


def pass_counts(state: SlotState) -> dict[str, int]:
    """A slot run's passes: all, those that ran the full (refresh) forward, those that ran a window."""
    return {"passes": int(state.steps), "refresh": int(state.refreshes), "window": int(state.windows)}
