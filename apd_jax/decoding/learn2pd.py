"""Learn2PD's decoder for a Dream drafter: a learned filter picks, each pass, the predictions to commit.

Bao et al., "Learning to Parallel" (2025): a 2-layer MLP reads per-position features of a pass's
prediction and estimates the chance it is already the final answer; each pass commits those
above a keep threshold (at least the most confident) through diffusion.parallel_decode, with
End-of-Text prediction, or in continuous batching (`learn2pd_slots`). The filter is saved and
restored with orbax here; its training data (apd_jax.training.learn2pd_oracle) and fit
(apd_jax.training.learn2pd_train) live apart.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from apd_jax.checkpoints import atomic_dir
from apd_jax.decoding.blocks.loop import first_index
from apd_jax.decoding.blocks.slots import block_slots
from apd_jax.decoding.continuous import Slots
from apd_jax.decoding.diffusion import ParallelConfig, Prediction, parallel_decode
from apd_jax.decoding.generation import GenerationResult, check_config
from apd_jax.models.model import Transformer

# Per masked position and pass, each in about [0, 1]. No pass index: the oracle finishes in a
# few passes, a decoder takes many, so a pass-index feature only encodes the oracle's schedule
# (on the embedded pair it gave the filter all its edge on oracle traces, and broke decoding).
FEATURES = ("confidence", "margin", "entropy", "front_distance", "position")
FILTER_FILE = "filter.json"


def pass_features(pred: Prediction, masked: jax.Array, vocab: int, width: jax.Array | None = None) -> jax.Array:
    """[B, N, len(FEATURES)]: probability of the prediction, top-1 minus top-2 margin,
    entropy / log(vocab), distance past the leftmost masked position (the decoding
    front) / width, position / width; width: the answer's positions (a row's budget; None: N)."""
    n = masked.shape[1] if width is None else width
    j = jnp.arange(masked.shape[1], dtype=jnp.float32)
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
    """parallel_decode's keep rule: the filter's keep probability above a (traced) threshold.
    `width`: the answer's positions (max_new_tokens) its features divide by, a traced variable, so
    a row in continuous batching, on a canvas of the run's capacity, reads the features of its own
    budget (`learn2pd_slots`)."""

    def __init__(self, learned: Filter, keep_threshold: float, vocab: int, width: int):
        self.learned = learned
        self.keep_threshold = nnx.Variable(jnp.float32(keep_threshold))
        self.width = nnx.Variable(jnp.float32(width))
        self.vocab = vocab

    def __call__(self, pred: Prediction, masked: jax.Array) -> jax.Array:
        logits = self.learned(pass_features(pred, masked, self.vocab, self.width[...]))
        return jax.nn.sigmoid(logits) > self.keep_threshold[...]


def _keep(learned: Filter, vocab: int, config: Learn2PDConfig) -> FilterRule:
    """The keep rule of a decoding with `config`."""
    return FilterRule(learned, config.keep_threshold, vocab, config.max_new_tokens)


def learn2pd_generate(
    model: Transformer,
    learned: Filter,
    prompts: Sequence[Sequence[int]],
    config: Learn2PDConfig = Learn2PDConfig(),
    key: jax.Array | None = None,
) -> GenerationResult:
    """Parallel decoding where a trained filter picks the predictions to keep each pass
    (at least the most confident), with End-of-Text prediction; one compiled call (a call of more
    than continuous.MAX_ROWS prompts through the slots, as `parallel_decode` says)."""
    config = check_config(config, Learn2PDConfig)
    return parallel_decode(model, _keep(learned, model.cfg.vocab_size, config), prompts, config, key)


def learn2pd_slots(model: Transformer, learned: Filter, prompts: Sequence[Sequence[int]], config: Learn2PDConfig,
                   size: int = 32, group: int | None = None, *, refresh_group: int | None = None) -> Slots:
    """Learn2PD decoding over `size` slots for continuous batching (blocks.slots.block_slots, which
    says what `group` and `refresh_group` do): each request's keep rule is the filter at its own
    budget's width, so at temperature 0 a request decodes as `learn2pd_generate` on it alone with
    its own settings (blocks.slots.row_config)."""
    config = check_config(config, Learn2PDConfig)
    vocab = model.cfg.vocab_size
    return block_slots(model, prompts, config, size, group, refresh_group=refresh_group,
                       keep=functools.partial(_keep, learned, vocab))
