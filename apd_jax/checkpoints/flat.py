"""A model as flat parameters ('layers.0.mlp.down_proj.kernel' -> array): the shapes a checkpoint
must hold, taken from the model itself, the Hugging Face tensors and layout of each (its family's
table), and the model built from such parameters."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from apd_jax.checkpoints.errors import CheckpointError
from apd_jax.models.config import ModelConfig
from apd_jax.models.family import Family
from apd_jax.models.layouts import Layout
from apd_jax.models.model import Transformer, abstract_model
from apd_jax.models.quantize import abstract_quantized


def _nbytes(spec: Any) -> int:
    """Bytes of an array or ShapeDtypeStruct."""
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def _entry(family: Family, path: str) -> tuple[tuple[str, ...], Layout]:
    """The Hugging Face names and layout of one Flax parameter, from its family's table."""
    try:
        entry = family.param(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return entry.hf, entry.layout


def _flat_values(model: Transformer) -> dict[str, Any]:
    """'layers.0.mlp.down_proj.kernel' -> value of every parameter (nnx's own flat state, keys joined)."""
    _, state = nnx.split(model)
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}


def _abstract(cfg: ModelConfig, quantize: str | None) -> Transformer:
    """The model's structure, its weights quantized with `quantize` (apd_jax.models.quantize's modes) unless None."""
    return abstract_model(cfg) if quantize is None else abstract_quantized(cfg, quantize)


def expected_shapes(cfg: ModelConfig, quantize: str | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat 'layers.0.mlp.down_proj.kernel' -> shape/dtype of every parameter, from the model itself
    (quantized with `quantize`: each quantized weight's leaves, e.g. '...down_proj.kernel.array.qvalue')."""
    return _flat_values(_abstract(cfg, quantize))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model -> the shape config.json implies for it."""
    shapes = {}
    for path, want in expected_shapes(cfg).items():
        names, layout = _entry(cfg.family, path)
        parts = jax.eval_shape(layout.to_hf, want)
        shapes.update({name: tuple(part.shape) for name, part in zip(names, parts)})
    return shapes


def model_from_params(cfg: ModelConfig, params: dict[str, Any], quantize: str | None = None) -> Transformer:
    """Build a model whose parameters are `params` (flat Flax paths; a quantized model's leaves with
    `quantize`, its mode), placed on the default device unless they are jax arrays already."""
    graphdef, state = nnx.split(_abstract(cfg, quantize))
    tree = traverse_util.unflatten_dict({tuple(_keys(k)): jax.numpy.asarray(v) for k, v in params.items()})
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def _keys(path: str) -> list[str | int]:
    """'layers.0.mlp' -> ['layers', 0, 'mlp']: nnx's own keys (layer indices are ints)."""
    return [int(k) if k.isdigit() else k for k in path.split(".")]


def model_params(model: Transformer) -> dict[str, np.ndarray]:
    """Flat Flax parameters of a model, as host numpy arrays."""
    return {path: np.asarray(value) for path, value in _flat_values(model).items()}
