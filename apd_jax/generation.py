"""What every decoder shares: knob and prompt checks, padding, and the result object."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def knob_problems(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> list[str]:
    """What is wrong with the knobs every decoder has (none: an empty list)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        problems.append(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p} must lie in (0, 1] (1 disables it)")
    if top_k < 0:
        problems.append(f"top_k={top_k} must be >= 0 (0 disables it)")
    return problems


@dataclasses.dataclass
class GenerationResult:
    """tokens[b, :lengths[b]] is row b's generation (eos included), the rest padding.

    `accepted[b, i]` is the number of tokens row b committed in pass i (0 once the
    row has stopped), so passes per row and tokens per pass follow from it.
    """

    tokens: np.ndarray  # [B, max_new_tokens]
    lengths: np.ndarray  # [B]
    accepted: np.ndarray  # [B, max passes]
    stopped_at_eos: np.ndarray  # [B] bool
    passes: int  # loop iterations: forward passes of each model

    def row_passes(self) -> np.ndarray:
        return (self.accepted > 0).sum(axis=1)

    def accepted_per_pass(self, row: int) -> list[int]:
        counts = self.accepted[row]
        return counts[counts > 0].tolist()

    def tokens_per_pass(self) -> float:
        """Mean tokens committed per pass over all rows (each row's passes counted)."""
        return float(self.accepted.sum() / max(self.row_passes().sum(), 1))

    def sequences(self) -> list[list[int]]:
        return [self.tokens[b, : self.lengths[b]].tolist() for b in range(len(self.lengths))]


def check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    """Prompts as lists of ints, each non-empty and inside [0, vocab)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    rows = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token to condition on")
        bad = [x for x in p if not 0 <= x < vocab]
        if bad:
            raise ValueError(f"prompt {i} holds ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return rows


def prompt_bucket(longest: int, max_new_tokens: int, capacity: int) -> int:
    """Padded prompt length: a power of two (>= 16) so new prompt lengths rarely recompile.

    Raises if prompt + max_new_tokens cannot fit the cache capacity.
    """
    if longest + max_new_tokens > capacity:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the cache capacity "
            f"{capacity}; shorten the prompt, lower max_new_tokens or raise max_len"
        )
    return min(max(16, 1 << (longest - 1).bit_length()), capacity - max_new_tokens)


def pad_prompts(rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, length] int32 right-padded with zeros, and the true lengths [B]."""
    padded = np.zeros((len(rows), length), np.int32)
    for i, p in enumerate(rows):
        padded[i, : len(p)] = p
    return padded, np.asarray([len(p) for p in rows], np.int32)


def finish(out, lengths, accepted, eos_hit, passes, pad_id: int) -> GenerationResult:
    """Device outputs -> a GenerationResult with padding after each row's end."""
    out, lengths = np.asarray(out), np.asarray(lengths)
    out = np.where(np.arange(out.shape[1]) < lengths[:, None], out, pad_id)
    return GenerationResult(out, lengths, np.asarray(accepted), np.asarray(eos_hit), int(passes))
