"""Sharded APD: a (data, model) device mesh and the placement of every array on it
(parameters: the spec column of the model's family's parameter table, family.Param.spec).

`data` splits the batch rows; `model` is Megatron-style tensor parallelism: q/k/v split by
KV-head group, gate/up on the intermediate dim, o_proj and down_proj on their input dim (one
all-reduce after attention and one after the MLP; attention stays local), and the embedding
and head on the vocabulary (the largest matmul per drafted token). Norms are replicated; the
KV caches split batch over `data` and KV heads over `model`. A dimension the mesh does not
divide is an error naming it, never a silent replication.

The APD loop is the same jitted program on one device or a mesh: GSPMD partitions it from the
shardings of the parameters, the prompts and the caches (`constrain_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from apd_jax.models.cache import KVCache
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.models.family import MODEL, Family

DATA = "data"  # the mesh axis of batch rows; MODEL, of tensor parallelism, is family.py's

CACHE_SPEC = P(DATA, MODEL, None, None)  # each layer's KVCache.k/v: [batch, kv_heads, max_len, head_dim]
BATCH_SPEC = P(DATA)  # prompts, prompt lengths, cache lengths: rows over `data`


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,model=4' -> {'data': 2, 'model': 4}; an axis left out has size 1."""
    sizes = {DATA: 1, MODEL: 1}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh {text!r}: expected 'data=N,model=M' with N, M >= 1, got {item!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (all processes' devices, multi-host)."""
    devices = list(jax.devices() if devices is None else devices)
    if data < 1 or model < 1:
        raise ValueError(f"mesh data={data}, model={model}: both must be >= 1")
    if data * model > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, only {len(devices)} exist")
    # Auto axes: GSPMD propagates shardings through the unchanged APD code (Explicit axes would
    # require sharding annotations on every ambiguous op).
    return jax.make_mesh((data, model), (DATA, MODEL), (AxisType.Auto,) * 2, devices=devices[: data * model])


def _check_divides(what: str, size: int, mesh: Mesh, axis: str) -> None:
    if size % mesh.shape[axis]:
        raise ValueError(
            f"{what}={size} is not divisible by the mesh's {axis!r} axis of size {mesh.shape[axis]}; "
            f"choose {axis}= a divisor of {size}"
        )


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    """Every dimension split over `model` (the table's, and the KV cache's heads) must divide evenly."""
    for field in cfg.family.splits():
        _check_divides(field, getattr(cfg, field), mesh, MODEL)


def check_batch(batch: int, mesh: Mesh) -> None:
    """Rows are split over `data` and never padded: the caller's batch must divide evenly."""
    if batch % mesh.shape[DATA]:
        raise ValueError(
            f"batch of {batch} prompts is not divisible by the mesh's 'data' axis of size {mesh.shape[DATA]}; "
            "give a multiple of it or a smaller data="
        )


def param_spec(path: str, family: Family) -> P:
    """The PartitionSpec of a parameter from its dotted path (e.g. 'layers.0.mlp.gate_up_proj.kernel')
    in `family`'s table."""
    return family.param(path).spec


def shard_model(model: Transformer, mesh: Mesh) -> Transformer:
    """A copy of `model` with every parameter placed by its family's specs on `mesh` (the input is left as is)."""
    check_model(model.cfg, mesh)
    graphdef, state = nnx.split(model)
    placed = {}
    for key, var in nnx.to_flat_state(state):
        sharding = NamedSharding(mesh, param_spec(".".join(map(str, key)), model.cfg.family))
        placed[key] = var.replace(jax.device_put(var.get_value(), sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def cache_sharding(mesh: Mesh) -> KVCache:
    """The KVCache's shardings, as a KVCache of NamedShardings (a pytree prefix with_sharding_constraint
    takes: one sharding for every layer's K, one for every layer's V)."""
    kv = NamedSharding(mesh, CACHE_SPEC)
    return KVCache(kv, kv, NamedSharding(mesh, BATCH_SPEC))


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Inside jit: pin a cache created there to `cache_sharding` (no-op without a mesh)."""
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache_sharding(mesh))


def shard_rows(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Host arrays [B, ...] placed with their rows over `data` (on every process's devices)."""
    check_batch(arrays[0].shape[0], mesh)
    return tuple(jax.device_put(a, NamedSharding(mesh, BATCH_SPEC)) for a in arrays)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: gather small outputs onto every device, so each process can read them (multi-host)."""
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))
