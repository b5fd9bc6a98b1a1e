"""APD (and left-to-right K) as steps over per-row state, the pieces every compiled APD loop is built from.

A generation holds S slots. `empty` makes S free slots; `refill` puts new prompts into a group of
slots (their tokens, budgets, knobs and keys, and the verifier's prompt prefill, `prefill`); `step`
is one pass of every active row; `run` steps until enough rows are done; `outputs` reads each row's
generation. Everything a row's decoding depends on is in its own state: its first-pass flag (the
drafter's first pass runs left = 0 over [0, P + M), whose K/V are what the published code caches),
its pass count, lookahead, budget, knobs and PRNG key, so a row decodes the same whatever the other
slots hold and whenever it entered (`continuous.py` refills slots as rows end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh

from apd_jax.decoding.apd_rule import APDConfig, APDKnobs, accepted_length, draft_tokens, right_edge
from apd_jax.decoding.apd_rule import verifier_predictions
from apd_jax.models.cache import KVCache
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.models.sharding import constrain_cache


@dataclasses.dataclass(frozen=True)
class _Level:
    """One compiled draft width and the drafter window sizes that serve it."""

    draft: int  # masked positions drafted and scored per pass
    windows: tuple[int, ...]  # compiled drafter window sizes, ascending (see apd._levels)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that fixes the compiled program's shapes."""

    W: int
    lookahead: APDConfig  # the lookahead settings (M, and M_min / M_scale / M_margin when adaptive)
    levels: tuple[_Level, ...]  # ascending draft widths; one, min(M, max_new_tokens), for the fixed M
    prompt_len: int  # padded prompt length
    max_new: int  # the largest budget of a row
    total: int  # sequence buffer and cache length
    vocab: int  # shared vocabulary
    mask_id: int
    rule: str
    fixed_k: int = 0  # > 0: accept exactly min(fixed_k, drafted) per pass, no verifier (left-to-right K)
    live: bool = False  # report each pass's accepted tokens to the host as it happens (see `live_view`)
    logprobs: bool = False  # keep each generated token's log-probability under the verifier (`APDCore`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class APDState:
    """Per-row state of S slots; a free slot is a done row."""

    tokens: jax.Array  # [S, total]: prompt, accepted tokens, mask tokens
    start: jax.Array  # [S]: prompt length (the first generated position)
    limit: jax.Array  # [S]: prompt length + the row's budget
    t: jax.Array  # [S]: first masked position
    t_prev: jax.Array  # [S]: t before the row's last pass (the window's left edge follows it)
    lookahead: jax.Array  # [S]: masked positions past t the next pass drafts (M unless adaptive)
    first: jax.Array  # [S] bool: the row's next pass is its drafter's first (left = 0)
    done: jax.Array  # [S] bool
    eos_at: jax.Array  # [S]: position of the first generated eos, or -1
    passes: jax.Array  # [S]: the row's passes so far
    accepted: jax.Array  # [S, max_new]: tokens the row committed in each of its passes
    keys: jax.Array  # [S] typed PRNG keys, one per row
    knobs: APDKnobs  # [S] each
    eos: jax.Array  # [E]: the ids a row stops at
    dcache: KVCache
    vcache: KVCache | None  # None for left-to-right K (no verifier)
    logprob: jax.Array | None  # [S, max_new]: each generated token's verifier log-probability (spec.logprobs)
    carry: jax.Array | None  # [S, vocab]: the verifier's log-probabilities for position t (spec.logprobs)
    steps: jax.Array  # scalar: passes run (loop iterations), for the result and occupancy only
    committed: jax.Array  # scalar: rows that committed tokens, summed over the passes (occupancy)


