"""Adaptive Parallel Decoding (Israel, Van den Broeck & Grover, NeurIPS 2025): Algorithm 1 with
the KV caching of the published code (github.com/danielmisrael/apd, dream/generation_utils.py).

Each pass, per row: the drafter (Dream) runs the window [left, right) on its cache, right =
min(t + M, L), left = t_prev - W + 1 (0 at first), and drafts positions t .. right - 1; the
verifier (Qwen) scores the draft; the prefix of k >= 1 tokens agreeing with a sample of the
mixture R * logits_D + (1 - R) * logits_AR is accepted; t += k, until the first eos or L.

One `jax.jit` call per generation (fixed-shape windows and caches, a `lax.while_loop`);
`apd_eager.apd_generate_eager` is the same algorithm as a Python loop over one row, for reading and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh

from apd_jax.models.cache import KVCache
from apd_jax.models.config import ModelConfig
from apd_jax.decoding.apd_rule import APDConfig, APDKnobs, accepted_length, draft_tokens, right_edge, shared_vocab_size
from apd_jax.decoding.apd_rule import verifier_predictions
from apd_jax.decoding.generation import GenerationResult, InputTypeError, check_config, prepare
from apd_jax.models.model import Qwen2, shift_right
from apd_jax.models.sharding import constrain_cache, replicate, shard_rows

@dataclasses.dataclass(frozen=True)
class _Level:
    """One compiled draft width and the drafter window sizes that serve it."""

    draft: int  # masked positions drafted and scored per pass
    windows: tuple[int, ...]  # compiled drafter window sizes, ascending (see _levels)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that fixes the compiled program's shapes."""

    W: int
    lookahead: APDConfig  # the lookahead settings (M, and M_min / M_scale / M_margin when adaptive)
    levels: tuple[_Level, ...]  # ascending draft widths; one, min(M, max_new_tokens), for the fixed M
    prompt_len: int  # padded prompt length
    max_new: int
    total: int  # sequence buffer and cache length
    vocab: int  # shared vocabulary
    mask_id: int
    rule: str
    fixed_k: int = 0  # > 0: accept exactly min(fixed_k, drafted) per pass, no verifier (left-to-right K)
    live: bool = False  # report each pass's accepted tokens to the host as it happens (see `live_view`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    tokens: jax.Array  # [B, total]: prompt, accepted tokens, mask tokens
    limit: jax.Array  # [B]: L = prompt length + max_new_tokens
    t: jax.Array  # [B]: first masked position
    t_prev: jax.Array  # [B]: t before the last pass (the window's left edge follows it)
    lookahead: jax.Array  # [B]: masked positions past t the next pass drafts (M unless adaptive)
    done: jax.Array  # [B] bool
    eos_at: jax.Array  # [B]: position of the first generated eos, or -1
    eos: jax.Array  # [E]: the ids a row stops at
    accepted: jax.Array  # [B, max_new]
    passes: jax.Array  # scalar
    dcache: KVCache
    vcache: KVCache
    key: jax.Array


def _draft_logits(drafter: Qwen2, hidden: jax.Array, start: jax.Array, t: jax.Array, draft: int,
                  spec: _Static) -> jax.Array:
    """Drafter logits for positions t .. t + draft - 1, read from a window starting at `start`."""
    hidden = shift_right(hidden)
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


def _accept(
    verifier: Qwen2, state: _State, logits_d: jax.Array, right: jax.Array, knobs: APDKnobs, spec: _Static
) -> _State:
    """Draft, verify, accept and write one pass for every active row (the window ends at `right`)."""
    b = state.t.shape[0]
    j = jnp.arange(logits_d.shape[1])
    n = right - state.t  # drafted positions per row
    active = ~state.done
    key, noise_key = jax.random.split(state.key)

    draft = draft_tokens(logits_d, noise_key, knobs, spec.mask_id)
    if spec.fixed_k:
        k, vcache = jnp.minimum(spec.fixed_k, n), None
    else:
        hidden, vcache = verifier(draft, start=state.t, valid=n, cache=state.vcache)
        logits_v = verifier_predictions(verifier, hidden, spec.vocab)
        k = accepted_length(draft, logits_d, logits_v, n, noise_key, knobs, spec.rule, spec.mask_id)
    k = jnp.where(active, k, 0)

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
        done=state.done | (t >= state.limit) | (eos_at >= 0),
        eos_at=eos_at,
        accepted=state.accepted.at[:, state.passes].set(k),
        passes=state.passes + 1,
        # A rejected draft's verifier K/V are stale: crop to the accepted prefix.
        vcache=None if vcache is None else vcache.crop(t),
        key=key,
    )


def _level_index(levels: tuple[_Level, ...], width: jax.Array, window: jax.Array) -> jax.Array:
    """The first level whose draft width holds `width` and whose widest window holds `window`
    (both ascend over the levels): the smallest compiled level that every active row fits."""
    return jnp.maximum(jnp.sum(jnp.asarray([lv.draft for lv in levels]) < width),
                       jnp.sum(jnp.asarray([lv.windows[-1] for lv in levels]) < window))


def _window(tokens: jax.Array, left: jax.Array, size: int) -> jax.Array:
    idx = jnp.clip(left[:, None] + jnp.arange(size), 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("graphs", "spec", "mesh"))
