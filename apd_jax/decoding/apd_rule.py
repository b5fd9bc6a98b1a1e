"""APD's settings and the rule of one pass, as pure functions both APD loops share: the compiled
batched loop (`apd.py`) and the eager one-row reference (`apd_eager.py`).

A pass drafts positions t .. right - 1 with right = min(t + M, L) (`right_edge`), samples the draft
from the drafter (`draft_tokens`), and accepts the longest prefix agreeing with the mixture
R * logits_D + (1 - R) * logits_AR (`accepted_length`), the verifier's logits for draft position j
being its output j - 1 (`verifier_predictions`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from apd_jax.decoding.generation import DecoderConfig
from apd_jax.decoding.sampling import Knobs, exclude_token
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer


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
    if drafter.family.vocabulary != verifier.family.vocabulary:
        raise ValueError(f"a {drafter.model_type} drafter and a {verifier.model_type} verifier do not share a "
                         f"tokenizer ({drafter.family.vocabulary}'s and {verifier.family.vocabulary}'s): APD needs one "
                         "tokenizer for both models; pair the drafter with a verifier trained on its tokenizer")
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class APDKnobs(Knobs):
    """The sampling knobs and the mixture weight R, traced."""

    R: jax.Array


@functools.partial(jax.jit, static_argnames=("mask_id",))
def draft_tokens(logits_d: jax.Array, key: jax.Array, knobs: Knobs, mask_id: int) -> jax.Array:
    """Sample the draft [B, n] from the drafter's logits [B, n, V]; never the mask token. Knobs are
    scalars (one key) or per-row [B] vectors (one key per row), as `Knobs.sample` takes them."""
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
    noise (same `key`), the reference rule takes its argmax. Knobs are scalars (one key) or per-row [B]
    vectors (one key per row), as `Knobs.sample` takes them."""
    R = jnp.reshape(knobs.R, jnp.shape(knobs.R) + (1, 1))  # a row's weight over its [n, V]
    mixture = R * logits_d + (1.0 - R) * logits_v
    if rule == "paper":
        target = knobs.sample(mixture, key, exclude=mask_id)
    else:
        target = jnp.argmax(exclude_token(mixture, mask_id), axis=-1).astype(jnp.int32)
    j = jnp.arange(draft.shape[1])
    match = ((draft == target) | (j == 0)) & (j < n[:, None])
    return jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)


def verifier_predictions(verifier: Transformer, hidden: jax.Array, vocab: int) -> jax.Array:
    """[B, n, vocab]: the verifier's prediction for each draft position j, its output j - 1; zeros
    at position 0, always accepted (the reference carries a logit over from the last pass)."""
    b, n, _ = hidden.shape
    placeholder = jnp.zeros((b, 1, vocab), jnp.float32)
    return jnp.concatenate([placeholder, verifier.logits(hidden[:, : n - 1], vocab=vocab)], axis=1)


def right_edge(t, M, limit):
    """The drafter window's end, right = min(t + M, L): M masked positions past t, never past L."""
    return jnp.minimum(t + M, limit)
