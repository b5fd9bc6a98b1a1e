"""Plain autoregressive decoding of a causal model: prefill, then one token per pass.

Prefill and the KV-cached decode loop are one `jax.jit` call with a
`lax.while_loop`; a batch of ragged prompts decodes together, each row at its
own position, stopping at its first eos. The loop is built from steps over
per-row state (`empty`, `refill`, `step`, `run`, `outputs`), which continuous
batching (`continuous.py`) drives with refills.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from apd_jax.models.cache import KVCache
from apd_jax.decoding import continuous
from apd_jax.decoding.continuous import Slots, default_group
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, check_config, prepare
from apd_jax.models.model import Transformer
from apd_jax.decoding.sampling import Knobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class ARConfig(DecoderConfig):
    """Plain autoregressive decoding: only the settings every decoder has."""

    what = "AR"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What fixes the compiled AR program's shapes."""

    prompt_len: int  # padded prompt length
    max_new: int  # the largest budget of a row


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ARState:
    """Per-row state of S slots; a free slot is a done row."""

    out: jax.Array  # [S, max_new]: generated tokens
    start: jax.Array  # [S]: prompt length
    n: jax.Array  # [S]: tokens generated per row
    budget: jax.Array  # [S]: the row's max_new_tokens
    done: jax.Array  # [S] bool
    token: jax.Array  # [S]: the last token of each row, the next pass's input
    cache: KVCache
    keys: jax.Array  # [S] typed PRNG keys, one per row
    knobs: Knobs  # [S] each
    eos: jax.Array  # [E]
    steps: jax.Array  # scalar: passes run, for the result and occupancy only
    committed: jax.Array  # scalar: rows that committed a token, summed over the passes (occupancy)


