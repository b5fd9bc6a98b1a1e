"""Continuous batching: a generation holds S slots; when a row ends (its eos, or its own budget) its
result goes out by prompt index and the slot takes the next prompt.

The host calls a decoder's compiled loop until at least G rows are done, hands each finished row's
result to the caller, and refills free slots G at a time with one compiled `refill` (a fixed-size
group, padding entries dropped): it resets their tokens, budgets, knobs and keys and their cache rows,
and prefills their prompts; the next pass runs their first pass. Rows never see each other (each
decodes from its own state, `apd_steps`), so at temperature 0 a prompt's output equals its output
decoded alone, and its noise comes from its own key (`request_keys`), so a sampled output is the same
at any slot count, in any slot, and after a resume.

Decoders give their compiled steps as `Slots` (`apd.apd_slots`, `apd.leftright_slots`,
`autoregressive.ar_slots`, `blocks.slots.block_slots`, `learn2pd.learn2pd_slots`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.generation import Batch, GenerationResult, knob_problems, row_keys
from apd_jax.decoding.sampling import Knobs

MAX_ROWS = 256  # a decoding call of more prompts runs them through this many slots (`large_call`)


def default_group(size: int) -> int:
    """Slots refilled at once (`Slots.group`), an eighth of them: a group's prefill and first pass (for
    APD the drafter over prompt + lookahead for the whole batch; for a cached block decoder a refresh)
    are shared, and the loop returns to the host only once that many rows are done, so a larger group
    leaves more finished slots idle and a smaller one runs more first passes (BENCHMARKS.md weighs the
    two for APD)."""
    return max(1, size // 8)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to decode: its ids, its index in the run (results carry it; its noise key is
    fold_in(run key, index) unless it gives a seed) and its own settings (None: the run's)."""

    ids: Sequence[int]
    index: int
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """A finished row: its prompt's index, its generated ids (through its first eos), its tokens
    committed per pass and whether it stopped at an eos."""

    index: int
    ids: list[int]
    accepted: list[int]
    stopped_at_eos: bool


@dataclasses.dataclass(frozen=True)
class Slots:
    """A decoder's compiled steps over `size` slots, for `decode`.

    `empty()` makes the free slots; `refill(state, slots [group], ids [group, prompt_len], lengths,
    budgets, knobs, keys)` fills slots (an index >= size is padding); `run(state, until)` steps until at
    least `until` rows are done; `read(state)` gives host arrays (tokens [S, max_new], lengths,
    accepted [S, max_new], stopped at eos, done) and `counts(state)` (passes run, rows that committed
    tokens summed over the passes).
    """

    size: int
    group: int
    prompt_len: int
    max_new: int  # the largest budget a request may have (the caches' static capacity)
    defaults: Any  # the run's settings (a DecoderConfig): what a request does not set
    knobs: Callable[[np.ndarray, np.ndarray, np.ndarray], Knobs]  # (temperature, top_p, top_k) [G] -> Knobs
    pad_id: int
    empty: Callable[[], Any]
    refill: Callable[..., Any]
    run: Callable[[Any, int], Any]
    read: Callable[[Any], tuple[np.ndarray, ...]]
    counts: Callable[[Any], tuple[int, int]]
    # A decoder's own limits on a request's settings (max_new_tokens, temperature, top_p, top_k) ->
    # problems, checked before the run (the block decoders': a budget in whole blocks, LLaDA's knobs).
    problems: Callable[[int, float, float, int], list[str]] | None = None


@dataclasses.dataclass
class Usage:
    """What a continuous run did: passes (loop iterations) over `slots` slots, and rows that committed
    tokens summed over the passes; occupancy = committed / (passes x slots)."""

    slots: int
    passes: int = 0
    committed: int = 0

    @property
    def occupancy(self) -> float:
        return self.committed / max(self.passes * self.slots, 1)


def setting(request: Request, name: str, defaults: Any) -> Any:
    """A request's own setting `name`, else the run's (`defaults`, a DecoderConfig)."""
    own = getattr(request, name)
    return getattr(defaults, name) if own is None else own


def request_keys(key: jax.Array, requests: Sequence[Request]) -> jax.Array:
    """Each request's typed key: jax.random.key(seed) when it gives a seed, else fold_in(key, index)."""
    keys = np.array(jax.random.key_data(row_keys(key, [r.index for r in requests])))
    for i, r in enumerate(requests):
        if r.seed is not None:
            keys[i] = np.asarray(jax.random.key_data(jax.random.key(r.seed)))
    return jax.random.wrap_key_data(jnp.asarray(keys))


def check_request(request: Request, slots: Slots, where: str) -> None:
    """A request's own settings in range, its budget within the run's capacity (`where` names it)."""
    d = slots.defaults
    s = {f: setting(request, f, d) for f in ("max_new_tokens", "temperature", "top_p", "top_k")}
    problems = knob_problems(**s)
    if s["max_new_tokens"] > slots.max_new:
        problems.append(f"max_new_tokens={s['max_new_tokens']} exceeds the run's capacity {slots.max_new} "
                        "(--max-new-tokens bounds every request's)")
    if not problems and slots.problems is not None:
        problems = slots.problems(**s)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def refill_order(requests: Sequence[Request], default_budget: int) -> list[int]:
    """The order requests take free slots: the largest budget first, ties in file order.

    Longest-first keeps the end of a run from draining through a few long rows while the other slots
    sit empty (BENCHMARKS.md measures it). It changes no output: a row decodes from its own state and key."""
    budget = [default_budget if r.max_new_tokens is None else r.max_new_tokens for r in requests]
    return sorted(range(len(requests)), key=lambda i: -budget[i])


