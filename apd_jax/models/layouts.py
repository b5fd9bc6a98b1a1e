"""How one Flax parameter is stored as Hugging Face tensors: a layout object (a family's parameter
table names one per parameter), converting both ways and partitioning the HF tensors so that the
conversion is local to every device. Only slicing, reshapes and .T: the same code serves numpy
arrays, jax arrays and, under jax.eval_shape, abstract shapes."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import PartitionSpec


def _full(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    """`spec` with every axis named (None where it stops early)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


@dataclasses.dataclass(frozen=True)
class Same:
    """One tensor, stored as is."""

    as_stored = True  # the HF tensor is the Flax parameter

    def to_hf(self, x: Any) -> list[Any]:
        return [x]

    def to_flax(self, tensors: list[Any], shape: tuple[int, ...]) -> Any:
        return tensors[0]

    def hf_spec(self, spec: PartitionSpec, ndim: int) -> PartitionSpec:
        return PartitionSpec(*_full(spec, ndim))


@dataclasses.dataclass(frozen=True)
class Transposed:
    """One Linear weight: HF [out, in] -> Flax [in, out]."""

    as_stored = False

    def to_hf(self, x: Any) -> list[Any]:
        return [x.T]

    def to_flax(self, tensors: list[Any], shape: tuple[int, ...]) -> Any:
        return tensors[0].T

    def hf_spec(self, spec: PartitionSpec, ndim: int) -> PartitionSpec:
        return PartitionSpec(*_full(spec, ndim)[::-1])


@dataclasses.dataclass(frozen=True)
class Stacked:
    """The gate and up Linear weights, [inter, in] each -> Flax [in, 2, inter]."""

    as_stored = False

    def to_hf(self, x: Any) -> list[Any]:
        return [x[:, j].T for j in range(x.shape[1])]

    def to_flax(self, tensors: list[Any], shape: tuple[int, ...]) -> Any:
        return tensors[0].__array_namespace__().stack([t.T for t in tensors], axis=1)

    def hf_spec(self, spec: PartitionSpec, ndim: int) -> PartitionSpec:
        full = _full(spec, ndim)
        return PartitionSpec(full[2], full[0])


@dataclasses.dataclass(frozen=True)
class QKV:
    """The q, k, v Linear weights (or, 1-D, their biases) -> Flax [..., kv_heads, g + 2, head_dim]:
    per KV head its g query heads, its key, its value (model.Attention)."""

    as_stored = False

    def to_hf(self, x: Any) -> list[Any]:
        g, lead = x.shape[-2] - 2, x.shape[:-3]
        return [part.reshape(*lead, -1).T for part in (x[..., :g, :], x[..., g, :], x[..., g + 1, :])]

    def to_flax(self, tensors: list[Any], shape: tuple[int, ...]) -> Any:
        xp = tensors[0].__array_namespace__()
        *lead, kvh, _, d = shape
        q, k, v = (xp.reshape(t.T, (*lead, kvh, -1, d)) for t in tensors)
        return xp.concat([q, k, v], axis=-2)

    def hf_spec(self, spec: PartitionSpec, ndim: int) -> PartitionSpec:
        full = _full(spec, ndim)
        return PartitionSpec(full[-3], *full[:-3])  # [..., kv_heads, g + 2, d] <- [rows, ...]


Layout = Same | Transposed | Stacked | QKV
SAME, TRANSPOSED, STACKED, QKV_FUSED = Same(), Transposed(), Stacked(), QKV()
