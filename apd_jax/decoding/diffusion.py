"""Canvas decoders of a diffusion model (Dream, LLaDA): Dream's own sampler, and parallel decoding
by a keep rule. Each is a rule of the block decoder (blocks.loop), by default with one block
spanning the answer: full attention over prompt + max_new_tokens masks, one compiled call, ragged
rows each decoded exactly as alone; a row stops once nothing before its first eos is masked.

- `diffusion_generate`: Dream's `_sample`, its transfer counts per row (Dream at batch size 1).
- `threshold_generate`: each pass commits every masked position above a threshold, and at least
  the most confident (Fast-dLLM's rule; in blocks with block_length, and with its KV cache);
  `parallel_decode` takes the keep rule as an `nnx.Module`, so Learn2PD's filter runs in the same
  loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.blocks.cached import cache_problems
from apd_jax.decoding.blocks.loop import (
    Blocks,
    Commit,
    View,
    block_emptied,
    block_problems,
    decode_blocks,
    descending_rank,
    first_index,
    most_confident,
)
from apd_jax.decoding.blocks.slots import block_slots
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, check_config
from apd_jax.models.model import Transformer
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
class ParallelConfig(Blocks, DecoderConfig):
    """Knobs of the parallel decoders (threshold, Learn2PD), all traced but max_new_tokens.
    eot_threshold: once a masked position predicts an eos above it, that eos is committed and
    every later position dropped (padding, hidden from attention); None disables it.
    block_length: decode the answer in blocks of this many positions, left to right, each pass
    committing only within the current block (semi-autoregressive, as LLaDA and Fast-dLLM decode);
    None: one block, the whole answer.
    cache: "none", or Fast-dLLM's "prefix" or "dual" KV cache (blocks.cached) on a LLaDA model: a
    block's first pass refreshes it, its later passes run a window of the canvas on it."""

    eot_threshold: float | None = None
    block_length: int | None = dataclasses.field(default=None, kw_only=True)
    cache: str = dataclasses.field(default="none", kw_only=True)

    what = "parallel decoding"

    def problems(self) -> list[str]:
        problems = super().problems() + block_problems(self.block_length, self.max_new_tokens)
        problems += cache_problems(self.cache)
        if self.eot_threshold is not None and not 0.0 <= self.eot_threshold < 1.0:
            problems.append(f"eot_threshold={self.eot_threshold} must lie in [0, 1) (None disables it)")
        return problems

    @property
    def pass_bound(self) -> int:
        """The most passes `parallel_decode` runs a row: one per position (each commits at least one)."""
        return self.max_new_tokens

    def parallel_rule(self, model: Transformer, keep: nnx.Module) -> ParallelRule:
        """Parallel decoding's rule with these settings on `model`, committing what `keep` keeps."""
        return ParallelRule(keep, self, model.cfg.mask_token_id)


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

    def block_rule(self, model: Transformer) -> ParallelRule:
        """The rule of these settings on `model`: parallel decoding keeping what exceeds the threshold."""
        return self.parallel_rule(model, ConfidenceRule(self.threshold))


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


def dream_transfer(
    pred: Prediction, masked: jax.Array, ratio: jax.Array, alg: jax.Array, alg_temp: jax.Array, key: jax.Array
) -> jax.Array:
    """[B, N] bool: the masked positions Dream's step unmasks, per row at its `ratio` [B]: the
    int(num_mask * ratio) highest confidences (Gumbel top-k with alg_temp > 0), or for origin each
    with probability ratio."""
    rank_key, origin_key = jax.random.split(key)
    count = (jnp.sum(masked, axis=1).astype(jnp.float32) * ratio).astype(jnp.int32)
    confidence = jnp.stack([pred.confidence, pred.margin, pred.neg_entropy])[jnp.minimum(alg, 2)]
    noisy = confidence / jnp.where(alg_temp > 0, alg_temp, 1.0) + gumbel_noise(rank_key, confidence.shape)
    score = jnp.where(masked, jnp.where(alg_temp > 0, noisy, confidence), -jnp.inf)
    by_rank = masked & (descending_rank(score) < count[:, None])
    by_chance = masked & (jax.random.uniform(origin_key, masked.shape) < ratio[:, None])
    return jnp.where(alg == _ORIGIN, by_chance, by_rank)


# Dream's fixed-step sampler


class DreamRule(nnx.Module):
    """Dream's `_sample` step: predict (Dream's sample_tokens; the mask is not excluded, and a
    position predicting it stays masked), then unmask as dream_transfer does at the row's step."""

    def __init__(self, config: DiffusionConfig):
        ratios = np.zeros(pow2_bucket(config.steps), np.float32)
        ratios[: config.steps] = dream_transfer_ratios(config.steps, config.eps)
        self.sampling = nnx.Variable(Knobs.of(config))
        self.steps = nnx.Variable(jnp.int32(config.steps))
        self.ratios = nnx.Variable(jnp.asarray(ratios))  # zero-padded to a bucket: steps share programs
        self.alg = nnx.Variable(jnp.int32(ALGORITHMS.index(config.alg)))
        self.alg_temp = nnx.Variable(jnp.float32(config.alg_temp))

    def __call__(self, logits: jax.Array, key: jax.Array, view: View) -> Commit:
        token_key, transfer_key = jax.random.split(key)
        pred = predict(logits, token_key, self.sampling.get_value())
        ratio = self.ratios[...][view.step]
        transfer = dream_transfer(pred, view.candidates, ratio, self.alg[...], self.alg_temp[...], transfer_key)
        return Commit(pred.tokens, transfer, view.step + 1 == self.steps[...], view.limit)