def _split_rows(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def empty(model: Transformer, spec: Spec, slots: int, eos: jax.Array) -> ARState:
    """S free slots (done rows), their cache allocated."""
    zeros = jnp.zeros((slots,), jnp.int32)
    return ARState(
        out=jnp.zeros((slots, spec.max_new), jnp.int32), start=zeros, n=zeros + 1, budget=zeros + 1,
        done=jnp.ones((slots,), bool), token=zeros,
        cache=KVCache.zeros(model.cfg, slots, spec.prompt_len + spec.max_new),
        keys=jax.random.split(jax.random.key(0), slots), knobs=Knobs(jnp.zeros((slots,)), jnp.ones((slots,)), zeros),
        eos=eos, steps=jnp.int32(0), committed=jnp.int32(0),
    )


def refill(model: Transformer, state: ARState, slots: jax.Array, ids: jax.Array, lengths: jax.Array, budgets: jax.Array,
           knobs: Knobs, keys: jax.Array) -> ARState:
    """Slots `slots` [G] take new prompts ids [G, P] (lengths [G]) with their budgets, knobs and keys (a slot
    index >= S is padding, dropped): the prompts are prefilled and each row's first token sampled."""
    put = lambda buf, new: buf.at[slots].set(new, mode="drop")  # noqa: E731
    g, p = ids.shape
    hidden, part = model(ids, valid=lengths, cache=KVCache.zeros(model.cfg, g, p))
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    keys, noise = _split_rows(keys)
    token = knobs.sample(model.logits(last), noise)
    return dataclasses.replace(
        state, out=put(state.out, jnp.zeros((g, state.out.shape[1]), jnp.int32).at[:, 0].set(token)),
        start=put(state.start, lengths), n=put(state.n, jnp.ones((g,), jnp.int32)), budget=put(state.budget, budgets),
        done=put(state.done, jnp.isin(token, state.eos) | (budgets == 1)), token=put(state.token, token),
        cache=state.cache.put_rows(slots, part), keys=put(state.keys, keys),
        knobs=jax.tree.map(put, state.knobs, knobs),
    )


def step(model: Transformer, state: ARState) -> ARState:
    """One token for every active row."""
    b, max_new = state.out.shape
    n, done = state.n, state.done
    hidden, cache = model(state.token[:, None], start=state.start + n - 1, valid=jnp.ones_like(n), cache=state.cache)
    keys, noise = _split_rows(state.keys)
    nxt = jnp.where(done, state.token, state.knobs.sample(model.logits(hidden[:, 0]), noise))
    out = state.out.at[jnp.arange(b), jnp.where(done, max_new, n)].set(nxt, mode="drop")
    n_new = jnp.where(done, n, n + 1)
    return dataclasses.replace(
        state, out=out, n=n_new, done=done | jnp.isin(nxt, state.eos) | (n_new >= state.budget), token=nxt,
        cache=cache, keys=keys, steps=state.steps + 1, committed=state.committed + jnp.sum(~done),
    )


def run(model: Transformer, state: ARState, until: jax.Array) -> ARState:
    """Step until at least `until` rows (free slots included) are done, or every row is."""

    def cond(state: ARState) -> jax.Array:
        return jnp.any(~state.done) & (jnp.sum(state.done) < until)

    return jax.lax.while_loop(cond, lambda s: step(model, s), state)


def outputs(state: ARState) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Each row's tokens, length, tokens per pass (ones: the prefill's token is its first pass) and eos flag."""
    out, n = state.out, state.n
    eos_hit = jnp.isin(jnp.take_along_axis(out, (n - 1)[:, None], axis=1)[:, 0], state.eos)
    accepted = (jnp.arange(out.shape[1]) < n[:, None]).astype(jnp.int32)
    return out, n, accepted, eos_hit


@functools.partial(jax.jit, static_argnames=("graph", "spec"))
def _decode(graph, params, prompts, prompt_lens, budgets, eos, knobs: Knobs, keys, spec: Spec):
    model = nnx.merge(graph, params)
    b = prompts.shape[0]
    state = refill(model, empty(model, spec, b, eos), jnp.arange(b), prompts, prompt_lens, budgets, knobs, keys)
    state = run(model, state, jnp.int32(b))
    return *outputs(state), jnp.max(state.n)


def _check_causal(model: Transformer) -> None:
    if not model.cfg.causal:
        raise ValueError("autoregressive decoding needs a causal (Qwen2) model; Dream models use the diffusion decoders")


def ar_generate(
    model: Transformer, prompts: Sequence[Sequence[int]], config: ARConfig = ARConfig(), key: jax.Array | None = None
) -> GenerationResult:
    """Decode a batch of ragged prompts with a causal model, one token per pass, in one compiled call;
    more than continuous.MAX_ROWS prompts go through that many slots (`continuous.large_call`: the same
    outputs, in the memory of MAX_ROWS rows)."""
    config = check_config(config, ARConfig)
    _check_causal(model)
    batch = prepare(config, prompts, key, model.cfg)
    slotted = continuous.large_call(batch, lambda rows, size: ar_slots(model, rows, config, size))
    if slotted is not None:
        return slotted
    graph, params = nnx.split(model)
    b = len(batch.lengths)
    outputs = _decode(graph, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths),
                      jnp.full((b,), config.max_new_tokens, jnp.int32), batch.eos, Knobs.of(config).rows(b), batch.keys,
                      Spec(batch.ids.shape[1], config.max_new_tokens))
    return batch.finish(*outputs)


@functools.partial(jax.jit, static_argnames=("graph", "spec", "size"))
def _slots_empty(graph, params, eos, spec: Spec, size: int) -> ARState:
    return empty(nnx.merge(graph, params), spec, size, eos)


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("state",))
def _slots_refill(graph, params, state, slots, ids, lengths, budgets, knobs, keys) -> ARState:
    return refill(nnx.merge(graph, params), state, slots, ids, lengths, budgets, knobs, keys)


@functools.partial(jax.jit, static_argnames=("graph",), donate_argnames=("state",))
def _generate_slots(graph, params, state, until) -> ARState:
    return run(nnx.merge(graph, params), state, until)


@jax.jit
def _slots_read(state: ARState):
    return *outputs(state), state.done


def ar_slots(model: Transformer, prompts: Sequence[Sequence[int]], config: ARConfig = ARConfig(), size: int = 32,
             group: int | None = None) -> Slots:
    """AR's compiled steps over `size` slots for continuous batching (`continuous.decode`), shaped for
    `prompts` (every prompt checked; padded to their longest's bucket) and budgets up to max_new_tokens."""
    config = check_config(config, ARConfig)
    _check_causal(model)
    batch = prepare(config, prompts, None, model.cfg)
    spec = Spec(batch.ids.shape[1], config.max_new_tokens)
    graph, params = nnx.split(model)
    size = min(size, len(batch.lengths))
    group = default_group(size) if group is None else min(group, size)
    return Slots(
        size=size, group=group, prompt_len=spec.prompt_len, max_new=spec.max_new, defaults=config,
        knobs=lambda t, p, k: Knobs(jnp.asarray(t), jnp.asarray(p), jnp.asarray(k)), pad_id=batch.pad_id,
        empty=lambda: _slots_empty(graph, params, batch.eos, spec, size),
        refill=lambda state, *args: _slots_refill(graph, params, state, *args),
        run=lambda state, until: _generate_slots(graph, params, state, jnp.int32(until)),
        read=lambda state: jax.device_get(_slots_read(state)),
        counts=lambda state: (int(state.steps), int(state.committed)),
    )
