"""LLaDA's own decoding: the published `generate` (ML-GSAI/LLaDA generate.py) as a rule of the
block decoder (blocks.loop): the answer in blocks left to right, each block over steps / blocks
passes, each pass committing a precomputed count of the block's masks, the most confident
predictions (probability of the argmax) or random ones; a Gumbel-max sample at temperature > 0;
classifier-free guidance, logits_eos_inf and confidence_eos_eot_inf as published.

Numerics: confidences are float32 softmax probabilities, as the published code's are for a float32
model (its float64 is the Gumbel branch only); tied confidences go to the lower position (torch's
topk leaves their order unspecified). The Gumbel noise is -log of a uniform drawn from 64 random
bits, in float32 arithmetic, so its tails reach as far as the published float64 draw's (a float32
uniform would cut them at 15.9: exponential_from_bits). confidence_eos_eot_inf gives eos and eot
predictions confidence 0 at every temperature (the published code does so at temperature 0; above
it, its chained assignment reaches only eot's).

Batches: each row is right-padded and decodes as the published code on that row alone (the
published code's own left-padded batches shift RoPE positions). A row stops once every position
before its first eos (the stop ids, eos_token_ids) is committed: a committed token never changes,
so that is the published (filled) answer up to that eos; its tokens are counted through the eos
and its passes until then. eos_token_ids=() runs every step and fills the answer, as published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.blocks.cached import cache_problems
from apd_jax.decoding.blocks.loop import BlockSteps, Commit, View, decode_blocks, descending_rank
from apd_jax.decoding.blocks.slots import block_slots
from apd_jax.decoding.generation import DecoderConfig, GenerationResult, check_config
from apd_jax.models.model import Transformer

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class LLaDAConfig(BlockSteps, DecoderConfig):
    """The published LLaDA `generate`'s settings (gen_length is max_new_tokens), all traced but
    max_new_tokens, steps and whether cfg_scale > 0.

    steps: passes in all (None: max_new_tokens), steps / (max_new_tokens / block_length) per block,
    each committing a precomputed count of the block's masks. block_length None: one block. None
    stays None, so a copy with another max_new_tokens (dataclasses.replace) follows it.
    remasking: which masked positions a step commits: the most confident predictions
    ("low_confidence") or random ones. cfg_scale > 0: classifier-free guidance against the prompt
    fully masked (two rows per row). logits_eos_inf: never predict eos_id;
    confidence_eos_eot_inf: a prediction of eos_id or eot_id has confidence 0 (committed last).
    eos_id and eot_id are the ids the published code hard-codes (LLaDA-8B's <|endoftext|> and
    <|eot_id|>); they are not the stop ids (eos_token_ids).
    cache: "none", or Fast-dLLM's "prefix" or "dual" KV cache (blocks.cached; its
    generate_with_prefix_cache and generate_with_dual_cache), without guidance.
    """

    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_id: int = 126081
    eot_id: int = 126348
    cache: str = "none"

    what = "LLaDA"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.top_p != 1.0 or self.top_k != 0:
            problems.append(f"top_p={self.top_p}, top_k={self.top_k}: LLaDA's generate samples from the whole "
                            "vocabulary; leave top_p 1 and top_k 0")
        problems += self.step_problems()
        if self.remasking not in REMASKING:
            problems.append(f"remasking={self.remasking!r}: use one of {REMASKING}")
        if self.cfg_scale < 0:
            problems.append(f"cfg_scale={self.cfg_scale} must be >= 0 (0 disables guidance)")
        problems += cache_problems(self.cache)
        if self.cache != "none" and self.cfg_scale > 0:
            problems.append(f"cache={self.cache!r} runs without guidance (as Fast-dLLM's cached samplers): use "
                            "cfg_scale=0 or cache='none'")
        if self.eos_id < 0 or self.eot_id < 0:
            problems.append(f"eos_id={self.eos_id} and eot_id={self.eot_id} must be token ids (>= 0)")
        return problems

    @property
    def pass_bound(self) -> int:
        """The most passes `llada_generate` runs a row: its steps."""
        return self.step_count

    def block_rule(self, model: Transformer) -> LLaDARule:
        """The rule of these settings on `model`, whose vocabulary must hold the eos and eot ids they read."""
        check_llada_ids(model, self)
        return LLaDARule(self)


def transfer_counts(block_length: int, steps: int) -> np.ndarray:
    """[steps] int32: tokens each step of a block commits, the published `get_num_transfer_tokens` for
    a block of `block_length` masks: block_length // steps each, the first block_length % steps one more."""
    counts = np.full(steps, block_length // steps, np.int32)
    counts[: block_length % steps] += 1
    return counts


# Noise


def exponential_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """-log(u) in float32 for u = 1 - (hi * 2^32 + lo + 1/2) / 2^64, uniform on a 2^-64 grid: the
    small values come from v = 1 - u and the large from u, each formed with its own relative
    precision, so both tails reach as far as float64's (-log of a 53-bit uniform lies in
    [1e-16, 36.7]; here [3e-20, 45.1]), where a float32 uniform (JAX's, on a 2^-23 grid) stops at
    [1.2e-7, 15.9]."""

    def fraction(h: jax.Array, l: jax.Array) -> jax.Array:
        return h.astype(jnp.float32) * 2.0**-32 + (l.astype(jnp.float32) + 0.5) * 2.0**-64

    v, u = fraction(hi, lo), fraction(~hi, ~lo)  # v + u == 1 exactly in the reals
    return jnp.where(v < 0.5, -jnp.log1p(-v), -jnp.log(u))


def exponential64(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Exp(1) noise, float32, with float64's range (exponential_from_bits of 64 random bits)."""
    bits = jax.random.bits(key, (2, *shape), jnp.uint32)
    return exponential_from_bits(bits[0], bits[1])


def gumbel_max(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
    """A sample of softmax(logits / temperature) over the last axis: the published
    argmax(exp(logits) / E^temperature) with E ~ Exp(1), as argmax(logits - temperature * log E)."""
    return jnp.argmax(logits - temperature * jnp.log(exponential64(key, logits.shape)), axis=-1)


# The step


def _without(logits: jax.Array, ids: jax.Array, banned: jax.Array) -> jax.Array:
    """`logits` with each id in `ids` [K] whose `banned` [K] flag is set at -inf."""
    hit = jnp.any((jnp.arange(logits.shape[-1])[:, None] == ids) & banned, axis=-1)
    return jnp.where(hit, -jnp.inf, logits)


class LLaDARule(nnx.Module):
    """The published LLaDA step: predict every position (argmax, or a Gumbel-max sample at
    temperature > 0), then commit the counts[step] candidates of highest confidence (the predicted
    token's probability, ties to the lower position) or random ones; a block is done after
    block_steps steps. Every setting is a traced variable but the number of steps."""

    reads_positions_in_block = True  # a pass may show it the blocks alone (blocks.loop view_size)

    def __init__(self, config: LLaDAConfig):
        # Sized by all the steps, not a block's, so settings of equal steps share one compiled program.
        block_steps = config.step_count // config.num_blocks
        counts = np.zeros(config.step_count, np.int32)
        counts[:block_steps] = transfer_counts(config.block_size, block_steps)
        self.counts = nnx.Variable(jnp.asarray(counts))
        self.block_steps = nnx.Variable(jnp.int32(block_steps))
        self.temperature = nnx.Variable(jnp.float32(config.temperature))
        self.random = nnx.Variable(jnp.bool_(config.remasking == "random"))
        self.ids = nnx.Variable(jnp.asarray([config.eos_id, config.eot_id], jnp.int32))
        # The ids at -inf in the logits predicted from, and on top of those in the confidences' softmax.
        self.banned_logits = nnx.Variable(jnp.asarray([config.logits_eos_inf, False]))
        self.banned_confidence = nnx.Variable(jnp.asarray([config.confidence_eos_eot_inf] * 2))

    def __call__(self, logits: jax.Array, key: jax.Array, view: View) -> Commit:
        token_key, order_key = jax.random.split(key)
        t = self.temperature[...]
        logits = _without(logits, self.ids[...], self.banned_logits[...])
        tokens = jax.lax.cond(t > 0, lambda: gumbel_max(logits, t, token_key), lambda: jnp.argmax(logits, -1))
        probs = jax.nn.softmax(_without(logits, self.ids[...], self.banned_confidence[...]), axis=-1)
        confidence = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
        score = jnp.where(self.random[...], jax.random.uniform(order_key, confidence.shape), confidence)
        count = self.counts[...][view.step]
        rank = descending_rank(jnp.where(view.candidates, score, -jnp.inf))
        transfer = view.candidates & (rank < count[:, None])
        return Commit(tokens.astype(jnp.int32), transfer, view.step + 1 == self.block_steps[...], view.limit)


def check_llada_ids(model: Transformer, config: LLaDAConfig) -> None:
    """The eos and eot ids the settings read (logits_eos_inf, confidence_eos_eot_inf) within the model's vocabulary."""
    vocab = model.cfg.vocab_size
    if (config.logits_eos_inf or config.confidence_eos_eot_inf) and max(config.eos_id, config.eot_id) >= vocab:
        raise ValueError(f"eos_id={config.eos_id} or eot_id={config.eot_id} lies outside the model's vocabulary "
                         f"[0, {vocab}): give the model's own ids (its tokenizer's eos and <|eot_id|>)")


def llada_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: LLaDAConfig = LLaDAConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """The published LLaDA `generate` for a batch of ragged prompts (each row as if alone), one
    compiled call: semi-autoregressive blocks, a fixed count of tokens per step. A row returns its
    tokens through its first eos (eos_token_ids) once all before it are committed. More than
    continuous.MAX_ROWS prompts decode through that many slots (blocks.slots), in the memory of
    MAX_ROWS rows: where no noise is drawn (temperature 0, low-confidence remasking) the fixed batch's
    outputs up to float rounding (decode_blocks)."""
    config = check_config(config, LLaDAConfig)
    result, _ = decode_blocks(model, config.block_rule(model), prompts, config, key, block_length=config.block_size,
                              bound=config.pass_bound, cfg_scale=config.cfg_scale, cache=config.cache,
                              slots_of=lambda rows, size: block_slots(model, rows, config, size))
    return result