def empty(spec: Spec, drafter: ModelConfig, verifier: ModelConfig | None, slots: int, eos: jax.Array,
          mesh: Mesh | None = None) -> APDState:
    """S free slots (done rows with greedy knobs and no tokens), their caches allocated."""
    zeros = jnp.zeros((slots,), jnp.int32)
    return APDState(
        tokens=jnp.full((slots, spec.total), spec.mask_id, jnp.int32), start=zeros, limit=zeros, t=zeros,
        t_prev=zeros, lookahead=zeros + spec.lookahead.M, first=jnp.zeros((slots,), bool),
        done=jnp.ones((slots,), bool), eos_at=zeros - 1, passes=zeros,
        accepted=jnp.zeros((slots, spec.max_new), jnp.int32), keys=jax.random.split(jax.random.key(0), slots),
        knobs=APDKnobs(jnp.zeros((slots,)), jnp.ones((slots,)), zeros, jnp.zeros((slots,))), eos=eos,
        dcache=constrain_cache(KVCache.zeros(drafter, slots, spec.total), mesh),
        vcache=None if verifier is None else constrain_cache(KVCache.zeros(verifier, slots, spec.total), mesh),
        logprob=jnp.zeros((slots, spec.max_new)) if spec.logprobs else None,
        carry=jnp.zeros((slots, spec.vocab)) if spec.logprobs else None,
        steps=jnp.int32(0), committed=jnp.int32(0),
    )


def prefill(verifier: Transformer, cache: KVCache, slots: jax.Array, ids: jax.Array,
            lengths: jax.Array) -> tuple[KVCache, jax.Array]:
    """The verifier's K/V of the prompts ids [G, P] (true lengths [G]) written into rows `slots` of its cache,
    and its hidden state [G, H] at each prompt's last token (what predicts the first generated one)."""
    hidden, part = verifier(ids, valid=lengths, cache=KVCache.zeros(verifier.cfg, ids.shape[0], ids.shape[1]))
    return cache.put_rows(slots, part), _at(hidden, lengths - 1)


