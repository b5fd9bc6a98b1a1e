"""Learn2PD's training data: the Extremely Greedy Parallel oracle's traces (Bao et al., 2025).

Knowing the model's own final answer (its one-token-per-pass greedy output), each
pass unmasks exactly the masked positions whose current greedy prediction already
equals the answer (the most confident position, set to the answer, when none does).
Every masked position of every pass is recorded: its features (learn2pd.FEATURES) and
the oracle's keep label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.batching import padded_batches
from apd_jax.decoding.blocks.loop import (
    Commit,
    View,
    block_emptied,
    block_problems,
    block_size,
    decode_blocks,
    most_confident,
)
from apd_jax.decoding.diffusion import Prediction, ThresholdConfig, predict, threshold_generate
from apd_jax.decoding.generation import DecoderConfig
from apd_jax.decoding.learn2pd import FEATURES, pass_features
from apd_jax.decoding.sampling import Knobs, exclude_token
from apd_jax.models.config import raise_problems
from apd_jax.models.model import Transformer


@dataclasses.dataclass
class Traces:
    """One row per (prompt, pass, masked position) of oracle decoding."""

    features: np.ndarray  # [M, len(FEATURES)] float32
    labels: np.ndarray  # [M] bool: the oracle keeps this prediction (it equals the final answer)
    rows: np.ndarray  # [M] int: prompt index
    passes: np.ndarray  # [M] int: pass index

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: np.ndarray) -> "Traces":
        """The traces of the given prompt indices."""
        keep = np.isin(self.rows, rows)
        return Traces(self.features[keep], self.labels[keep], self.rows[keep], self.passes[keep])

    @staticmethod
    def concatenate(parts: Sequence["Traces"]) -> "Traces":
        return Traces(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Traces)))


def oracle_step(
    pred: Prediction, gen: jax.Array, answers: jax.Array, mask_id: int, masked: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """One Extremely Greedy Parallel pass: (the new generation [B, N], the keep labels [B, N]).

    A masked position (of `masked`, default every mask of `gen`; in blocks, the current block's)
    is kept iff its prediction equals the final answer; a row where none does unmasks its most
    confident position with the answer's token, so every pass makes progress and the oracle ends
    exactly at the answer.
    """
    masked = gen == mask_id if masked is None else masked
    match = masked & (pred.tokens == answers)
    stuck = ~jnp.any(match, axis=1, keepdims=True)
    keep = match | (stuck & most_confident(pred.confidence, masked))
    return jnp.where(keep, answers, gen), match


class OracleRule(nnx.Module):
    """The oracle as a rule of the block decoder: greedy predictions (never the mask), oracle_step's
    commits towards `answers` [B, N] among the candidates (the masks of the row's current block),
    and each pass's features, keep labels and candidates recorded in its variables ([passes, B, N,
    ...])."""

    def __init__(self, answers: jax.Array, mask_id: int, vocab: int):
        b, n = answers.shape
        self.answers = nnx.Variable(answers)
        flags = jnp.zeros((n, b, n), bool)
        self.features = nnx.Variable(jnp.zeros((n, b, n, len(FEATURES)), jnp.float32))
        self.labels = nnx.Variable(flags)
        self.recorded = nnx.Variable(flags)
        self.mask_id, self.vocab = mask_id, vocab

    def __call__(self, logits: jax.Array, key: jax.Array, view: View) -> Commit:
        pred = predict(exclude_token(logits, self.mask_id), key, Knobs.greedy())
        masked = view.candidates
        new, match = oracle_step(pred, view.gen, self.answers[...], self.mask_id, masked)
        i = view.passes
        self.features[...] = self.features[...].at[i].set(pass_features(pred, masked, self.vocab))
        self.labels[...] = self.labels[...].at[i].set(match)
        self.recorded[...] = self.recorded[...].at[i].set(masked)
        transfer = new != view.gen
        return Commit(new, transfer, block_emptied(view, transfer, view.limit), view.limit)


def oracle_traces(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    answers: np.ndarray,
    max_len: int | None = None,
    first_row: int = 0,
    *,
    block_length: int | None = None,
) -> Traces:
    """Run the Extremely Greedy Parallel oracle towards `answers` [B, N] (the final
    generations, e.g. `final_answers`) and record every masked position of every pass; with
    block_length, in blocks left to right (a pass sees and commits only its current block's
    masks), as a block decoder runs the filter."""
    answers = np.asarray(answers, np.int32)
    n = answers.shape[1] if answers.ndim == 2 else 0
    if answers.ndim != 2 or answers.shape[0] != len(prompts) or n < 1:
        raise ValueError(f"answers must be [{len(prompts)} prompts, max_new_tokens >= 1], got shape {answers.shape}")
    mask_id = model.cfg.mask_token_id
    if (answers == mask_id).any() or (answers < 0).any() or (answers >= model.cfg.vocab_size).any():
        raise ValueError(f"answers must be ids of the vocabulary [0, {model.cfg.vocab_size}) other than the mask")
    raise_problems("oracle", block_problems(block_length, n))
    config = DecoderConfig(max_new_tokens=n, max_len=max_len, eos_token_ids=())
    _, rule = decode_blocks(model, OracleRule(jnp.asarray(answers), mask_id, model.cfg.vocab_size), prompts, config,
                            None, block_length=block_size(block_length, n), bound=n)
    features, labels, recorded = (np.asarray(v[...]) for v in (rule.features, rule.labels, rule.recorded))
    passes, rows, _ = np.nonzero(recorded)
    return Traces(features[recorded], labels[recorded], rows + first_row, passes)


def final_answers(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None = None, *,
    block_length: int | None = None,
) -> np.ndarray:
    """[B, N]: the model's own greedy answer, one token per pass (the most confident), over the
    whole canvas or in blocks of block_length."""
    config = ThresholdConfig(threshold=1.0, max_new_tokens=max_new_tokens, eos_token_ids=(), max_len=max_len,
                             block_length=block_length)
    return threshold_generate(model, prompts, config).tokens


def collect_traces(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    max_len: int | None = None,
    *,
    block_length: int | None = None,
) -> Traces:
    """Final answers, then oracle traces, for prompts in batches of `batch_size` (one compiled shape),
    over the whole canvas or in blocks of block_length (for a filter that decodes in blocks)."""
    parts = []
    for idx, rows in padded_batches(prompts, batch_size):
        answers = final_answers(model, rows, max_new_tokens, max_len, block_length=block_length)
        # The rows filling up the last batch (numbered past it) are dropped.
        traces = oracle_traces(model, rows, answers, max_len, first_row=idx[0], block_length=block_length)
        parts.append(traces.select(np.asarray(idx)))
    if not parts:
        raise ValueError("no prompts given")
    return Traces.concatenate(parts)
