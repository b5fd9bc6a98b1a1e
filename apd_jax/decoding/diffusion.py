"""Whole-canvas decoders of a Dream model: Dream's own sampler, and parallel decoding by a keep rule.

Full attention over prompt + max_new_tokens masks (no cache: every position can change every
prediction), one `jax.jit` call with a `lax.while_loop` over passes. Ragged rows are batched
through the model's `valid` length, so each decodes exactly as alone; a row stops once nothing
before its first eos is masked.

- `diffusion_generate`: Dream's `_sample`, its transfer counts per row (Dream at batch size 1).
- `threshold_generate`: each pass commits every masked position above a threshold, and at least
  the most confident (Fast-dLLM's rule, block-free); `parallel_decode` takes the keep rule as an
  `nnx.Module`, so Learn2PD's filter runs in the same loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.generation import Batch, DecoderConfig, GenerationResult, check_config, prepare
from apd_jax.models.model import Qwen2
from apd_jax.decoding.sampling import Knobs, exclude_token, filter_logits, gumbel_argmax, gumbel_noise
from apd_jax.utils.shapes import pow2_bucket

# Index order is the traced `alg` switch; the first three select a confidence.
ALGORITHMS = ("maskgit_plus", "topk_margin", "entropy", "origin")
_ORIGIN = ALGORITHMS.index("origin")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(DecoderConfig):
    """Dream's `diffusion_generate` knobs (and DecoderConfig's), all traced but max_new_tokens
    (`steps` sets only a power-of-two bucket of the schedule). alg_temp > 0 samples the positions
    to unmask from softmax(confidence / alg_temp) instead of taking the top-k.

    top_k=50 is what Dream's published code runs with (DreamGenerationConfig.from_model_config
    copies transformers 4.x's legacy default) and applies at temperature 0 too: the confidences come from probabilities
    renormalised over the top 50. top_k=0 reads them from the whole vocabulary.
    """

    steps: int | None = None  # None: max_new_tokens, one token per step (set at construction)
    alg: str = "entropy"
    alg_temp: float = 0.0
    eps: float = 1e-3
    top_k: int = dataclasses.field(default=50, kw_only=True)

    what = "diffusion"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is None:
            object.__setattr__(self, "steps", self.max_new_tokens)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if self.alg not in ALGORITHMS:
            problems.append(f"alg={self.alg!r} is not a Dream algorithm; use one of {ALGORITHMS}")
        if not 0.0 < self.eps < 1.0:
            problems.append(f"eps={self.eps} must lie in (0, 1) (the last timestep of linspace(1, eps))")
        if self.alg_temp < 0:
            problems.append(f"alg_temp={self.alg_temp} must be >= 0 (0 takes the top-k positions)")
        return problems


@dataclasses.dataclass(frozen=True)
class ParallelConfig(DecoderConfig):
    """Knobs of the parallel decoders (threshold, Learn2PD), all traced but max_new_tokens.
    eot_threshold: once a masked position predicts an eos above it, that eos is committed and
    every later position dropped (padding, hidden from attention); None disables it."""

    eot_threshold: float | None = None

    what = "parallel decoding"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.eot_threshold is not None and not 0.0 <= self.eot_threshold < 1.0:
            problems.append(f"eot_threshold={self.eot_threshold} must lie in [0, 1) (None disables it)")
        return problems


@dataclasses.dataclass(frozen=True)
class ThresholdConfig(ParallelConfig):
    """threshold in (0, 1]: commit predictions with probability above it (1.0: one token per pass)."""

    threshold: float = 0.9

    what = "threshold decoding"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must lie in (0, 1] (1 commits one token per pass)")
        return problems


# Dream's schedule, bit for bit


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """torch.linspace(1, eps, steps + 1) in float32, bit for bit: torch's two half-ranges are each an
    FMA with a float32 step, which float64 reproduces exactly, then one rounding (float32
    arithmetic is an ulp off and moves Dream's truncated transfer counts)."""
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    step = np.float64(np.float32((end - start) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    head = step * i + np.float64(start)
    tail = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, head, tail).astype(np.float32)


def dream_transfer_ratios(steps: int, eps: float) -> np.ndarray:
    """[steps] float32: Dream's 1 - s / t, and 1 on the last step (transfer all)."""
    ts = dream_timesteps(steps, eps)
    ratios = np.float32(1.0) - ts[1:] / ts[:-1]
    ratios[-1] = 1.0
    return ratios.astype(np.float32)


# Pure per-pass pieces


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's prediction for every generated position, [B, N] each (Dream's three confidences)."""

    tokens: jax.Array  # predicted (greedy or sampled) token
    confidence: jax.Array  # its probability
    margin: jax.Array  # top-1 minus top-2 probability
    neg_entropy: jax.Array  # sum p log(p + 1e-10), <= 0


def build_canvas(prompts: jax.Array, prompt_lens: jax.Array, gen: jax.Array) -> jax.Array:
    """[B, P + N]: each row's prompt followed directly by its generation `gen` [B, N]."""
    b, p = prompts.shape
    n = gen.shape[1]
    canvas = jnp.concatenate([prompts, jnp.zeros((b, n), prompts.dtype)], axis=1)
    idx = prompt_lens[:, None] + jnp.arange(n)
    return canvas.at[jnp.arange(b)[:, None], idx].set(gen)


def generation_logits(model: Qwen2, canvas: jax.Array, prompt_lens: jax.Array, end: jax.Array, n: int) -> jax.Array:
    """Float32 logits [B, N, V] for each row's N generated positions, attending up to `end` [B]."""
    hidden, _ = model(canvas, valid=end)
    hidden = model.aligned(hidden)
    idx = prompt_lens[:, None] + jnp.arange(n)
    return model.logits(jnp.take_along_axis(hidden, idx[:, :, None], axis=1))


def predict(logits: jax.Array, key: jax.Array, knobs: Knobs) -> Prediction:
    """Dream's `sample_tokens` on [..., V] logits: temperature, top-p, top-k, then the argmax (T = 0)
    or a Gumbel-max sample, with confidences from the same probabilities."""
    t = knobs.temperature
    scaled = jnp.where(t > 0, logits / jnp.where(t > 0, t, 1.0), logits)
    filtered = filter_logits(scaled, knobs.top_p, knobs.top_k)
    probs = jax.nn.softmax(filtered, axis=-1)
    best = jnp.argmax(probs, axis=-1)
    tokens = jax.lax.cond(
        t > 0, lambda: gumbel_argmax(filtered, key), lambda: best
    ).astype(jnp.int32)
    # The second probability by a max, not lax.top_k (slow on XLA:CPU); a tie gives margin 0, as top_k.
    second = jnp.max(jnp.where(jnp.arange(probs.shape[-1]) == best[..., None], -jnp.inf, probs), axis=-1)
    return Prediction(
        tokens=tokens,
        confidence=jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0],
        margin=jnp.max(probs, axis=-1) - second,
        neg_entropy=jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1),
    )


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