def decode(slots: Slots, requests: Sequence[Request], key: jax.Array,
           on_finished: Callable[[list[Finished]], None], order: Sequence[int] | None = None) -> Usage:
    """Decode every request through the slots, calling `on_finished` with the rows that ended at each
    return of the compiled loop (in the order rows end, not the order of `requests`). Requests take
    free slots in `order` (indices into `requests`; None: `refill_order`)."""
    if order is None:
        order = refill_order(requests, slots.defaults.max_new_tokens)
    elif sorted(order) != list(range(len(requests))):
        raise ValueError(f"order must list each index of the {len(requests)} requests exactly once, got "
                         f"{len(order)} entries")
    queue = collections.deque(order)
    keys = request_keys(key, requests) if requests else None
    holder = [-1] * slots.size  # the request each slot decodes, -1 when free
    usage = Usage(slots.size)
    state = slots.empty()
    while True:
        free = [s for s in range(slots.size) if holder[s] < 0]
        while queue and free:
            group = [queue.popleft() for _ in range(min(slots.group, len(queue), len(free)))]
            chosen, free = free[: len(group)], free[len(group):]
            state = slots.refill(state, *_group(slots, requests, group, chosen, keys))
            for s, r in zip(chosen, group):
                holder[s] = r
        if len(free) == slots.size:
            break
        state = slots.run(state, min(len(free) + slots.group, slots.size))
        tokens, lengths, accepted, eos_hit, done = slots.read(state)
        ended = [s for s in np.flatnonzero(done) if holder[s] >= 0]
        on_finished([Finished(requests[holder[s]].index, tokens[s, : lengths[s]].tolist(),
                              accepted[s][accepted[s] > 0].tolist(), bool(eos_hit[s])) for s in ended])
        for s in ended:
            holder[s] = -1
    usage.passes, usage.committed = slots.counts(state)
    return usage


def _group(slots: Slots, requests: Sequence[Request], group: list[int], chosen: list[int], keys: jax.Array):
    """One refill's arguments, padded to the group size with copies of its first request into slot S (dropped)."""
    pad = slots.group - len(group)
    rows = group + [group[0]] * pad
    target = np.asarray(chosen + [slots.size] * pad, np.int32)
    ids = np.zeros((slots.group, slots.prompt_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(requests[r].ids)] = requests[r].ids
    per_row = lambda name, dtype: np.asarray(  # noqa: E731
        [setting(requests[r], name, slots.defaults) for r in rows], dtype)
    lengths = np.asarray([len(requests[r].ids) for r in rows], np.int32)
    knobs = slots.knobs(per_row("temperature", np.float32), per_row("top_p", np.float32), per_row("top_k", np.int32))
    return target, ids, lengths, per_row("max_new_tokens", np.int32), knobs, keys[np.asarray(rows)]


def generate(slots: Slots, requests: Sequence[Request], key: jax.Array) -> tuple[GenerationResult, Usage]:
    """Every request decoded through the slots, as one GenerationResult in the order of `requests`
    (passes: the loop iterations of the whole run)."""
    found: dict[int, Finished] = {}
    usage = decode(slots, requests, key, lambda ended: found.update((f.index, f) for f in ended))
    n = len(requests)
    tokens = np.full((n, slots.max_new), slots.pad_id, np.int32)
    accepted = np.zeros((n, slots.max_new), np.int32)
    lengths, eos = np.zeros((n,), np.int32), np.zeros((n,), bool)
    for i, r in enumerate(requests):
        f = found[r.index]
        tokens[i, : len(f.ids)], accepted[i, : len(f.accepted)] = f.ids, f.accepted
        lengths[i], eos[i] = len(f.ids), f.stopped_at_eos
    return GenerationResult(tokens, lengths, accepted, eos, usage.passes), usage


def large_call(batch: Batch, slots_of: Callable[[list[list[int]], int], Slots]) -> GenerationResult | None:
    """A decoding call of more than MAX_ROWS prompts, decoded through MAX_ROWS slots built by
    `slots_of(prompts, size)`: its memory that of MAX_ROWS rows, `passes` the loop iterations of the
    whole run; None when the call fits one fixed batch. Where no noise is drawn its outputs are those
    of one fixed batch up to float rounding (XLA rounds some reductions by the shape of the array, so
    a near-tie between two tokens may fall the other way). A row that draws noise draws it from its
    own key (`row_keys`), as APD's and AR's fixed batches do; the block decoders' fixed batches draw
    one key per pass for the whole batch, so their sampled large calls give other samples."""
    if len(batch.lengths) <= MAX_ROWS:
        return None
    rows = batch.rows()
    return generate(slots_of(rows, MAX_ROWS), [Request(r, i) for i, r in enumerate(rows)], batch.key)[0]
