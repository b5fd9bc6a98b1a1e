"""Learning to Parallel Decode (Learn2PD, shared/seeds/002_*) for the Dream drafter.

1. The Extremely Greedy Parallel oracle: knowing the model's own final answer
   (its one-token-per-pass greedy output), each pass unmasks exactly the masked
   positions whose current greedy prediction already equals the answer (the most
   confident position, set to the answer, when none does). Every masked
   position of every pass is recorded: its features and the oracle's keep label.
2. A small filter f_theta (a 2-layer MLP of about 2k parameters) trained on
   those traces with plain binary cross-entropy, as the paper's own training
   notebook does, so that its keep probability estimates the chance that a
   prediction is already the final answer; saved with orbax.
3. A decoder that commits, each pass, the predictions whose keep probability
   exceeds a threshold (0.9, the paper's; at least the most confident one), in
   diffusion.parallel_decode's compiled loop,
4. with End-of-Text prediction: once a masked position predicts an eos with
   probability above `eot_threshold`, every later position is dropped (padding,
   hidden from attention by the row's valid length; shapes never change).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from apd_jax.checkpoint import atomic_dir
from apd_jax.config import raise_problems
from apd_jax.diffusion import (
    ParallelConfig,
    Prediction,
    ThresholdConfig,
    build_canvas,
    first_index,
    generation_logits,
    make_knobs,
    most_confident,
    parallel_decode,
    predict,
    prepare_prompts,
    threshold_generate,
)
from apd_jax.generation import GenerationResult
from apd_jax.model import Qwen2
from apd_jax.sampling import exclude_token

# Per masked position and pass, each in about [0, 1]. No pass index: the oracle finishes in a
# few passes, a decoder takes many, so a pass-index feature only encodes the oracle's schedule
# (on the embedded pair it gave the filter all its edge on oracle traces, and broke decoding).
FEATURES = ("confidence", "margin", "entropy", "front_distance", "position")
FILTER_FILE = "filter.json"


def pass_features(pred: Prediction, masked: jax.Array, vocab: int) -> jax.Array:
    """[B, N, len(FEATURES)]: probability of the prediction, top-1 minus top-2 margin,
    entropy / log(vocab), distance past the leftmost masked position (the decoding
    front) / N, position / N."""
    n = masked.shape[1]
    j = jnp.arange(n, dtype=jnp.float32)
    front = first_index(masked).astype(jnp.float32)
    return jnp.stack(
        [
            pred.confidence,
            pred.margin,
            -pred.neg_entropy / jnp.log(jnp.float32(vocab)),
            (j - front[:, None]) / n,
            jnp.broadcast_to(j / n, masked.shape),
        ],
        axis=-1,
    )


# ---------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------


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


@functools.partial(jax.jit, static_argnames=("graph", "max_new", "mask_id"))
def _oracle(graph, params, prompts, prompt_lens, answers, max_new: int, mask_id: int):
    model = nnx.merge(graph, params)
    b = prompts.shape[0]
    greedy = make_knobs(0.0, 1.0, 0)
    end = prompt_lens + max_new

    def cond(carry):
        i, gen = carry[0], carry[1]
        return (i < max_new) & jnp.any(gen == mask_id)

    def body(carry):
        i, gen, features, labels, recorded = carry
        logits = generation_logits(model, build_canvas(prompts, prompt_lens, gen), prompt_lens, end, max_new)
        pred = predict(exclude_token(logits, mask_id), jax.random.key(0), greedy)
        masked = gen == mask_id
        new, match = oracle_step(pred, gen, answers, mask_id)
        return (
            i + 1,
            new,
            features.at[i].set(pass_features(pred, masked, model.cfg.vocab_size)),
            labels.at[i].set(match),
            recorded.at[i].set(masked),
        )

    gen = jnp.full((b, max_new), mask_id, jnp.int32)
    features = jnp.zeros((max_new, b, max_new, len(FEATURES)), jnp.float32)
    flags = jnp.zeros((max_new, b, max_new), bool)
    _, _, features, labels, recorded = jax.lax.while_loop(
        cond, body, (jnp.int32(0), gen, features, flags, flags)
    )
    return features, labels, recorded


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
    padded, lengths, _, _ = prepare_prompts(model, prompts, n, max_len, ())
    graph, params = nnx.split(model)
    features, labels, recorded = map(
        np.asarray, _oracle(graph, params, padded, lengths, jnp.asarray(answers), n, mask_id)
    )
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
    """Final answers, then oracle traces, for prompts in batches of `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    parts = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        answers = final_answers(model, batch, max_new_tokens, max_len)
        parts.append(oracle_traces(model, batch, answers, max_len, first_row=start))
    if not parts:
        raise ValueError("no prompts given")
    return Traces.concatenate(parts)


# ---------------------------------------------------------------------------
# The filter
# ---------------------------------------------------------------------------


class Filter(nnx.Module):
    """f_theta: features [..., len(FEATURES)] -> keep logit [...]; 1793 parameters at width 256."""

    def __init__(self, width: int = 256, *, rngs: nnx.Rngs):
        self.width = width
        self.fc1 = nnx.Linear(len(FEATURES), width, rngs=rngs)
        self.fc2 = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(features)))[..., 0]


@dataclasses.dataclass(frozen=True)
class FilterTrainConfig:
    width: int = 256
    steps: int = 1000
    learning_rate: float = 3e-3
    batch_size: int = 2048  # minibatch, drawn with replacement
    seed: int = 0

    def validate(self) -> None:
        problems = []
        if self.width < 1:
            problems.append(f"width={self.width} must be >= 1")
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        raise_problems("filter training", problems)


def _check_labels(labels: np.ndarray) -> None:
    if len(labels) == 0:
        raise ValueError("no traces to train on")
    p = float(np.mean(labels))
    if p in (0.0, 1.0):
        raise ValueError(
            f"the traces hold only {'keep' if p else 'remask'} labels ({len(labels)} samples): "
            "a filter needs both; use more or longer prompts"
        )


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # Unweighted, so that the keep probability stays calibrated (class-balanced weights inflate it).
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


@functools.partial(jax.jit, static_argnames=("graph", "steps", "batch"))
def _fit(graph, params, x, y, key, learning_rate, steps: int, batch: int):
    tx = optax.adam(learning_rate)

    def loss_fn(params, idx):
        return _bce(nnx.merge(graph, params)(x[idx]), y[idx])

    def step(i, carry):
        params, opt_state, losses, key = carry
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.randint(sub, (batch,), 0, x.shape[0]))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.at[i].set(loss), key

    carry = (params, tx.init(params), jnp.zeros((steps,), jnp.float32), key)
    params, _, losses, _ = jax.lax.fori_loop(0, steps, step, carry)
    return params, losses


def train_filter(traces: Traces, config: FilterTrainConfig = FilterTrainConfig()) -> tuple[Filter, np.ndarray]:
    """Fit a filter to oracle traces with Adam on binary cross-entropy; returns it and the minibatch losses."""
    config.validate()
    _check_labels(traces.labels)
    graph, params = nnx.split(Filter(config.width, rngs=nnx.Rngs(config.seed)))
    params, losses = _fit(
        graph, params, jnp.asarray(traces.features), jnp.asarray(traces.labels, jnp.float32),
        jax.random.key(config.seed), jnp.float32(config.learning_rate), config.steps, config.batch_size,
    )
    return nnx.merge(graph, params), np.asarray(losses)


@nnx.jit
def _scores(filter: Filter, features: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(filter(features))


def filter_loss(filter: Filter, traces: Traces) -> float:
    """Binary cross-entropy of the filter over all of `traces`."""
    return float(_bce(filter(jnp.asarray(traces.features)), jnp.asarray(traces.labels, jnp.float32)))


def keep_probabilities(filter: Filter, traces: Traces) -> np.ndarray:
    return np.asarray(_scores(filter, jnp.asarray(traces.features)))


def keep_stats(keep: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How keep decisions agree with the oracle: precision = kept predictions the oracle
    also keeps (committed tokens that are right), recall = oracle keeps that are kept."""
    kept, right = int(keep.sum()), int((keep & labels).sum())
    return {
        "accuracy": float(np.mean(keep == labels)),
        "precision": right / max(kept, 1),
        "recall": right / max(int(labels.sum()), 1),
        "keep_rate": kept / max(len(labels), 1),
    }


def compare_with_confidence_rule(
    filter: Filter, traces: Traces, keep_threshold: float = 0.9
) -> dict[str, dict | None]:
    """The filter (keep probability > keep_threshold) against the fixed rule `confidence > tau`.

    'confidence_equal_precision': the tau with the highest recall whose precision
    still reaches the filter's (None when none does). At equal agreement on committed
    tokens, the rule with the higher recall commits more tokens per pass.
    """
    labels = traces.labels
    ours = keep_stats(keep_probabilities(filter, traces) > keep_threshold, labels)
    conf = traces.features[:, FEATURES.index("confidence")]
    taus = np.unique(np.concatenate([np.quantile(conf, np.linspace(0.0, 1.0, 401)), [0.0, 1.0]]))
    rules = [{"tau": float(tau), **keep_stats(conf > tau, labels)} for tau in taus]
    reach = [r for r in rules if r["precision"] >= ours["precision"]]
    return {
        "filter": {"keep_threshold": keep_threshold, **ours},
        "confidence_equal_precision": max(reach, key=lambda r: r["recall"]) if reach else None,
    }


def save_filter(filter: Filter, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """out_dir/{filter.json, params/ (orbax)}."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite) as tmp:
        meta = {"format": "apd_jax.learn2pd.Filter", "features": list(FEATURES), "width": filter.width}
        (tmp / FILTER_FILE).write_text(json.dumps(meta, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(filter)))
    return out_dir


def load_filter(path: str | Path) -> Filter:
    """Restore a filter saved by save_filter."""
    path = Path(path)
    meta_file = path / FILTER_FILE
    if not meta_file.is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path} is not a Learn2PD filter directory ({FILTER_FILE} and params/ expected)")
    meta = json.loads(meta_file.read_text())
    if tuple(meta.get("features", ())) != FEATURES:
        raise ValueError(
            f"filter in {path} was trained on features {meta.get('features')}; this code computes {FEATURES}"
        )
    graph, state = nnx.split(nnx.eval_shape(lambda: Filter(int(meta["width"]), rngs=nnx.Rngs(0))))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore((path / "params").absolute(), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graph, state)


# ---------------------------------------------------------------------------
# Decoding with the filter
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Learn2PDConfig(ParallelConfig):
    """keep_threshold: commit a prediction when the filter's keep probability exceeds it."""

    keep_threshold: float = 0.9
    eot_threshold: float | None = 0.9

    def validate(self) -> None:
        problems = self._problems()
        if not 0.0 < self.keep_threshold < 1.0:
            problems.append(f"keep_threshold={self.keep_threshold} must lie in (0, 1)")
        raise_problems("Learn2PD", problems)


class FilterRule(nnx.Module):
    """parallel_decode's keep rule: the filter's keep probability above a (traced) threshold."""

    def __init__(self, filter: Filter, keep_threshold: float, vocab: int):
        self.filter = filter
        self.keep_threshold = nnx.Variable(jnp.float32(keep_threshold))
        self.vocab = vocab

    def __call__(self, pred: Prediction, masked: jax.Array) -> jax.Array:
        logits = self.filter(pass_features(pred, masked, self.vocab))
        return jax.nn.sigmoid(logits) > self.keep_threshold[...]


def learn2pd_generate(
    model: Qwen2,
    filter: Filter,
    prompts: Sequence[Sequence[int]],
    config: Learn2PDConfig = Learn2PDConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Parallel decoding where a trained filter picks the predictions to keep each pass
    (at least the most confident), with End-of-Text prediction; one compiled call."""
    rule = FilterRule(filter, config.keep_threshold, model.cfg.vocab_size)
    return parallel_decode(model, rule, prompts, config, key)