def _generate(
    graphs, params, prompts: jax.Array, prompt_lens: jax.Array, eos: jax.Array, knobs: APDKnobs, key, spec: _Static,
    mesh: Mesh | None,
):
    drafter = nnx.merge(graphs[0], params[0])
    verifier = None if spec.fixed_k else nnx.merge(graphs[1], params[1])
    b = prompts.shape[0]
    tokens = jnp.full((b, spec.total), spec.mask_id, jnp.int32).at[:, : spec.prompt_len].set(prompts)
    # Padding slots of shorter prompts are masks too, so every position >= t is masked.
    tokens = jnp.where(jnp.arange(spec.total) < prompt_lens[:, None], tokens, spec.mask_id)
    limit = prompt_lens + spec.max_new

    vcache = None
    if verifier is not None:
        vcache = constrain_cache(KVCache.zeros(verifier.cfg, b, spec.total), mesh)
        _, vcache = verifier(prompts, valid=prompt_lens, cache=vcache)
    state = _State(
        tokens=tokens, limit=limit, t=prompt_lens, t_prev=prompt_lens,
        lookahead=jnp.full((b,), spec.lookahead.M, jnp.int32), done=jnp.zeros((b,), bool),
        eos_at=jnp.full((b,), -1, jnp.int32), eos=eos, accepted=jnp.zeros((b, spec.max_new), jnp.int32),
        passes=jnp.int32(0), dcache=constrain_cache(KVCache.zeros(drafter.cfg, b, spec.total), mesh),
        vcache=vcache, key=key,
    )

    def drafter_pass(state: _State, left: jax.Array, right: jax.Array, size: int,
                     draft: int) -> tuple[_State, jax.Array]:
        hidden, dcache = drafter(_window(state.tokens, left, size), start=left, valid=right - left, cache=state.dcache)
        return dataclasses.replace(state, dcache=dcache), _draft_logits(drafter, hidden, left, state.t, draft, spec)

    def level_pass(state: _State, left: jax.Array, right: jax.Array, window: jax.Array, level: _Level) -> _State:
        # The smallest compiled window of this draft width that holds every active row's [left, right).
        branch = jnp.sum(jnp.asarray(level.windows) < window)
        passes = [functools.partial(drafter_pass, size=size, draft=level.draft) for size in level.windows]
        state, logits_d = jax.lax.switch(branch, passes, state, left, right)
        return _accept(verifier, state, logits_d, right, knobs, spec)

    def cond(state: _State) -> jax.Array:
        return jnp.any(~state.done) & (state.passes < spec.max_new)

    def body(state: _State) -> _State:
        # The first pass sees the whole prompt plus M masks (left = 0, nothing cached yet).
        left = jnp.where(state.passes == 0, 0, jnp.maximum(state.t_prev - spec.W + 1, 0))
        right = right_edge(state.t, state.lookahead, state.limit)
        width = jnp.max(jnp.where(state.done, 0, right - state.t))
        window = jnp.max(jnp.where(state.done, 0, right - left))
        passes = [functools.partial(level_pass, level=lv) for lv in spec.levels]
        level = _level_index(spec.levels, width, window)
        return jax.lax.switch(level, passes, state, left, right, window)

    state = jax.lax.while_loop(cond, body, state)
    end = jnp.where(state.eos_at >= 0, state.eos_at + 1, jnp.minimum(state.t, limit))
    gen_pos = prompt_lens[:, None] + jnp.arange(spec.max_new)
    out = jnp.take_along_axis(state.tokens, jnp.clip(gen_pos, 0, spec.total - 1), axis=1)
    return replicate((out, end - prompt_lens, state.accepted, state.eos_at >= 0, state.passes), mesh)


def _run(
    drafter, verifier, prompts, config: APDConfig, key, vocab: int, fixed_k: int,
    mesh: Mesh | None = None, live: bool = False,
):
    batch = prepare(config, prompts, key, *(m.cfg for m in (drafter, verifier) if m is not None), vocab=vocab)
    prompt_len = batch.ids.shape[1]
    total = prompt_len + config.max_new_tokens
    levels = _levels(config, prompt_len, total)
    # Only what the compiled loop reads: a fixed M ignores M_scale / M_margin, so they must not recompile it.
    lookahead = (APDConfig(M=config.M) if config.M_min is None else
                 APDConfig(M=config.M, M_min=config.M_min, M_scale=config.M_scale, M_margin=config.M_margin))
    spec = _Static(
        W=config.W, lookahead=lookahead, levels=levels, prompt_len=prompt_len, max_new=config.max_new_tokens,
        total=total, vocab=vocab, mask_id=drafter.cfg.mask_token_id, rule=config.rule, fixed_k=fixed_k, live=live,
    )
    # On a mesh the rows go over `data`; params carry their own shardings (sharding.shard_model).
    inputs = ((jnp.asarray(batch.ids), jnp.asarray(batch.lengths)) if mesh is None
              else shard_rows(mesh, batch.ids, batch.lengths))
    graphs, params = zip(*(nnx.split(m) for m in (drafter, verifier) if m is not None))
    outputs = _generate(graphs, params, *inputs, batch.eos, APDKnobs.of(config), batch.key, spec, mesh)
    return batch.finish(*outputs)


def apd_generate(
    drafter: Qwen2,
    verifier: Qwen2,
    prompts: Sequence[Sequence[int]],
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
    *,
    shared_vocab: int | None = None,
    mesh: Mesh | None = None,
    live: bool = False,
) -> GenerationResult:
    """Generate for a batch of ragged prompts (lists of token ids) in one compiled call.

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
class LeftRightConfig(APDConfig):
    """K: tokens committed per pass, left to right, with APD's W/M caching and no verifier (R and rule unused)."""

    K: int = 1
    what = "left-to-right"

    def problems(self) -> list[str]:
        return super().problems() + ([f"K={self.K} must be >= 1 (tokens committed per pass)"] if self.K < 1 else [])


def leftright_generate(
    drafter: Qwen2,
    prompts: Sequence[Sequence[int]],
    K: int,
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Left-to-right K tokens per pass (the paper's "Dream K=k" baseline): APD's loop and W/M caching
    with acceptance fixed to K and no verifier. R and the rule are unused."""
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
