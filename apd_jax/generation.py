"""What every decoder shares: its settings, knob and prompt checks, eos and padding ids, the result object."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import numpy as np

from apd_jax.config import ModelConfig, raise_problems


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The settings every decoder takes; each decoder's config extends it.

    temperature 0 is greedy; top_p 1 and top_k 0 disable their filter (applied after the
    temperature, in that order). Keyword-only, so a subclass's own fields keep the
    leading positions.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None: the model config's; (): never stop at an eos
    max_len: int | None = None  # cache / sequence capacity; None: the models' max_position_embeddings

    what: ClassVar[str] = "generation"  # names the settings in error messages

    def problems(self) -> list[str]:
        """What is wrong with these settings (none: an empty list); subclasses add their own."""
        return knob_problems(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    def validate(self) -> None:
        raise_problems(self.what, self.problems())


def resolve_eos(eos_token_ids: Sequence[int] | None, cfg: ModelConfig) -> tuple[int, ...]:
    """The eos ids a decoder stops at: the given ones, or the model config's when None."""
    return tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)


def pad_id(cfg: ModelConfig, eos: Sequence[int]) -> int:
    """What fills a result after each row's end: the config's pad token, else the first eos, else 0."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)


def default_key(key: jax.Array | None) -> jax.Array:
    """The PRNG key of a decoding call: key(0) when none is given (greedy decoding never reads it)."""
    return jax.random.key(0) if key is None else key


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
        """Mean generated tokens per pass over all rows (each row's passes counted).

        Counted from `lengths`: tokens a row's final pass accepted after its eos are
        not generated (they are padding in `tokens`), though `accepted` counts them.
        """
        return float(self.lengths.sum() / max(self.row_passes().sum(), 1))

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


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_compiled = {"seconds": 0.0, "listening": False}


def _record(event: str, duration: float, **_: object) -> None:
    if event in _COMPILE_EVENTS:
        _compiled["seconds"] += duration


class CompileTimer:
    """Seconds JAX spends lowering and compiling (XLA) inside the `with` block, from jax.monitoring.

    Generation is one jitted call, so its wall time less this is the time spent decoding (and
    tracing, which this leaves out: nested jits would count twice). A program found in the
    persistent compilation cache costs (almost) nothing here.
    """

    seconds: float = 0.0

    def __enter__(self) -> CompileTimer:
        if not _compiled["listening"]:  # one process-wide listener (jax.monitoring cannot remove one)
            jax.monitoring.register_event_duration_secs_listener(_record)
            _compiled["listening"] = True
        self._start = _compiled["seconds"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = _compiled["seconds"] - self._start