def diffusion_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: DiffusionConfig = DiffusionConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Dream's `diffusion_generate` (its `_sample`) for a batch of ragged prompts, one compiled call;
    `accepted[b, i]` counts the positions step i unmasked (one predicting the mask stays masked).
    The sampler has no slots, so more than continuous.MAX_ROWS prompts decode in fixed batches of
    that many (decode_blocks)."""
    config = check_config(config, DiffusionConfig)
    rule = DreamRule(config)
    result, _ = decode_blocks(model, rule, prompts, config, key, block_length=config.max_new_tokens,
                              bound=rule.ratios.shape[0])
    result.accepted = result.accepted[:, : config.steps]
    return result


# Parallel decoding with a keep rule (threshold here, Learn2PD's filter elsewhere)


class ConfidenceRule(nnx.Module):
    """Keep predictions whose probability exceeds `threshold` (a traced variable)."""

    def __init__(self, threshold: float):
        self.threshold = nnx.Variable(jnp.float32(threshold))

    def __call__(self, pred: Prediction, masked: jax.Array) -> jax.Array:
        return pred.confidence > self.threshold[...]


class ParallelRule(nnx.Module):
    """A pass of parallel decoding: predict (never the mask), commit the candidates `keep(prediction,
    candidates)` keeps and the most confident one whatever it says; with End-of-Text prediction,
    commit the first candidate predicting an eos above eot_threshold and drop every later position.
    The row's block is done when it has no candidate left."""

    def __init__(self, keep: nnx.Module, config: ParallelConfig, mask_id: int):
        self.keep = keep
        self.sampling = nnx.Variable(Knobs.of(config))
        # > 1 disables End-of-Text prediction.
        self.eot_threshold = nnx.Variable(jnp.float32(2.0 if config.eot_threshold is None else config.eot_threshold))
        self.mask_id = mask_id
        # The threshold reads no position, so a pass may show it the blocks alone (blocks.loop
        # view_size); Learn2PD's filter reads positions over the whole answer.
        self.reads_positions_in_block = isinstance(keep, ConfidenceRule)

    def __call__(self, logits: jax.Array, key: jax.Array, view: View) -> Commit:
        pred = predict(exclude_token(logits, self.mask_id), key, self.sampling.get_value())
        masked = view.candidates
        keep = masked & (self.keep(pred, masked) | most_confident(pred.confidence, masked))
        eot = masked & jnp.isin(pred.tokens, view.eos) & (pred.confidence > self.eot_threshold[...])
        at = first_index(eot)
        transfer = keep | (jnp.arange(masked.shape[1]) == at[:, None])
        limit = jnp.where(at < masked.shape[1], jnp.minimum(view.limit, at + 1), view.limit)
        return Commit(pred.tokens, transfer, block_emptied(view, transfer, limit), limit)


def parallel_decode(
    model: Transformer,
    rule: nnx.Module,
    prompts: Sequence[Sequence[int]],
    config: ParallelConfig,
    key: jax.Array | None = None,
) -> GenerationResult:
    """Decode the answer in passes (in blocks of config.block_length, or all at once), each
    committing the masked positions of the current block that `rule(prediction, masked) -> bool
    [B, N]` keeps, and the most confident one whatever it says (so at most max_new_tokens passes).
    The rule's variables are traced; the mask is never predicted. More than continuous.MAX_ROWS
    prompts decode through that many slots (blocks.slots, every row with this rule), in the memory
    of MAX_ROWS rows: at temperature 0 the fixed batch's outputs up to float rounding (decode_blocks)."""
    config = check_config(config, ParallelConfig)
    result, _ = decode_blocks(model, config.parallel_rule(model, rule), prompts, config, key,
                              block_length=config.block_size, bound=config.pass_bound, cache=config.cache,
                              # Every row of a large call has the call's settings, so this keep rule.
                              slots_of=lambda rows, size: block_slots(model, rows, config, size, keep=lambda _: rule))
    return result


def threshold_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: ThresholdConfig = ThresholdConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Confidence-threshold parallel decoding, over the whole canvas or in blocks, with or without
    Fast-dLLM's KV cache; threshold 1.0 is one token per pass, most confident first (Dream
    maskgit_plus at one token a step). A call of more than continuous.MAX_ROWS prompts runs
    through the slots as `parallel_decode` says."""
    config = check_config(config, ThresholdConfig)
    return parallel_decode(model, ConfidenceRule(config.threshold), prompts, config, key)
