"""The training objectives of the embedded pair: the drafter's masked diffusion loss, the verifier's
next-token loss, and the drafter's completion metrics.

The drafter objective (Dream / LLaDA / MDLM): t ~ U(eps, 1) per sequence; every position but
the first is masked with probability t (with probability `suffix_prob` only after a clean prefix
of random length, as APD prompts the drafter); the loss is the masked positions' cross-entropy
weighted by 1/t, over the number of tokens, each read where the model's family predicts it
(Transformer.aligned: Dream's output i - 1, LLaDA's output i). Each objective is
an `Objective` in parts, so that the training loop (apd_jax.training.loop) can split a batch into
micro-batches and still compute the batch's loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.training.settings import TrainSettings


def diffusion_mask(
    key: jax.Array, tokens: jax.Array, mask_id: int, *, eps: float = 1e-3, suffix_prob: float = 0.5
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The masked-diffusion forward process of Dream and LLaDA: (noisy tokens, masked [B, L] bool, t [B]).

    t = eps + (1 - eps) * u, u ~ U(0, 1) per row; position 0 is never masked (it is
    the first prompt token at inference, and Dream's shifted output 0 predicts it from
    itself). With probability `suffix_prob` a row keeps a clean prefix [0, cut), cut
    uniform in [1, L - 1], and only positions >= cut may be masked. Each candidate
    position is then masked independently with probability t.
    """
    b, n = tokens.shape
    k_t, k_mask, k_mode, k_cut = jax.random.split(key, 4)
    t = eps + (1.0 - eps) * jax.random.uniform(k_t, (b,))
    suffix = jax.random.uniform(k_mode, (b,)) < suffix_prob
    cut = jax.random.randint(k_cut, (b,), 1, max(n, 2))
    first = jnp.where(suffix, cut, 1)
    masked = (jax.random.uniform(k_mask, (b, n)) < t[:, None]) & (jnp.arange(n)[None, :] >= first[:, None])
    return jnp.where(masked, mask_id, tokens), masked, t


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training loss in parts, so that a batch split into micro-batches computes the same loss.

    `noise` draws the randomness of the whole batch at once ({name: [B, ...]} per-row
    inputs); `sums` adds up per-row terms over any subset of rows, "loss" among them;
    the loss is the batch's summed "loss" divided by `denominator` of its [B, L] shape,
    and `metrics` makes the other sums into averages. Calling it is the whole loss.
    """

    noise: Callable[[jax.Array, jax.Array], dict]  # (key, tokens [B, L]) -> per-row inputs
    sums: Callable[[Transformer, dict], dict]  # (model, some rows' inputs) -> {name: summed term}
    denominator: Callable[[tuple[int, ...]], int]
    metrics: Callable[[dict, tuple[int, ...]], dict]  # (the batch's sums, [B, L]) -> metrics

    def finish(self, sums: dict, shape: tuple[int, ...]) -> tuple[jax.Array, dict]:
        return sums["loss"] / self.denominator(shape), self.metrics(sums, shape)

    def __call__(self, model: Transformer, tokens: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
        return self.finish(self.sums(model, self.noise(key, tokens)), tokens.shape)


def _diffusion_sums(model: Transformer, x: dict) -> dict:
    hidden, _ = model(x["noisy"])
    logits = model.logits(model.aligned(hidden))  # [B, L, V]: position i's prediction at i
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x["tokens"])
    masked = x["masked"]
    hit = (jnp.argmax(logits, -1) == x["tokens"]) & masked
    return {"loss": jnp.sum(ce * masked / x["t"][:, None]), "masked_ce": jnp.sum(ce * masked),
            "hit": jnp.sum(hit), "masked": jnp.sum(masked)}


def _diffusion_metrics(sums: dict, shape: tuple[int, ...]) -> dict:
    n_masked = jnp.maximum(sums["masked"], 1)
    return {"masked_ce": sums["masked_ce"] / n_masked, "masked_acc": sums["hit"] / n_masked}


def diffusion_objective(mask_id: int, *, eps: float = 1e-3, suffix_prob: float = 0.5) -> Objective:
    """Masked-diffusion loss: sum over masked positions of CE / t, divided by B * L."""

    def noise(key: jax.Array, tokens: jax.Array) -> dict:
        noisy, masked, t = diffusion_mask(key, tokens, mask_id, eps=eps, suffix_prob=suffix_prob)
        return {"tokens": tokens, "noisy": noisy, "masked": masked, "t": t}

    return Objective(noise, _diffusion_sums, math.prod, _diffusion_metrics)


def diffusion_loss(
    model: Transformer, tokens: jax.Array, key: jax.Array, *, eps: float = 1e-3, suffix_prob: float = 0.5
) -> tuple[jax.Array, dict]:
    """`diffusion_objective` of the model's mask token on one batch: (loss, metrics)."""
    return diffusion_objective(model.cfg.mask_token_id, eps=eps, suffix_prob=suffix_prob)(model, tokens, key)


def _ar_sums(model: Transformer, x: dict) -> dict:
    tokens = x["tokens"]
    hidden, _ = model(tokens)
    logits = model.logits(hidden[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return {"loss": jnp.sum(ce), "correct": jnp.sum(jnp.argmax(logits, -1) == tokens[:, 1:])}


def _predicted_positions(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[1] - 1)


# Next-token cross-entropy (nats per token); no randomness.
AR_OBJECTIVE = Objective(
    noise=lambda key, tokens: {"tokens": tokens}, sums=_ar_sums, denominator=_predicted_positions,
    metrics=lambda sums, shape: {"acc": sums["correct"] / _predicted_positions(shape)},
)


def completion_metrics(model: Transformer, tokens: jax.Array, cut: int, span: int = 8) -> dict:
    """The drafter as APD uses it: prefix [0, cut) clean, everything after masked.

    ce@1 is the cross-entropy of the first masked position (comparable to the
    verifier's next-token loss); ce@1-{span} averages the first `span` positions.
    """
    n = tokens.shape[1]
    noisy = jnp.where(jnp.arange(n)[None, :] >= cut, model.cfg.mask_token_id, tokens)
    hidden, _ = model(noisy)
    logits = model.logits(model.aligned(hidden)[:, cut : cut + span])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, cut : cut + span])
    return {"ce@1": jnp.mean(ce[:, 0]), f"ce@1-{span}": jnp.mean(ce)}


def objective_for(cfg: ModelConfig, s: TrainSettings) -> Objective:
    """A diffusion family's (Dream, LLaDA) masked-diffusion loss, a causal model's next-token loss."""
    if cfg.is_diffusion:
        return diffusion_objective(cfg.mask_token_id, eps=s.eps, suffix_prob=s.suffix_prob)
    return AR_OBJECTIVE
