"""Adaptive Parallel Decoding (Israel, Van den Broeck & Grover, NeurIPS 2025): Algorithm 1 with
the KV caching of the published code (github.com/danielmisrael/apd, dream/generation_utils.py).

Each pass, per row: the drafter (Dream) runs the window [left, right) on its cache, right =
min(t + M, L), left = t_prev - W + 1 (0 at first), and drafts positions t .. right - 1; the
verifier (Qwen) scores the draft; the prefix of k >= 1 tokens agreeing with a sample of the
mixture R * logits_D + (1 - R) * logits_AR is accepted; t += k, until the first eos or L.

One `jax.jit` call per generation (fixed-shape windows and caches, a `lax.while_loop`);
`apd_generate_eager` is the same algorithm as a Python loop over one row, for reading and tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import Mesh

from apd_jax.models.cache import KVCache
from apd_jax.models.config import ModelConfig
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, capacity, check_config, check_prompts, default_key
from apd_jax.decoding.generation import InputTypeError, finish, pad_id, pad_prompts, prompt_bucket, resolve_eos
from apd_jax.models.model import Qwen2, shift_right
from apd_jax.decoding.sampling import Knobs, exclude_token
from apd_jax.models.sharding import constrain_cache, replicate, shard_rows

RULES = ("paper", "reference")


@dataclasses.dataclass(frozen=True)
class APDConfig(DecoderConfig):
    """APD's knobs (and DecoderConfig's). R and the sampling knobs are traced; W, M,
    max_new_tokens and the lookahead settings are static (a change recompiles).

    R: the mixture's weight on the drafter. W: the drafter recomputes K/V for the last
    W - 1 + k accepted tokens. M: masked positions past t drafted each pass. rule: "paper"
    accepts where the draft equals a mixture sample drawn with the draft's own noise;
    "reference" compares with the mixture's argmax, as the published code (same at T = 0).

    Adaptive lookahead (beyond the paper, on when M_min is set): after accepting k, a row looks
    ahead clip(ceil(M_scale * k) + M_margin, M_min, M), so the drafter's work follows acceptance.
    """

    R: float = 0.7
    W: int = 16
    M: int = 100
    rule: str = "paper"
    M_min: int | None = None
    M_scale: float = 2.0
    M_margin: int = 4

    what = "APD"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0.0 <= self.R <= 1.0:
            problems.append(f"R={self.R} must lie in [0, 1] (1 accepts every draft token, 0 trusts only the verifier)")
        if self.W < 1:
            problems.append(f"W={self.W} must be >= 1 (tokens whose drafter K/V are recomputed each pass)")
        if self.M < 1:
            problems.append(f"M={self.M} must be >= 1 (masked positions the drafter sees past t)")
        if self.rule not in RULES:
            problems.append(f"rule={self.rule!r} must be one of {RULES}")
        if self.M_min is not None and not 1 <= self.M_min <= self.M:
            problems.append(f"M_min={self.M_min} must lie in [1, M={self.M}] (the smallest adaptive lookahead)")
        if self.M_scale <= 0 or self.M_margin < 0:
            problems.append(f"M_scale={self.M_scale} must be > 0 and M_margin={self.M_margin} >= 0 (adaptive "
                            "lookahead: clip(ceil(M_scale * k) + M_margin, M_min, M))")
        return problems

    def lookahead_levels(self) -> tuple[int, ...]:
        """The compiled draft widths: top = min(M, max_new_tokens) alone when fixed (or M_min > top / 2),
        else (round(sqrt(M_min * top)), top), so either pads at most about sqrt(top / M_min) times. A
        pass takes the narrowest holding its widest row. Two, as each width is two more programs to
        compile (BENCHMARKS.md, the two-level ladder)."""
        top = min(self.M, self.max_new_tokens)
        if self.M_min is None or 2 * self.M_min > top:
            return (top,)
        return (round(math.sqrt(self.M_min * top)), top)  # mid <= top / sqrt(2) < top, as 2 * M_min <= top

    def next_lookahead(self, k):
        """A row's lookahead after a pass that accepted k tokens (M when the lookahead is fixed)."""
        if self.M_min is None:
            return jnp.full_like(k, self.M)
        return jnp.clip(jnp.ceil(self.M_scale * k).astype(k.dtype) + self.M_margin, self.M_min, self.M)


