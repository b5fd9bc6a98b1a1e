"""Adaptive Parallel Decoding (Israel, Van den Broeck & Grover, NeurIPS 2025): Algorithm 1 with
the KV caching of the published code (github.com/danielmisrael/apd, dream/generation_utils.py).

Each pass, per row: the drafter (Dream) runs the window [left, right) on its cache, right =
min(t + M, L), left = t_prev - W + 1 (0 at first), and drafts positions t .. right - 1; the
verifier (Qwen) scores the draft; the prefix of k >= 1 tokens agreeing with a sample of the
mixture R * logits_D + (1 - R) * logits_AR is accepted; t += k, until the first eos or L.

One `jax.jit` call per generation (fixed-shape windows and caches, a `lax.while_loop` over
`apd_steps.step`, the pass of per-row state that continuous batching shares);
`apd_eager.apd_generate_eager` is the same algorithm as a Python loop over one row, for reading and tests.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from apd_jax.decoding import apd_steps as steps
from apd_jax.decoding.apd_rule import APDConfig, APDKnobs, shared_vocab_size
from apd_jax.decoding.apd_steps import Spec, _Level
from apd_jax.decoding import continuous
from apd_jax.decoding.continuous import Slots, default_group
from apd_jax.decoding.generation import GenerationResult, InputTypeError, capacity, check_config, prepare, resolve_eos
from apd_jax.decoding.generation import row_keys
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.models.sharding import replicate, shard_rows


@functools.partial(jax.jit, static_argnames=("graphs", "spec", "mesh"))
def _generate(
    graphs, params, prompts: jax.Array, prompt_lens: jax.Array, budgets: jax.Array, eos: jax.Array, knobs: APDKnobs,
    keys: jax.Array, spec: Spec, mesh: Mesh | None,
):
    """One fixed batch: every row in its own slot from the start, stepped until all are done."""
    drafter = nnx.merge(graphs[0], params[0])
    verifier = None if spec.fixed_k else nnx.merge(graphs[1], params[1])
    b = prompts.shape[0]
    state = steps.empty(spec, drafter.cfg, None if verifier is None else verifier.cfg, b, eos, mesh)
    state = steps.refill(verifier, state, jnp.arange(b), prompts, prompt_lens, budgets, knobs, keys, spec)
    state = steps.run(drafter, verifier, state, spec, until=jnp.int32(b))
    return replicate((*steps.outputs(state, spec), state.steps), mesh)


def _spec(config: APDConfig, prompt_len: int, vocab: int, mask_id: int, fixed_k: int, live: bool = False) -> Spec:
    """The compiled program's shapes for prompts padded to `prompt_len` and budgets up to max_new_tokens."""
    total = prompt_len + config.max_new_tokens
    # Only what the compiled loop reads: a fixed M ignores M_scale / M_margin, so they must not recompile it.
    lookahead = (APDConfig(M=config.M) if config.M_min is None else
                 APDConfig(M=config.M, M_min=config.M_min, M_scale=config.M_scale, M_margin=config.M_margin))
    return Spec(W=config.W, lookahead=lookahead, levels=_levels(config, prompt_len, total), prompt_len=prompt_len,
                max_new=config.max_new_tokens, total=total, vocab=vocab, mask_id=mask_id, rule=config.rule,
                fixed_k=fixed_k, live=live)


def _run(
    drafter, verifier, prompts, config: APDConfig, key, vocab: int, fixed_k: int,
    mesh: Mesh | None = None, live: bool = False,
):
    batch = prepare(config, prompts, key, *(m.cfg for m in (drafter, verifier) if m is not None), vocab=vocab)
    if mesh is None and not live:
        slotted = continuous.large_call(
            batch, lambda rows, size: _slots(drafter, verifier, rows, config, size, None, vocab, fixed_k))
        if slotted is not None:
            return slotted
    b = len(batch.lengths)
    spec = _spec(config, batch.ids.shape[1], vocab, drafter.cfg.mask_token_id, fixed_k, live)
    budgets = np.full((b,), config.max_new_tokens, np.int32)
    # On a mesh the rows go over `data`; params carry their own shardings (sharding.shard_model).
    inputs = ((jnp.asarray(batch.ids), jnp.asarray(batch.lengths), jnp.asarray(budgets)) if mesh is None
              else shard_rows(mesh, batch.ids, batch.lengths, budgets))
    graphs, params = zip(*(nnx.split(m) for m in (drafter, verifier) if m is not None))
    outputs = _generate(graphs, params, *inputs, batch.eos, APDKnobs.of(config).rows(b), batch.keys, spec, mesh)
    return batch.finish(*outputs)