def dream_transfer(
    pred: Prediction, masked: jax.Array, ratio: jax.Array, alg: jax.Array, alg_temp: jax.Array, key: jax.Array
) -> jax.Array:
    """[B, N] bool: the masked positions Dream's step unmasks, per row: the int(num_mask * ratio)
    highest confidences (Gumbel top-k with alg_temp > 0), or for origin each with probability ratio."""
    rank_key, origin_key = jax.random.split(key)
    count = (jnp.sum(masked, axis=1).astype(jnp.float32) * ratio).astype(jnp.int32)
    confidence = jnp.stack([pred.confidence, pred.margin, pred.neg_entropy])[jnp.minimum(alg, 2)]
    noisy = confidence / jnp.where(alg_temp > 0, alg_temp, 1.0) + gumbel_noise(rank_key, confidence.shape)
    score = jnp.where(masked, jnp.where(alg_temp > 0, noisy, confidence), -jnp.inf)
    by_rank = masked & (descending_rank(score) < count[:, None])
    by_chance = masked & (jax.random.uniform(origin_key, masked.shape) < ratio)
    return jnp.where(alg == _ORIGIN, by_chance, by_rank)


# Dream's fixed-step sampler


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DreamKnobs:
    sampling: Knobs
    steps: jax.Array
    ratios: jax.Array  # [bucket] float32 (dream_transfer_ratios, zero-padded)
    alg: jax.Array
    alg_temp: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CanvasState:
    """The loop state of the whole-canvas decoders."""

    passes: jax.Array  # scalar: passes run
    gen: jax.Array  # [B, N]: the generated positions, masks where not decoded yet
    accepted: jax.Array  # [B, passes bound]: tokens committed per row and pass
    key: jax.Array

    @classmethod
    def start(cls, b: int, n: int, bound: int, mask_id: int, key: jax.Array) -> CanvasState:
        """Every position masked, nothing committed yet."""
        return cls(jnp.int32(0), jnp.full((b, n), mask_id, jnp.int32), jnp.zeros((b, bound), jnp.int32), key)


