"""Learn2PD's training data: the Extremely Greedy Parallel oracle's traces (Bao et al., 2025).

Knowing the model's own final answer (its one-token-per-pass greedy output), each
pass unmasks exactly the masked positions whose current greedy prediction already
equals the answer (the most confident position, set to the answer, when none does).
Every masked position of every pass is recorded: its features (learn2pd.FEATURES) and
the oracle's keep label.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.diffusion import (
    Prediction,
    ThresholdConfig,
    build_canvas,
    generation_logits,
    most_confident,
    predict,
    prepare_canvas,
    threshold_generate,
)
from apd_jax.decoding.batching import padded_batches
from apd_jax.decoding.generation import DecoderConfig
from apd_jax.decoding.learn2pd import FEATURES, pass_features
from apd_jax.models.model import Qwen2
from apd_jax.decoding.sampling import Knobs, exclude_token


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


def oracle_step(pred: Prediction, gen: jax.Array, answers: jax.Array, mask_id: int) -> tuple[jax.Array, jax.Array]:
    """One Extremely Greedy Parallel pass: (the new generation [B, N], the keep labels [B, N]).

    A masked position is kept iff its prediction equals the final answer; a row
    where none does unmasks its most confident position with the answer's token,
    so every pass makes progress and the oracle ends exactly at the answer.
    """
    masked = gen == mask_id
    match = masked & (pred.tokens == answers)
    stuck = ~jnp.any(match, axis=1, keepdims=True)
    keep = match | (stuck & most_confident(pred.confidence, masked))
    return jnp.where(keep, answers, gen), match


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _OracleState:
    passes: jax.Array  # scalar
    gen: jax.Array  # [B, N]
    features: jax.Array  # [max passes, B, N, len(FEATURES)]: each pass's features
    labels: jax.Array  # [max passes, B, N] bool: the oracle keeps this prediction
    recorded: jax.Array  # [max passes, B, N] bool: the position was masked in that pass


@functools.partial(jax.jit, static_argnames=("graph", "max_new", "mask_id"))
def _oracle(graph, params, prompts, prompt_lens, answers, max_new: int, mask_id: int):
    model = nnx.merge(graph, params)
    b = prompts.shape[0]
    end = prompt_lens + max_new

    def cond(state: _OracleState) -> jax.Array:
        return (state.passes < max_new) & jnp.any(state.gen == mask_id)

    def body(state: _OracleState) -> _OracleState:
        i, gen = state.passes, state.gen
        logits = generation_logits(model, build_canvas(prompts, prompt_lens, gen), prompt_lens, end, max_new)
        pred = predict(exclude_token(logits, mask_id), jax.random.key(0), Knobs.greedy())
        masked = gen == mask_id
        new, match = oracle_step(pred, gen, answers, mask_id)
        return _OracleState(
            passes=i + 1,
            gen=new,
            features=state.features.at[i].set(pass_features(pred, masked, model.cfg.vocab_size)),
            labels=state.labels.at[i].set(match),
            recorded=state.recorded.at[i].set(masked),
        )

    flags = jnp.zeros((max_new, b, max_new), bool)
    state = _OracleState(
        passes=jnp.int32(0), gen=jnp.full((b, max_new), mask_id, jnp.int32),
        features=jnp.zeros((max_new, b, max_new, len(FEATURES)), jnp.float32), labels=flags, recorded=flags,
    )
    state = jax.lax.while_loop(cond, body, state)
    return state.features, state.labels, state.recorded


def oracle_traces(
    model: Qwen2,
    prompts: Sequence[Sequence[int]],
    answers: np.ndarray,
    max_len: int | None = None,
    first_row: int = 0,
) -> Traces:
    """Run the Extremely Greedy Parallel oracle towards `answers` [B, N] (the final
    generations, e.g. `final_answers`) and record every masked position of every pass."""
    answers = np.asarray(answers, np.int32)
    n = answers.shape[1] if answers.ndim == 2 else 0
    if answers.ndim != 2 or answers.shape[0] != len(prompts) or n < 1:
        raise ValueError(f"answers must be [{len(prompts)} prompts, max_new_tokens >= 1], got shape {answers.shape}")
    mask_id = model.cfg.mask_token_id
    if (answers == mask_id).any() or (answers < 0).any() or (answers >= model.cfg.vocab_size).any():
        raise ValueError(f"answers must be ids of the vocabulary [0, {model.cfg.vocab_size}) other than the mask")
    batch = prepare_canvas(model, DecoderConfig(max_new_tokens=n, max_len=max_len, eos_token_ids=()), prompts, None)
    graph, params = nnx.split(model)
    features, labels, recorded = map(np.asarray, _oracle(
        graph, params, jnp.asarray(batch.ids), jnp.asarray(batch.lengths), jnp.asarray(answers), n, mask_id))
    passes, rows, _ = np.nonzero(recorded)
    return Traces(features[recorded], labels[recorded], rows + first_row, passes)


def final_answers(
    model: Qwen2, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None = None
) -> np.ndarray:
    """[B, N]: the model's own greedy answer, one token per pass (the most confident), whole canvas."""
    config = ThresholdConfig(threshold=1.0, max_new_tokens=max_new_tokens, eos_token_ids=(), max_len=max_len)
    return threshold_generate(model, prompts, config).tokens


def collect_traces(
    model: Qwen2,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    max_len: int | None = None,
) -> Traces:
    """Final answers, then oracle traces, for prompts in batches of `batch_size` (one compiled shape)."""
    parts = []
    for idx, rows in padded_batches(prompts, batch_size):
        answers = final_answers(model, rows, max_new_tokens, max_len)
        # The rows filling up the last batch (numbered past it) are dropped.
        parts.append(oracle_traces(model, rows, answers, max_len, first_row=idx[0]).select(np.asarray(idx)))
    if not parts:
        raise ValueError("no prompts given")
    return Traces.concatenate(parts)