def _models(graphs, params, spec: Spec) -> tuple[Transformer, Transformer | None]:
    drafter = nnx.merge(graphs[0], params[0])
    return drafter, None if spec.fixed_k else nnx.merge(graphs[1], params[1])


@functools.partial(jax.jit, static_argnames=("graphs", "spec", "size"))
def _slots_empty(graphs, params, eos: jax.Array, spec: Spec, size: int) -> steps.APDState:
    drafter, verifier = _models(graphs, params, spec)
    return steps.empty(spec, drafter.cfg, None if verifier is None else verifier.cfg, size, eos)


@functools.partial(jax.jit, static_argnames=("graphs", "spec"), donate_argnames=("state",))
def _slots_refill(graphs, params, state, slots, ids, lengths, budgets, knobs, keys, spec: Spec) -> steps.APDState:
    return steps.refill(_models(graphs, params, spec)[1], state, slots, ids, lengths, budgets, knobs, keys, spec)


@functools.partial(jax.jit, static_argnames=("graphs", "spec"), donate_argnames=("state",))
def _generate_slots(graphs, params, state, until, spec: Spec) -> steps.APDState:
    return steps.run(*_models(graphs, params, spec), state, spec, until)


@functools.partial(jax.jit, static_argnames=("spec",))
def _slots_read(state: steps.APDState, spec: Spec):
    return *steps.outputs(state, spec), state.done


def _slots(drafter, verifier, prompts, config: APDConfig, size: int, group: int | None, vocab: int,
           fixed_k: int) -> Slots:
    models = [m for m in (drafter, verifier) if m is not None]
    batch = prepare(config, prompts, None, *(m.cfg for m in models), vocab=vocab)
    spec = _spec(config, batch.ids.shape[1], vocab, drafter.cfg.mask_token_id, fixed_k)
    graphs, params = zip(*(nnx.split(m) for m in models))
    size = min(size, len(batch.lengths))
    group = default_group(size) if group is None else min(group, size)

    def knobs(temperature, top_p, top_k) -> APDKnobs:
        return APDKnobs(jnp.asarray(temperature), jnp.asarray(top_p), jnp.asarray(top_k),
                        jnp.full(temperature.shape, config.R, jnp.float32))

    return Slots(
        size=size, group=group, prompt_len=spec.prompt_len, max_new=spec.max_new, defaults=config,
        knobs=knobs, pad_id=batch.pad_id,
        empty=lambda: _slots_empty(graphs, params, batch.eos, spec, size),
        refill=lambda state, *args: _slots_refill(graphs, params, state, *args, spec),
        run=lambda state, until: _generate_slots(graphs, params, state, jnp.int32(until), spec),
        read=lambda state: jax.device_get(_slots_read(state, spec)),
        counts=lambda state: (int(state.steps), int(state.committed)),
    )


def apd_slots(drafter: Transformer, verifier: Transformer, prompts: Sequence[Sequence[int]], config: APDConfig = APDConfig(),
              size: int = 32, group: int | None = None, *, shared_vocab: int | None = None) -> Slots:
    """APD's compiled steps over `size` slots for continuous batching (`continuous.decode`), shaped for
    `prompts` (every prompt checked; padded to their longest's bucket) and budgets up to max_new_tokens.
    A refilled row starts at lookahead M, so with adaptive lookahead the pass holding its first pass runs
    the top level (the other rows still draft only their own lookahead: padding, not other tokens)."""
    config = check_config(config, APDConfig)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg) if shared_vocab is None else _checked_shared_vocab(
        shared_vocab, drafter.cfg, verifier.cfg)
    return _slots(drafter, verifier, prompts, config, size, group, vocab, fixed_k=0)


def leftright_slots(drafter: Transformer, prompts: Sequence[Sequence[int]], config: LeftRightConfig, size: int = 32,
                    group: int | None = None) -> Slots:
    """Left-to-right K's compiled steps over `size` slots for continuous batching (as `apd_slots`)."""
    config = check_config(config, LeftRightConfig)
    if drafter.cfg.causal:
        raise ValueError("left-to-right K decoding needs a bidirectional (Dream) drafter")
    return _slots(drafter, None, prompts, config, size, group, drafter.cfg.vocab_size, fixed_k=config.K)


