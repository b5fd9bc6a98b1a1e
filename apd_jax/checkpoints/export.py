"""Hugging Face safetensors export: flat Flax parameters (from memory or, one at a time, from an
orbax checkpoint) written as the hub ships them, one model.safetensors or, past max_shard_size,
numbered shards with an index, beside the source's config and tokenizer files."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from apd_jax.checkpoints.errors import CheckpointError, read_config
from apd_jax.checkpoints.flat import _entry, _nbytes, expected_shapes
from apd_jax.checkpoints.orbax import _orbax_dir, _orbax_host_arrays, _saved_shapes, stored_quantization
from apd_jax.checkpoints.safetensors import _DTYPE_NAMES
from apd_jax.checkpoints.writes import _copy_configs, atomic_dir, check_output
from apd_jax.models.config import ModelConfig
from apd_jax.models.family import Family

MAX_SHARD_SIZE = 5 * 10**9  # bytes per exported safetensors file, Hugging Face's save_pretrained default


def _shard_plan(specs: Mapping[str, Any], max_shard_size: int) -> list[list[str]]:
    """Flax paths grouped into files of at most max_shard_size bytes (a parameter is never split)."""
    shards: list[list[str]] = [[]]
    size = 0
    for path, s in specs.items():
        n = _nbytes(s)
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(path)
        size += n
    return shards


def _write_safetensors(
    file: Path, family: Family, specs: Mapping[str, Any], arrays: Iterator[tuple[str, Any]]
) -> None:
    """A safetensors file written tensor by tensor: the header first (every shape is known), then
    each Flax parameter's HF tensors as `arrays` yields it, so only one parameter is in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for path, s in specs.items():
        names, layout = _entry(family, path)
        for name, part in zip(names, jax.eval_shape(layout.to_hf, s)):
            n = _nbytes(jax.ShapeDtypeStruct(part.shape, s.dtype))
            header[name] = {"dtype": _DTYPE_NAMES[np.dtype(s.dtype)], "shape": list(part.shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for path in specs:
            got, array = next(arrays)
            assert got == path, (got, path)  # the caller yields in the plan's order
            for part in _entry(family, path)[1].to_hf(np.asarray(array)):
                f.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)  # bytes, any dtype


def write_hf(
    specs: Mapping[str, Any], arrays: Iterator[tuple[str, Any]], config_dir: Path, out_dir: Path, *,
    overwrite: bool, max_shard_size: int,
) -> Path:
    """Flax parameters (yielded in `specs` order) -> a HF directory: one model.safetensors when it
    fits in max_shard_size, else model-0000k-of-0000n.safetensors and model.safetensors.index.json;
    the tensors named by the family of config_dir's config.json."""
    family = read_config(config_dir).family
    plan = _shard_plan(specs, max_shard_size)
    files = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))
    ]
    weight_map = {}
    with atomic_dir(out_dir, overwrite, sources=(config_dir,)) as tmp:
        _copy_configs(config_dir, tmp)
        for file, paths in zip(files, plan):
            _write_safetensors(tmp / file, family, {p: specs[p] for p in paths}, arrays)
            weight_map.update({name: file for p in paths for name in _entry(family, p)[0]})
        if len(plan) > 1:
            total = sum(_nbytes(s) for s in specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


def _check_params(names: Iterable[str], cfg_dir: Path, cfg: ModelConfig) -> None:
    expected, names = expected_shapes(cfg), set(names)
    if names != set(expected):
        raise CheckpointError(
            f"parameters do not match {cfg_dir / 'config.json'}: "
            f"missing {sorted(set(expected) - names)[:8]}, unexpected {sorted(names - set(expected))[:8]}"
        )


def export_hf(
    params: Mapping[str, Any], config_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
    max_shard_size: int = MAX_SHARD_SIZE,
) -> Path:
    """Flat Flax parameters -> HF safetensors (sharded past max_shard_size bytes) + config.json
    (copied from config_dir); dtypes as given."""
    config_dir, out_dir = Path(config_dir).expanduser(), Path(out_dir).expanduser()
    check_output(out_dir, overwrite, sources=(config_dir,))
    _check_params(params, config_dir, read_config(config_dir))
    specs = {p: jax.ShapeDtypeStruct(np.shape(a), a.dtype) for p, a in params.items()}
    return write_hf(specs, iter(params.items()), config_dir, out_dir, overwrite=overwrite,
                     max_shard_size=max_shard_size)


def convert_orbax_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, max_shard_size: int = MAX_SHARD_SIZE
) -> Path:
    """apd_jax orbax checkpoint -> HF directory (sharded like the hub's), dtypes as stored; one
    parameter is read and written at a time."""
    out_dir = Path(out_dir).expanduser()
    check_output(out_dir, overwrite, sources=(Path(ckpt_dir).expanduser(),))
    ckpt_dir = _orbax_dir(ckpt_dir)
    mode = stored_quantization(ckpt_dir)
    if mode is not None:
        raise CheckpointError(f"{ckpt_dir} holds {mode} weights (converted with --quantize {mode}); a Hugging Face "
                              "checkpoint holds unquantized ones: export the checkpoint it was converted from")
    cfg = read_config(ckpt_dir)
    saved = _saved_shapes(ckpt_dir, expected_shapes(cfg))
    specs = {p: jax.ShapeDtypeStruct(tuple(saved[p].shape), saved[p].dtype) for p in expected_shapes(cfg)}
    arrays = _orbax_host_arrays(ckpt_dir, specs)
    return write_hf(specs, arrays, ckpt_dir, out_dir, overwrite=overwrite,
                     max_shard_size=max_shard_size)