def shared_vocab_size(
    drafter: ModelConfig,
    verifier: ModelConfig,
    drafter_tokenizer: Any = None,
    verifier_tokenizer: Any = None,
) -> int:
    """The ids both models can score (Dream's head is wider than Qwen2.5-0.5B's for one tokenizer);
    given tokenizers, they must agree and the drafter's ids fit the verifier's vocabulary."""
    if drafter.causal:
        raise ValueError("the drafter must be a bidirectional (Dream, model_type 'Dream') model")
    if not verifier.causal:
        raise ValueError("the verifier must be a causal (Qwen2, model_type 'qwen2') model")
    shared = min(drafter.vocab_size, verifier.vocab_size)
    if drafter_tokenizer is not None and verifier_tokenizer is not None:
        d_vocab, v_vocab = drafter_tokenizer.get_vocab(), verifier_tokenizer.get_vocab()
        clash = [t for t, i in v_vocab.items() if t in d_vocab and d_vocab[t] != i]
        if clash:
            raise ValueError(
                f"drafter and verifier tokenizers disagree on {len(clash)} tokens (e.g. {clash[:3]}): "
                "APD needs one tokenizer for both models"
            )
        real = max(d_vocab.values()) + 1
        if real > verifier.vocab_size:
            raise ValueError(
                f"the drafter's tokenizer has ids up to {real - 1}, beyond the verifier's vocabulary of "
                f"{verifier.vocab_size}: drafts could hold ids the verifier cannot score; use a verifier "
                "trained on the drafter's tokenizer"
            )
    if drafter.mask_token_id is None or not 0 <= drafter.mask_token_id < drafter.vocab_size:
        raise ValueError(f"drafter mask_token_id {drafter.mask_token_id} is not an id of its vocabulary")
    return shared


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
    eos_ids: tuple[int, ...]
    rule: str
    fixed_k: int = 0  # > 0: accept exactly min(fixed_k, drafted) per pass, no verifier (left-to-right K)
    live: bool = False  # report each pass's accepted tokens to the host as it happens (see `live_view`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class APDKnobs(Knobs):
    """The sampling knobs and the mixture weight R, traced."""

    R: jax.Array


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
    accepted: jax.Array  # [B, max_new]
    passes: jax.Array  # scalar
    dcache: KVCache
    vcache: KVCache
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("mask_id",))
def draft_tokens(logits_d: jax.Array, key: jax.Array, knobs: Knobs, mask_id: int) -> jax.Array:
    """Sample the draft [B, n] from the drafter's logits [B, n, V]; never the mask token."""
    return knobs.sample(logits_d, key, exclude=mask_id)


@functools.partial(jax.jit, static_argnames=("rule", "mask_id"))
def accepted_length(
    draft: jax.Array,
    logits_d: jax.Array,
    logits_v: jax.Array,
    n: jax.Array,
    key: jax.Array,
    knobs: APDKnobs,
    rule: str,
    mask_id: int,
) -> jax.Array:
    """k [B] in [1, n]: the draft prefix agreeing with the mixture. logits_v[:, j] predicts draft
    position j; position 0 is always accepted. The paper rule samples the mixture with the draft's
    noise (same `key`), the reference rule takes its argmax."""
    mixture = knobs.R * logits_d + (1.0 - knobs.R) * logits_v
    if rule == "paper":
        target = knobs.sample(mixture, key, exclude=mask_id)
    else:
        target = jnp.argmax(exclude_token(mixture, mask_id), axis=-1).astype(jnp.int32)
    j = jnp.arange(draft.shape[1])
    match = ((draft == target) | (j == 0)) & (j < n[:, None])
    return jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)


def _draft_logits(drafter: Qwen2, hidden: jax.Array, start: jax.Array, t: jax.Array, draft: int,
                  spec: _Static) -> jax.Array:
    """Drafter logits for positions t .. t + draft - 1, read from a window starting at `start`."""
    hidden = shift_right(hidden)
    idx = jnp.clip(t[:, None] - start[:, None] + jnp.arange(draft), 0, hidden.shape[1] - 1)
    picked = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)
    return drafter.logits(picked, vocab=spec.vocab)


def _verifier_predictions(verifier: Qwen2, hidden: jax.Array, vocab: int) -> jax.Array:
    """[B, n, vocab]: the verifier's prediction for each draft position j, its output j - 1; zeros
    at position 0, always accepted (the reference carries a logit over from the last pass)."""
    b, n, _ = hidden.shape
    placeholder = jnp.zeros((b, 1, vocab), jnp.float32)
    return jnp.concatenate([placeholder, verifier.logits(hidden[:, : n - 1], vocab=vocab)], axis=1)