def _at(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden[b, index[b]]: [B, H]."""
    return jnp.take_along_axis(hidden, jnp.clip(index, 0, hidden.shape[1] - 1)[:, None, None], axis=1)[:, 0]


def _log_softmax(verifier: Transformer, hidden: jax.Array, spec: Spec) -> jax.Array:
    return jax.nn.log_softmax(verifier.logits(hidden, vocab=spec.vocab).astype(jnp.float32), axis=-1)


def refill(verifier: Transformer | None, state: APDState, slots: jax.Array, ids: jax.Array, lengths: jax.Array,
           budgets: jax.Array, knobs: APDKnobs, keys: jax.Array, spec: Spec) -> APDState:
    """Slots `slots` [G] take new prompts ids [G, P] (lengths [G]), each with its budget (<= spec.max_new),
    knobs and key; a slot index >= S is padding of the group and dropped. The verifier prefills their
    prompts now; their drafter first pass is their next `step`."""
    put = lambda buf, new: buf.at[slots].set(new, mode="drop")  # noqa: E731
    g = slots.shape[0]
    row = jnp.full((g, spec.total), spec.mask_id, jnp.int32).at[:, : spec.prompt_len].set(ids)
    # Padding past each prompt is masks too, so every position >= t is masked.
    row = jnp.where(jnp.arange(spec.total) < lengths[:, None], row, spec.mask_id)
    ones = jnp.ones((g,), bool)
    vcache, carry = (None, None) if verifier is None else prefill(verifier, state.vcache, slots, ids, lengths)
    if spec.logprobs:
        state = dataclasses.replace(state, logprob=put(state.logprob, jnp.zeros((g, spec.max_new))),
                                    carry=put(state.carry, _log_softmax(verifier, carry, spec)))
    return dataclasses.replace(
        state,
        tokens=put(state.tokens, row), start=put(state.start, lengths), limit=put(state.limit, lengths + budgets),
        t=put(state.t, lengths), t_prev=put(state.t_prev, lengths),
        lookahead=put(state.lookahead, jnp.full((g,), spec.lookahead.M, jnp.int32)), first=put(state.first, ones),
        done=put(state.done, ~ones), eos_at=put(state.eos_at, jnp.full((g,), -1, jnp.int32)),
        passes=put(state.passes, jnp.zeros((g,), jnp.int32)),
        accepted=put(state.accepted, jnp.zeros((g, spec.max_new), jnp.int32)), keys=put(state.keys, keys),
        knobs=jax.tree.map(put, state.knobs, knobs),
        vcache=vcache,
    )


def _draft_logits(drafter: Transformer, hidden: jax.Array, start: jax.Array, t: jax.Array, draft: int,
                  spec: Spec) -> jax.Array:
    """Drafter logits for positions t .. t + draft - 1, read from a window starting at `start`."""
    hidden = drafter.aligned(hidden)
    idx = jnp.clip(t[:, None] - start[:, None] + jnp.arange(draft), 0, hidden.shape[1] - 1)
    picked = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)
    return drafter.logits(picked, vocab=spec.vocab)


# `live_view`'s listener; module level, so one compiled loop serves every listener.
_listener: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None


def _emit(draft: np.ndarray, kept: np.ndarray, eos_at: np.ndarray) -> None:
    if _listener is not None:
        _listener(np.asarray(draft), np.asarray(kept), np.asarray(eos_at))


@contextlib.contextmanager
def live_view(listener: Callable[[np.ndarray, np.ndarray, np.ndarray], None]):
    """Within the block, `apd_generate(..., live=True)` calls listener(draft [B, n], kept [B], eos_at [B])
    after every pass, in order: row b grew by draft[b, :kept[b]] (through its first eos, at
    absolute position eos_at[b] >= 0)."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


def _split_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next keys, this pass's noise keys), each row splitting its own key."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def _accept(verifier: Transformer | None, state: APDState, logits_d: jax.Array, right: jax.Array, spec: Spec) -> APDState:
    """Draft, verify, accept and write one pass for every active row (the window ends at `right`)."""
    b = state.t.shape[0]
    j = jnp.arange(logits_d.shape[1])
    n = right - state.t  # drafted positions per row
    active = ~state.done
    keys, noise = _split_rows(state.keys)

    draft = draft_tokens(logits_d, noise, state.knobs, spec.mask_id)
    if verifier is None:
        k, vcache = jnp.minimum(spec.fixed_k, n), None
    else:
        hidden, vcache = verifier(draft, start=state.t, valid=n, cache=state.vcache)
        logits_v = verifier_predictions(verifier, hidden, spec.vocab)
        k = accepted_length(draft, logits_d, logits_v, n, noise, state.knobs, spec.rule, spec.mask_id)
    k = jnp.where(active, k, 0)
    if spec.logprobs:
        state = _keep_logprobs(verifier, state, logits_v, hidden, draft, k, spec)

    take = j < k[:, None]
    pos = jnp.where(take, state.t[:, None] + j, spec.total)  # out of range: dropped
    tokens = state.tokens.at[jnp.arange(b)[:, None], pos].set(draft, mode="drop")
    is_eos = jnp.isin(draft, state.eos) & take
    hit = jnp.any(is_eos, axis=1) & (state.eos_at < 0)
    first_eos = jnp.argmax(is_eos, axis=1)  # offset in this pass's draft
    eos_at = jnp.where(hit, state.t + first_eos, state.eos_at)
    t = state.t + k
    if spec.live:  # ordered: the host sees the passes in the loop's order
        kept = jnp.where(hit, first_eos + 1, k)  # up to and including a first eos
        io_callback(_emit, None, draft, kept, eos_at, ordered=True)
    return dataclasses.replace(
        state,
        tokens=tokens,
        t=t,
        t_prev=jnp.where(active, state.t, state.t_prev),
        lookahead=jnp.where(active, spec.lookahead.next_lookahead(k), state.lookahead),
        first=state.first & ~active,
        done=state.done | (t >= state.limit) | (eos_at >= 0),
        eos_at=eos_at,
        passes=state.passes + active,
        accepted=state.accepted.at[jnp.arange(b), jnp.where(active, state.passes, spec.max_new)].set(k, mode="drop"),
        # A rejected draft's verifier K/V are stale: crop to the accepted prefix.
        vcache=None if vcache is None else vcache.crop(t),
        keys=keys,
        steps=state.steps + 1,
        committed=state.committed + jnp.sum(active),
    )


def _keep_logprobs(verifier: Transformer, state: APDState, logits_v: jax.Array, hidden: jax.Array, draft: jax.Array,
                   k: jax.Array, spec: Spec) -> APDState:
    """Each accepted token's verifier log-probability: draft position 0 from the carried distribution (the
    output before t), position j from output j - 1; then the carry becomes the last accepted output's."""
    b, n = draft.shape
    j = jnp.arange(n)
    lsm = jax.nn.log_softmax(logits_v.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(lsm, draft[..., None], axis=-1)[..., 0]
    lp = jnp.where(j == 0, jnp.take_along_axis(state.carry, draft[:, :1], axis=-1), lp)
    col = jnp.where(j < k[:, None], state.t[:, None] - state.start[:, None] + j, spec.max_new)  # out of range: dropped
    carry = _log_softmax(verifier, _at(hidden, k - 1), spec)
    return dataclasses.replace(state, logprob=state.logprob.at[jnp.arange(b)[:, None], col].set(lp, mode="drop"),
                               carry=jnp.where((k > 0)[:, None], carry, state.carry))


def _level_index(levels: tuple[_Level, ...], width: jax.Array, window: jax.Array) -> jax.Array:
    """The first level whose draft width holds `width` and whose widest window holds `window`
    (both ascend over the levels): the smallest compiled level that every active row fits."""
    return jnp.maximum(jnp.sum(jnp.asarray([lv.draft for lv in levels]) < width),
                       jnp.sum(jnp.asarray([lv.windows[-1] for lv in levels]) < window))


def _window(tokens: jax.Array, left: jax.Array, size: int) -> jax.Array:
    idx = jnp.clip(left[:, None] + jnp.arange(size), 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, idx, axis=1)


def step(drafter: Transformer, verifier: Transformer | None, state: APDState, spec: Spec) -> APDState:
    """One pass of every active row: the drafter over its window, a draft, the verifier's check, acceptance.

    A row's window is [left, right): left = 0 on its first pass, else t_prev - W + 1; right = min(t +
    lookahead, limit). The pass runs the smallest compiled level and window holding every active row.
    """

    def drafter_pass(state: APDState, left: jax.Array, right: jax.Array, size: int,
                     draft: int) -> tuple[APDState, jax.Array]:
        hidden, dcache = drafter(_window(state.tokens, left, size), start=left, valid=right - left, cache=state.dcache)
        return dataclasses.replace(state, dcache=dcache), _draft_logits(drafter, hidden, left, state.t, draft, spec)

    def level_pass(state: APDState, left: jax.Array, right: jax.Array, window: jax.Array, level: _Level) -> APDState:
        # The smallest compiled window of this draft width that holds every active row's [left, right).
        branch = jnp.sum(jnp.asarray(level.windows) < window)
        passes = [functools.partial(drafter_pass, size=size, draft=level.draft) for size in level.windows]
        state, logits_d = jax.lax.switch(branch, passes, state, left, right)
        return _accept(verifier, state, logits_d, right, spec)

    left = jnp.where(state.first, 0, jnp.maximum(state.t_prev - spec.W + 1, 0))
    right = right_edge(state.t, state.lookahead, state.limit)
    width = jnp.max(jnp.where(state.done, 0, right - state.t))
    window = jnp.max(jnp.where(state.done, 0, right - left))
    passes = [functools.partial(level_pass, level=lv) for lv in spec.levels]
    return jax.lax.switch(_level_index(spec.levels, width, window), passes, state, left, right, window)


def run(drafter: Transformer, verifier: Transformer | None, state: APDState, spec: Spec, until: jax.Array) -> APDState:
    """Step until at least `until` rows (free slots included) are done, or every row is."""

    def cond(state: APDState) -> jax.Array:
        return jnp.any(~state.done) & (jnp.sum(state.done) < until)

    return jax.lax.while_loop(cond, lambda s: step(drafter, verifier, s, spec), state)


def outputs(state: APDState, spec: Spec) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Each row's generation [S, max_new] (its positions from its prompt's end), its length (through its
    first eos, within its budget), its tokens accepted per pass, and whether it stopped at an eos."""
    end = jnp.where(state.eos_at >= 0, state.eos_at + 1, jnp.minimum(state.t, state.limit))
    gen_pos = state.start[:, None] + jnp.arange(spec.max_new)
    out = jnp.take_along_axis(state.tokens, jnp.clip(gen_pos, 0, spec.total - 1), axis=1)
    return out, end - state.start, state.accepted, state.eos_at >= 0