def canvas_outputs(state: CanvasState, eos: jax.Array):
    """(tokens, lengths, accepted, stopped at eos, passes): what `finish` takes. A row's
    length runs through its first eos, else over the whole canvas."""
    n = state.gen.shape[1]
    first_eos = first_index(jnp.isin(state.gen, eos))
    hit = first_eos < n
    return state.gen, jnp.where(hit, first_eos + 1, n), state.accepted, hit, state.passes


@functools.partial(jax.jit, static_argnames=("graph", "max_new", "mask_id"))
def _dream_sample(graph, params, prompts, prompt_lens, eos, knobs: _DreamKnobs, key, max_new: int, mask_id: int):
    model = nnx.merge(graph, params)
    b = prompts.shape[0]
    end = prompt_lens + max_new

    def cond(state: CanvasState) -> jax.Array:
        return (state.passes < knobs.steps) & jnp.any(~decoded(state.gen, mask_id, eos))

    def body(state: CanvasState) -> CanvasState:
        i, gen = state.passes, state.gen
        key, token_key, transfer_key = jax.random.split(state.key, 3)
        logits = generation_logits(model, build_canvas(prompts, prompt_lens, gen), prompt_lens, end, max_new)
        pred = predict(logits, token_key, knobs.sampling)
        masked = (gen == mask_id) & ~decoded(gen, mask_id, eos)[:, None]
        transfer = dream_transfer(pred, masked, knobs.ratios[i], knobs.alg, knobs.alg_temp, transfer_key)
        # As Dream, the mask token is not excluded: a position that predicts it stays masked.
        accepted = state.accepted.at[:, i].set(jnp.sum(transfer & (pred.tokens != mask_id), axis=1))
        return CanvasState(i + 1, jnp.where(transfer, pred.tokens, gen), accepted, key)

    state = CanvasState.start(b, max_new, knobs.ratios.shape[0], mask_id, key)
    return canvas_outputs(jax.lax.while_loop(cond, body, state), eos)


def prepare_canvas(model: Qwen2, config: DecoderConfig, prompts: Sequence[Sequence[int]], key) -> Batch:
    """The shared set-up (generation.prepare) for a diffusion model (Dream, LLaDA), whose prompts may
    not hold its mask."""
    cfg = model.cfg
    if cfg.causal or cfg.mask_token_id is None:
        raise ValueError(f"diffusion decoding needs a bidirectional model (Dream or LLaDA) with a mask token, "
                         f"not a {cfg.model_type} model")
    return prepare(config, prompts, key, cfg, mask_id=cfg.mask_token_id)