def apd_generate(
    drafter: Transformer,
    verifier: Transformer,
    prompts: Sequence[Sequence[int]],
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
    *,
    shared_vocab: int | None = None,
    mesh: Mesh | None = None,
    live: bool = False,
) -> GenerationResult:
    """Generate for a batch of ragged prompts (lists of token ids) in one compiled call; more than
    continuous.MAX_ROWS prompts go through that many slots (`continuous.large_call`: the same outputs),
    so a call of thousands of prompts needs the memory of MAX_ROWS rows.

    With a mesh (models placed by sharding.shard_model), rows split over its `data` axis, whose
    size must divide the batch. live=True reports each pass to `live_view`'s listener.
    """
    config = check_config(config, APDConfig)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg) if shared_vocab is None else _checked_shared_vocab(
        shared_vocab, drafter.cfg, verifier.cfg)
    return _run(drafter, verifier, prompts, config, key, vocab, fixed_k=0, mesh=mesh, live=live)


def _checked_shared_vocab(shared_vocab: int, drafter: ModelConfig, verifier: ModelConfig) -> int:
    """A shared vocabulary size given to apd_generate: an int no larger than either model's vocabulary."""
    if not isinstance(shared_vocab, numbers.Integral) or isinstance(shared_vocab, bool):
        raise InputTypeError(f"shared_vocab={shared_vocab!r} must be an int: "
                             "pass shared_vocab_size(drafter.cfg, verifier.cfg), or None to compute it")
    if not 1 <= shared_vocab <= min(drafter.vocab_size, verifier.vocab_size):
        raise ValueError(f"shared_vocab={shared_vocab} must lie in [1, {min(drafter.vocab_size, verifier.vocab_size)}] "
                         f"(drafter vocabulary {drafter.vocab_size}, verifier {verifier.vocab_size}): pass "
                         "shared_vocab_size(drafter.cfg, verifier.cfg), or None to compute it")
    return int(shared_vocab)


@dataclasses.dataclass(frozen=True)
class APDCore:
    """APD over arrays, to call inside a user's own `jax.jit` (an RL step generating with the current
    params): `core(params, ids, lengths, key)` with the models' state as an argument, so new params of the
    same shapes reuse the compiled program. Built by `apd_core`, which checks the settings and models once.

    params: (drafter state, verifier state) as `nnx.split` gives them (`apd_core` returns the current ones).
    ids [B, prompt_len] int32, right-padded; lengths [B] (1 <= length <= prompt_len; ids in the shared
    vocabulary, never the mask: not checked inside jit). key: one typed PRNG key; row b draws its noise
    from fold_in(key, b), as `apd_generate` does. Each per-row setting ([B] arrays, or None for the
    settings' value): budgets (max new tokens, <= max_new_tokens), temperature, top_p, top_k.
    Returns (tokens [B, max_new_tokens], lengths [B], accepted [B, max_new_tokens] per pass, stopped at eos [B]),
    and with `apd_core(..., logprobs=True)` also each generated token's log-probability under the verifier
    [B, max_new_tokens] (over the shared vocabulary; what an RL objective scores).
    """

    graphs: tuple
    spec: Spec
    eos: tuple[int, ...]
    config: APDConfig

    def __call__(self, params, ids: jax.Array, lengths: jax.Array, key: jax.Array, *, budgets: jax.Array | None = None,
                 temperature: jax.Array | None = None, top_p: jax.Array | None = None,
                 top_k: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        drafter, verifier = _models(self.graphs, params, self.spec)
        b = ids.shape[0]
        row = lambda value, default, dtype: jnp.broadcast_to(  # noqa: E731
            jnp.asarray(default if value is None else value, dtype), (b,))
        c = self.config
        knobs = APDKnobs(row(temperature, c.temperature, jnp.float32), row(top_p, c.top_p, jnp.float32),
                         row(top_k, c.top_k, jnp.int32), row(None, c.R, jnp.float32))
        eos = jnp.asarray(self.eos, jnp.int32).reshape(-1)
        state = steps.empty(self.spec, drafter.cfg, None if verifier is None else verifier.cfg, b, eos)
        state = steps.refill(verifier, state, jnp.arange(b), ids.astype(jnp.int32), lengths.astype(jnp.int32),
                             row(budgets, self.spec.max_new, jnp.int32), knobs, row_keys(key, jnp.arange(b)), self.spec)
        state = steps.run(drafter, verifier, state, self.spec, jnp.int32(b))
        return (*steps.outputs(state, self.spec), *((state.logprob,) if self.spec.logprobs else ()))


def apd_core(drafter: Transformer, verifier: Transformer, config: APDConfig, prompt_len: int, *,
             shared_vocab: int | None = None, logprobs: bool = False) -> tuple[APDCore, tuple]:
    """(APDCore for prompts padded to `prompt_len`, the models' current params): settings, models and shapes
    checked here, once, outside jit."""
    config = check_config(config, APDConfig)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg) if shared_vocab is None else _checked_shared_vocab(
        shared_vocab, drafter.cfg, verifier.cfg)
    room = capacity(config.max_len, drafter.cfg, verifier.cfg)
    if not isinstance(prompt_len, int) or prompt_len < 1 or prompt_len + config.max_new_tokens > room:
        raise ValueError(f"prompt_len={prompt_len!r} must be an int >= 1 with prompt_len + max_new_tokens "
                         f"({config.max_new_tokens}) <= the capacity {room}")
    graphs, params = zip(*(nnx.split(m) for m in (drafter, verifier)))
    eos = resolve_eos(config.eos_token_ids, drafter.cfg, vocab)
    spec = dataclasses.replace(_spec(config, prompt_len, vocab, drafter.cfg.mask_token_id, 0), logprobs=logprobs)
    return APDCore(graphs, spec, eos, config), params


