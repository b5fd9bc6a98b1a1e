"""Fast-dLLM's Dream decoding (NVlabs/Fast-dLLM dream/model/generation_utils_block.py `_sample`) as a
rule of the block decoder (blocks.loop), with its prefix or dual KV cache (blocks.cached).

The answer is cut into blocks of block_length, decoded left to right. A block's first pass (the
cache refresh) commits only the block's first position. Its later passes commit, among the block's
masked positions, either (threshold set) every prediction of probability >= threshold and at least
the most confident, or (threshold None) Dream's schedule over steps / blocks passes with the
entropy confidence: at the block's pass i >= 1, int(masks * (1 - s / t)) of the most confident
(t, s: linspace(1, eps, steps / blocks + 1)[i, i + 1]), every mask at its last pass. Predictions are
Dream's sample_tokens (decoding.diffusion.predict) with top_k 50 by default, as the published code
builds its settings from the model config. The mask token is not excluded (a position predicting it
stays masked), as published.

The published code decodes one row (its threshold branch reads row 0, its schedule averages the
mask count over the batch); here each row of a ragged batch decodes as it would alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.blocks.cached import cache_problems
from apd_jax.decoding.blocks.loop import BlockSteps, Commit, View, block_emptied, decode_blocks
from apd_jax.decoding.blocks.slots import block_slots
from apd_jax.decoding.diffusion import ALGORITHMS, dream_transfer, dream_transfer_ratios, most_confident, predict
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, check_config
from apd_jax.decoding.sampling import Knobs
from apd_jax.models.model import Transformer

_ENTROPY = ALGORITHMS.index("entropy")


@dataclasses.dataclass(frozen=True)
class DreamBlockConfig(BlockSteps, DecoderConfig):
    """Fast-dLLM's Dream `diffusion_generate` settings: steps in all (None: max_new_tokens), a
    multiple of the number of blocks; block_length (None: one block); threshold (None: the step
    schedule); eps, the schedule's last timestep; cache: "dual" (Fast-dLLM's dual_cache), "prefix",
    or "none" (every pass over the whole canvas, no published counterpart). All traced but
    max_new_tokens, steps, block_length and the cache."""

    steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    eps: float = 1e-3
    cache: str = "dual"
    top_k: int = dataclasses.field(default=50, kw_only=True)

    what = "Fast-dLLM Dream decoding"

    def problems(self) -> list[str]:
        problems = super().problems() + cache_problems(self.cache) + self.step_problems()
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold={self.threshold} must lie in (0, 1] (None: the step schedule)")
        if not 0.0 < self.eps < 1.0:
            problems.append(f"eps={self.eps} must lie in (0, 1) (the last timestep of linspace(1, eps))")
        return problems

    @property
    def pass_bound(self) -> int:
        """The most passes `dream_block_generate` runs a row: one per position with a threshold (each
        pass commits at least one), else its steps."""
        return self.max_new_tokens if self.threshold is not None else self.step_count

    def block_rule(self, model: Transformer) -> DreamBlockRule:
        """The rule of these settings (it reads nothing of `model`)."""
        return DreamBlockRule(self)


class DreamBlockRule(nnx.Module):
    """A pass of Fast-dLLM's Dream block decoding (the module docstring); every setting is a traced
    variable but the schedule's length."""

    commits_block_start_first = True  # what lets the loop run a shifted family on a cache window
    reads_positions_in_block = True  # a pass may show it the blocks alone (blocks.loop view_size)

    def __init__(self, config: DreamBlockConfig):
        block_steps = config.step_count // config.num_blocks
        ratios = np.ones(config.step_count, np.float32)  # past the block's steps: every mask (unused)
        ratios[:block_steps] = dream_transfer_ratios(block_steps, config.eps)
        self.sampling = nnx.Variable(Knobs.of(config))
        self.ratios = nnx.Variable(jnp.asarray(ratios))
        self.block_steps = nnx.Variable(jnp.int32(block_steps))
        # Above 1: the schedule (no probability reaches it).
        self.threshold = nnx.Variable(jnp.float32(2.0 if config.threshold is None else config.threshold))

    def __call__(self, logits: jax.Array, key: jax.Array, view: View) -> Commit:
        token_key, transfer_key = jax.random.split(key)
        pred = predict(logits, token_key, self.sampling.get_value())
        masked, step, threshold = view.candidates, view.step, self.threshold[...]
        first = masked & (jnp.arange(masked.shape[1]) == view.block_start[:, None])
        confident = masked & ((pred.confidence >= threshold) | most_confident(pred.confidence, masked))
        scheduled = dream_transfer(pred, masked, self.ratios[...][step], jnp.int32(_ENTROPY), jnp.float32(0.0),
                                   transfer_key)
        later = jnp.where(threshold <= 1.0, confident, scheduled)
        transfer = jnp.where((step == 0)[:, None], first, later)
        done = block_emptied(view, transfer, view.limit) | ((threshold > 1.0) & (step + 1 >= self.block_steps[...]))
        return Commit(pred.tokens, transfer, done, view.limit)


def dream_block_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: DreamBlockConfig = DreamBlockConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Fast-dLLM's Dream block decoding of a batch of ragged prompts (each row as if alone), one
    compiled call, with its prefix or dual KV cache. More than continuous.MAX_ROWS prompts decode
    through that many slots (blocks.slots), in the memory of MAX_ROWS rows: at temperature 0 the
    fixed batch's outputs up to float rounding (decode_blocks)."""
    config = check_config(config, DreamBlockConfig)
    result, _ = decode_blocks(model, config.block_rule(model), prompts, config, key, block_length=config.block_size,
                              bound=config.pass_bound, cache=config.cache,
                              slots_of=lambda rows, size: block_slots(model, rows, config, size))
    return result