def diffusion_generate(
    model: Qwen2,
    prompts: Sequence[Sequence[int]],
    config: DiffusionConfig = DiffusionConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Dream's `diffusion_generate` (its `_sample`) for a batch of ragged prompts, one compiled call;
    `accepted[b, i]` counts the positions step i unmasked (one predicting the mask stays masked)."""
    config = check_config(config, DiffusionConfig)
    batch = prepare_canvas(model, config, prompts, key)
    ratios = np.zeros(pow2_bucket(config.steps), np.float32)
    ratios[: config.steps] = dream_transfer_ratios(config.steps, config.eps)
    knobs = _DreamKnobs(
        Knobs.of(config), jnp.int32(config.steps), jnp.asarray(ratios),
        jnp.int32(ALGORITHMS.index(config.alg)), jnp.float32(config.alg_temp),
    )
    graph, params = nnx.split(model)
    gen, lens, accepted, hit, passes = _dream_sample(
        graph, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), batch.eos, knobs, batch.key,
        config.max_new_tokens, model.cfg.mask_token_id,
    )
    return batch.finish(gen, lens, np.asarray(accepted)[:, : config.steps], hit, passes)


# Parallel decoding with a keep rule (threshold here, Learn2PD's filter elsewhere)


class ConfidenceRule(nnx.Module):
    """Keep predictions whose probability exceeds `threshold` (a traced variable)."""

    def __init__(self, threshold: float):
        self.threshold = nnx.Variable(jnp.float32(threshold))

    def __call__(self, pred: Prediction, masked: jax.Array) -> jax.Array:
        return pred.confidence > self.threshold[...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ParallelKnobs:
    sampling: Knobs
    eot_threshold: jax.Array  # > 1 disables End-of-Text prediction


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ParallelState(CanvasState):
    limit: jax.Array  # [B]: positions a row still decodes (End-of-Text lowers it)


@functools.partial(jax.jit, static_argnames=("graphs", "max_new", "mask_id", "pad_id"))
def _parallel(graphs, params, prompts, prompt_lens, eos, knobs: _ParallelKnobs, key, max_new: int, mask_id: int,
              pad_id: int):
    model, rule = nnx.merge(graphs[0], params[0]), nnx.merge(graphs[1], params[1])
    b = prompts.shape[0]
    j = jnp.arange(max_new)

    def cond(state: _ParallelState) -> jax.Array:
        return (state.passes < max_new) & jnp.any(~decoded(state.gen, mask_id, eos))

    def body(state: _ParallelState) -> _ParallelState:
        i, gen, limit = state.passes, state.gen, state.limit
        key, token_key = jax.random.split(state.key)
        canvas = build_canvas(prompts, prompt_lens, gen)
        logits = generation_logits(model, canvas, prompt_lens, prompt_lens + limit, max_new)
        pred = predict(exclude_token(logits, mask_id), token_key, knobs.sampling)
        # Positions past a row's limit hold padding, never the mask.
        masked = (gen == mask_id) & ~decoded(gen, mask_id, eos)[:, None]
        keep = masked & (rule(pred, masked) | most_confident(pred.confidence, masked))
        new = jnp.where(keep, pred.tokens, gen)
        # End-of-Text: commit the first confident eos and drop everything after it.
        eot = masked & jnp.isin(pred.tokens, eos) & (pred.confidence > knobs.eot_threshold)
        at = first_index(eot)
        new = jnp.where(j == at[:, None], pred.tokens, new)
        limit = jnp.minimum(limit, at + 1)
        new = jnp.where(j < limit[:, None], new, pad_id)
        committed = (gen == mask_id) & (new != mask_id) & (j < limit[:, None])
        accepted = state.accepted.at[:, i].set(jnp.sum(committed, axis=1))
        return _ParallelState(i + 1, new, accepted, key, limit)

    start = CanvasState.start(b, max_new, max_new, mask_id, key)
    state = _ParallelState(**vars(start), limit=jnp.full((b,), max_new, jnp.int32))
    return canvas_outputs(jax.lax.while_loop(cond, body, state), eos)


def parallel_decode(
    model: Qwen2,
    rule: nnx.Module,
    prompts: Sequence[Sequence[int]],
    config: ParallelConfig,
    key: jax.Array | None = None,
) -> GenerationResult:
    """Decode the whole canvas in passes, each committing the masked positions `rule(prediction,
    masked) -> bool [B, N]` keeps, and the most confident one whatever it says (so at most
    max_new_tokens passes). The rule's variables are traced; the mask is never predicted."""
    config = check_config(config, ParallelConfig)
    batch = prepare_canvas(model, config, prompts, key)
    knobs = _ParallelKnobs(Knobs.of(config), jnp.float32(2.0 if config.eot_threshold is None else config.eot_threshold))
    graphs, params = zip(nnx.split(model), nnx.split(rule))
    outputs = _parallel(
        graphs, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), batch.eos, knobs, batch.key,
        config.max_new_tokens, model.cfg.mask_token_id, batch.pad_id,
    )
    return batch.finish(*outputs)


def threshold_generate(
    model: Qwen2,
    prompts: Sequence[Sequence[int]],
    config: ThresholdConfig = ThresholdConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Confidence-threshold parallel decoding over the whole canvas (block-free); threshold 1.0 is
    one token per pass, most confident first (Dream maskgit_plus at one token a step)."""
    config = check_config(config, ThresholdConfig)
    return parallel_decode(model, ConfidenceRule(config.threshold), prompts, config, key)