def right_edge(t, M, limit):
    """The drafter window's end, right = min(t + M, L): M masked positions past t, never past L."""
    return jnp.minimum(t + M, limit)


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
        logits_v = _verifier_predictions(verifier, hidden, spec.vocab)
        k = accepted_length(draft, logits_d, logits_v, n, noise_key, knobs, spec.rule, spec.mask_id)
    k = jnp.where(active, k, 0)

    take = j < k[:, None]
    pos = jnp.where(take, state.t[:, None] + j, spec.total)  # out of range: dropped
    tokens = state.tokens.at[jnp.arange(b)[:, None], pos].set(draft, mode="drop")
    is_eos = jnp.isin(draft, jnp.asarray(spec.eos_ids, jnp.int32)) & take
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
    graphs, params, prompts: jax.Array, prompt_lens: jax.Array, knobs: APDKnobs, key, spec: _Static, mesh: Mesh | None
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
        eos_at=jnp.full((b,), -1, jnp.int32), accepted=jnp.zeros((b, spec.max_new), jnp.int32),
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
    key = default_key(key)
    rows = check_prompts(prompts, vocab)
    room = capacity(config.max_len, *(m.cfg for m in (drafter, verifier) if m is not None))
    prompt_len = prompt_bucket(max(map(len, rows)), config.max_new_tokens, room)
    eos = resolve_eos(config.eos_token_ids, drafter.cfg, vocab)
    total = prompt_len + config.max_new_tokens
    levels = _levels(config, prompt_len, total)
    # Only what the compiled loop reads: a fixed M ignores M_scale / M_margin, so they must not recompile it.
    lookahead = (APDConfig(M=config.M) if config.M_min is None else
                 APDConfig(M=config.M, M_min=config.M_min, M_scale=config.M_scale, M_margin=config.M_margin))
    spec = _Static(
        W=config.W, lookahead=lookahead, levels=levels, prompt_len=prompt_len, max_new=config.max_new_tokens,
        total=total, vocab=vocab, mask_id=drafter.cfg.mask_token_id, eos_ids=eos, rule=config.rule,
        fixed_k=fixed_k, live=live,
    )
    padded, lengths = pad_prompts(rows, prompt_len)
    # On a mesh the rows go over `data`; params carry their own shardings (sharding.shard_model).
    inputs = (jnp.asarray(padded), jnp.asarray(lengths)) if mesh is None else shard_rows(mesh, padded, lengths)
    graphs, params = zip(*(nnx.split(m) for m in (drafter, verifier) if m is not None))
    outputs = _generate(graphs, params, *inputs, APDKnobs.of(config), key, spec, mesh)
    return finish(*outputs, pad_id=pad_id(drafter.cfg, eos))


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


@nnx.jit
def _window_forward(model: Qwen2, tokens: jax.Array, start: jax.Array, cache: KVCache):
    return model(tokens, start=start, cache=cache)


def apd_generate_eager(
    drafter: Qwen2,
    verifier: Qwen2,
    prompt: Sequence[int],
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
    on_pass: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], list[int]]:
    """The same algorithm as a Python loop over one row with exact-size windows, step by step as the
    published loop. Returns (generated ids through the first eos, tokens accepted per pass);
    `on_pass` receives each pass's accepted tokens."""
    config = check_config(config, APDConfig)
    key = default_key(key)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg)
    prompt = check_prompts([prompt], vocab)[0]
    eos = resolve_eos(config.eos_token_ids, drafter.cfg, vocab)
    mask_id = drafter.cfg.mask_token_id
    knobs = APDKnobs.of(config)
    length = len(prompt) + config.max_new_tokens
    x = prompt + [mask_id] * config.max_new_tokens
    dcache = KVCache.zeros(drafter.cfg, 1, length)
    vcache = KVCache.zeros(verifier.cfg, 1, length)
    t, counts, first, lookahead = len(prompt), [], True, config.M
    while t < length:
        right = int(right_edge(t, lookahead, length))
        left = 0 if first else max(t - config.W - counts[-1] + 1, 0)
        dcache = dcache.crop(jnp.array([left]))
        hidden, dcache = _window_forward(drafter, jnp.array([x[left:right]]), jnp.array([left]), dcache)
        logits_d = drafter.logits(shift_right(hidden)[:, t - left :], vocab=vocab)
        key, noise_key = jax.random.split(key)
        draft = draft_tokens(logits_d, noise_key, knobs, mask_id)
        v_start = 0 if first else t
        v_in = jnp.array([x[:t]]) if first else jnp.zeros((1, 0), jnp.int32)
        hidden, vcache = _window_forward(verifier, jnp.concatenate([v_in, draft], 1), jnp.array([v_start]), vcache)
        logits_v = _verifier_predictions(verifier, hidden[:, t - v_start :], vocab)
        n = jnp.array([right - t])
        k = int(accepted_length(draft, logits_d, logits_v, n, noise_key, knobs, config.rule, mask_id)[0])
        draft = np.asarray(draft)[0].tolist()
        x[t : t + k] = draft[:k]
        vcache = vcache.crop(jnp.array([t + k]))
        counts.append(k)
        first, lookahead = False, int(config.next_lookahead(jnp.int32(k)))
        hits = [i for i in range(t, t + k) if x[i] in eos]
        if on_pass is not None:
            on_pass(x[t : hits[0] + 1] if hits else x[t : t + k])
        t += k
        if hits:
            return x[len(prompt) : hits[0] + 1], counts
    return x[len(prompt) :], counts
