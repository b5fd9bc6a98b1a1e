"""Learn2PD's decoder for a Dream drafter: a learned filter picks, each pass, the predictions to commit.

Bao et al., "Learning to Parallel" (2025): a 2-layer MLP reads per-position features of a pass's
prediction and estimates the chance it is already the final answer; each pass commits those
above a keep threshold (at least the most confident) through diffusion.parallel_decode, with
End-of-Text prediction. The filter is saved and restored with orbax here; its training data
(apd_jax.training.learn2pd_oracle) and fit (apd_jax.training.learn2pd_train) live apart.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from apd_jax.checkpoints import atomic_dir
from apd_jax.decoding.blocks.loop import first_index
from apd_jax.decoding.diffusion import ParallelConfig, Prediction, parallel_decode
from apd_jax.decoding.generation import GenerationResult, check_config
from apd_jax.models.model import Transformer

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


class Filter(nnx.Module):
    """f_theta: features [..., len(FEATURES)] -> keep logit [...]; 1793 parameters at width 256."""

    def __init__(self, width: int = 256, *, rngs: nnx.Rngs):
        self.width = width
        self.fc1 = nnx.Linear(len(FEATURES), width, rngs=rngs)
        self.fc2 = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(features)))[..., 0]


def save_filter(learned: Filter, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """out_dir/{filter.json, params/ (orbax)}."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite) as tmp:
        meta = {"format": "apd_jax.decoding.learn2pd.Filter", "features": list(FEATURES), "width": learned.width}
        (tmp / FILTER_FILE).write_text(json.dumps(meta, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), nnx.to_pure_dict(nnx.state(learned)))
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


@dataclasses.dataclass(frozen=True)
class Learn2PDConfig(ParallelConfig):
    """keep_threshold: commit a prediction when the filter's keep probability exceeds it."""

    keep_threshold: float = 0.9
    eot_threshold: float | None = 0.9

    what = "Learn2PD"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0.0 < self.keep_threshold < 1.0:
            problems.append(f"keep_threshold={self.keep_threshold} must lie in (0, 1)")
        return problems


class FilterRule(nnx.Module):
    """parallel_decode's keep rule: the filter's keep probability above a (traced) threshold."""

    def __init__(self, learned: Filter, keep_threshold: float, vocab: int):
        self.learned = learned
        self.keep_threshold = nnx.Variable(jnp.float32(keep_threshold))
        self.vocab = vocab

    def __call__(self, pred: Prediction, masked: jax.Array) -> jax.Array:
        logits = self.learned(pass_features(pred, masked, self.vocab))
        return jax.nn.sigmoid(logits) > self.keep_threshold[...]


def learn2pd_generate(
    model: Transformer,
    learned: Filter,
    prompts: Sequence[Sequence[int]],
    config: Learn2PDConfig = Learn2PDConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Parallel decoding where a trained filter picks the predictions to keep each pass
    (at least the most confident), with End-of-Text prediction; one compiled call."""
    config = check_config(config, Learn2PDConfig)
    rule = FilterRule(learned, config.keep_threshold, model.cfg.vocab_size)
    return parallel_decode(model, rule, prompts, config, key)