@dataclasses.dataclass(frozen=True)
class LeftRightConfig(APDConfig):
    """K: tokens committed per pass, left to right, with APD's W/M caching and no verifier (R and rule unused)."""

    K: int = 1
    what = "left-to-right"

    def problems(self) -> list[str]:
        return super().problems() + ([f"K={self.K} must be >= 1 (tokens committed per pass)"] if self.K < 1 else [])


def leftright_generate(
    drafter: Transformer,
    prompts: Sequence[Sequence[int]],
    K: int,
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Left-to-right K tokens per pass (the paper's "Dream K=k" baseline): APD's loop and W/M caching
    with acceptance fixed to K and no verifier. R and the rule are unused. More than
    continuous.MAX_ROWS prompts go through that many slots, as in `apd_generate`."""
    config = check_config(config, APDConfig)
    config = LeftRightConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(APDConfig)}, K=K)
    config.validate()
    if drafter.cfg.causal:
        raise ValueError("left-to-right K decoding needs a bidirectional (Dream) drafter")
    return _run(drafter, None, prompts, config, key, drafter.cfg.vocab_size, fixed_k=K)


def _levels(config: APDConfig, prompt_len: int, total: int) -> tuple[_Level, ...]:
    """The compiled draft widths with their drafter window sizes (one drafter program per pair).

    The top level keeps the fixed M's window sizes. A row of the lower level (width mid) accepted
    at most `_most_accepted` tokens last pass, so one window W - 1 + that + mid serves it; a row
    whose window is wider takes the top level (`_level_index`).
    """
    widths = config.lookahead_levels()
    windows = _window_sizes(config.W, widths[-1], prompt_len + config.M, total)
    if len(widths) == 1:
        return (_Level(widths[-1], windows),)
    mid, top = widths
    lookahead = np.asarray(config.next_lookahead(jnp.arange(top + 1, dtype=jnp.int32)))
    most = _most_accepted(lookahead, mid)  # k_min - 1
    return _Level(mid, (min(config.W - 1 + most + mid, total),)), _Level(top, windows)


def _most_accepted(lookahead: np.ndarray, width: int) -> int:
    """The largest k whose next lookahead (lookahead[k], non-decreasing in k) is at most `width`; 0 if none."""
    return max(int(np.sum(lookahead <= width)) - 1, 0)


def _window_sizes(W: int, draft: int, first: int, total: int) -> tuple[int, ...]:
    """Compiled sizes of the drafter window [left, right): W - 1 + k_prev + draft after the first
    pass (padded prompt + M). A few sizes, each pass taking the smallest that fits its rows, as
    padding to the worst case nearly doubles the drafter's work when few tokens are accepted."""
    largest = min(max(W - 1 + 2 * draft, first), total)
    return tuple(sorted({min(W - 1 + draft + slack, largest) for slack in (8, 32)} | {largest}))
