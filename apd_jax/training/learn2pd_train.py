"""Learn2PD's filter fitted to oracle traces, and how its keep decisions compare with a fixed rule.

As the paper's own training notebook (Bao et al., 2025): plain binary cross-entropy, so
that the keep probability estimates the chance that a prediction is already the final
answer, minimised with optax's Adam on minibatches drawn with replacement.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from apd_jax.models.config import below_problems, raise_problems
from apd_jax.decoding.learn2pd import FEATURES, Filter
from apd_jax.training.learn2pd_oracle import Traces


@dataclasses.dataclass(frozen=True)
class FilterTrainConfig:
    width: int = 256
    steps: int = 1000
    learning_rate: float = 3e-3
    batch_size: int = 2048  # minibatch, drawn with replacement
    seed: int = 0

    def validate(self) -> None:
        problems = below_problems(self, ("width", "steps", "batch_size"))
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} must be > 0")
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _FitState:
    params: nnx.State
    opt_state: optax.OptState
    losses: jax.Array  # [steps]: each minibatch's loss
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("graph", "steps", "batch"))
def _fit(graph, params, x, y, key, learning_rate, steps: int, batch: int):
    tx = optax.adam(learning_rate)

    def loss_fn(params, idx):
        return _bce(nnx.merge(graph, params)(x[idx]), y[idx])

    def step(i, state: _FitState) -> _FitState:
        key, sub = jax.random.split(state.key)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, jax.random.randint(sub, (batch,), 0, x.shape[0]))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return _FitState(optax.apply_updates(state.params, updates), opt_state, state.losses.at[i].set(loss), key)

    state = _FitState(params, tx.init(params), jnp.zeros((steps,), jnp.float32), key)
    state = jax.lax.fori_loop(0, steps, step, state)
    return state.params, state.losses


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
def _scores(learned: Filter, features: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(learned(features))


def filter_loss(learned: Filter, traces: Traces) -> float:
    """Binary cross-entropy of the filter over all of `traces`."""
    return float(_bce(learned(jnp.asarray(traces.features)), jnp.asarray(traces.labels, jnp.float32)))


def keep_probabilities(learned: Filter, traces: Traces) -> np.ndarray:
    return np.asarray(_scores(learned, jnp.asarray(traces.features)))


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
    learned: Filter, traces: Traces, keep_threshold: float = 0.9
) -> dict[str, dict | None]:
    """The filter (keep probability > keep_threshold) against the fixed rule `confidence > tau`.

    'confidence_equal_precision': the tau with the highest recall whose precision
    still reaches the filter's (None when none does). At equal agreement on committed
    tokens, the rule with the higher recall commits more tokens per pass.
    """
    labels = traces.labels
    ours = keep_stats(keep_probabilities(learned, traces) > keep_threshold, labels)
    conf = traces.features[:, FEATURES.index("confidence")]
    taus = np.unique(np.concatenate([np.quantile(conf, np.linspace(0.0, 1.0, 401)), [0.0, 1.0]]))
    rules = [{"tau": float(tau), **keep_stats(conf > tau, labels)} for tau in taus]
    reach = [r for r in rules if r["precision"] >= ours["precision"]]
    return {
        "filter": {"keep_threshold": keep_threshold, **ours},
        "confidence_equal_precision": max(reach, key=lambda r: r["recall"]) if reach else None,
    }
