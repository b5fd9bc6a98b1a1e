"""Hugging Face safetensors checkpoints: the index of a directory's tensors from the file headers
alone, checked against the model's names, shapes and dtypes before any weight is read; then each
tensor read in slices (NaN/Inf reported by the tensor's name), placed onto devices by the block
reader (_hf_placement) or, for a host-only conversion, read whole into host memory (_host_param)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Sharding
from safetensors import SafetensorError, safe_open

from apd_jax.checkpoints import streaming
from apd_jax.checkpoints.errors import CheckpointError, _read_json
from apd_jax.checkpoints.flat import _entry, _nbytes, hf_shapes
from apd_jax.checkpoints.streaming import _blocks, _even_blocks, _gather, _Placement
from apd_jax.models.config import ModelConfig
from apd_jax.models.family import Family

# safetensors dtype names of the float dtypes a checkpoint may hold.
_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# The exponent bits of each float dtype: all set is Inf or NaN.
_EXPONENT = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
             np.dtype(np.float16): (np.uint16, 0x7C00)}


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    try:
        with safe_open(file, framework="np") as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}): it may be truncated or corrupted; "
            "download or convert it again"
        ) from None


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one HF tensor is stored and what its header says."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize


def _safetensors_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The weight files of a HF directory, and the index's weight_map (empty without an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not weight_map or not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard files that are missing: {absent}")
        return files, weight_map
    single = path / "model.safetensors"
    if single.is_file():
        return [single], {}
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found, {}
    if (path / "params").is_dir():
        raise CheckpointError(
            f"{path} is already an apd_jax checkpoint (orbax params/), not a Hugging Face one: apd-jax loads it as "
            "it is; `apd-jax convert flax-to-hf` makes a Hugging Face checkpoint of it"
        )
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json with its shards "
        "(PyTorch .bin checkpoints are not read; re-save them with safe_serialization=True)"
    )


def _tensor_index(path: Path) -> dict[str, _Tensor]:
    """Every tensor of a HF directory from the safetensors headers alone (no weight is read)."""
    files, weight_map = _safetensors_files(path)
    tensors: dict[str, _Tensor] = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears twice in {path}")
                sl = f.get_slice(name)
                tensors[name] = _Tensor(file, tuple(sl.get_shape()), sl.get_dtype())
    for name, file in weight_map.items():
        if name not in tensors or tensors[name].file.name != file:
            raise CheckpointError(
                f"{path / 'model.safetensors.index.json'} maps {name!r} to {file}, which does not hold it"
            )
    return tensors


def iter_hf_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a HF checkpoint directory, one at a time."""
    for file in _safetensors_files(Path(path).expanduser())[0]:
        with _open_safetensors(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _checked_index(path: Path, cfg: ModelConfig) -> dict[str, _Tensor]:
    """The checkpoint's tensors, each checked against the model's names, shapes and dtypes."""
    wanted, tensors = hf_shapes(cfg), _tensor_index(path)
    if cfg.tie_word_embeddings:  # tied: the head is the embedding; some exports store it anyway
        for name in cfg.family.param("lm_head").hf:
            tensors.pop(name, None)
    for name, t in tensors.items():
        if name not in wanted:
            raise CheckpointError(f"unexpected tensor {name!r} in {path}: not a parameter of this {cfg.model_type} model")
        if t.shape != wanted[name]:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {t.shape}, but config.json implies {wanted[name]}"
            )
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {t.file} has unsupported dtype {t.dtype}")
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return tensors


def _has_nonfinite(x: np.ndarray) -> bool:
    """Any NaN or Inf in a float array: its exponent bits all set, tested in chunks (no full-size temporary)."""
    uint, mask = _EXPONENT[x.dtype]
    bits = np.ascontiguousarray(x).reshape(-1).view(uint)
    chunk = 1 << 24
    return any(((bits[i : i + chunk] & mask) == mask).any() for i in range(0, bits.size, chunk))


def _read_slice(name: str, t: _Tensor, index: tuple[slice, ...]) -> np.ndarray:
    """The `index` slice of one HF tensor through its own safe_open, so the file's pages are unmapped
    once it is read; NaN/Inf are reported by the tensor's name."""
    with _open_safetensors(t.file) as f:
        out = f.get_slice(name)[index]
    if _has_nonfinite(out):
        raise CheckpointError(
            f"tensor {name!r} in {t.file} holds NaN or Inf values: the checkpoint is corrupted; "
            "download or convert it again"
        )
    return out


def _rows_per_block(t: _Tensor) -> int:
    """Rows of one HF tensor in a block of about READ_CHUNK_BYTES."""
    return max(1, streaming.READ_CHUNK_BYTES // max(1, _nbytes(jax.ShapeDtypeStruct(t.shape[1:], _DTYPES[t.dtype]))))


def _hf_placement(name: str, t: _Tensor, sharding: Sharding) -> _Placement:
    """One HF tensor placed by `sharding`: each device reads only its slice, in blocks of rows."""
    rows = _rows_per_block(t)
    return _Placement(t.shape, sharding, lambda index: _read_slice(name, t, index),
                      lambda index: _even_blocks(index, t.shape, rows), 0)


def _host_tensor(name: str, t: _Tensor) -> np.ndarray:
    """One HF tensor in host memory, read in blocks of rows on READ_THREADS threads straight into it
    (disjoint blocks: no compiled write needs them of one shape, so no row is read twice)."""
    out = np.empty(t.shape, _DTYPES[t.dtype])

    def fill(block: tuple[slice, ...]) -> None:
        out[block] = _read_slice(name, t, block)

    blocks = _blocks((slice(None),) * len(t.shape), t.shape, 0, _rows_per_block(t))
    with contextlib.closing(_gather(fill, blocks)) as done:
        for _ in done:
            pass
    return out


def _host_param(
    tensors: Mapping[str, _Tensor], family: Family, path: str, want: jax.ShapeDtypeStruct
) -> np.ndarray:
    """One Flax parameter from its HF tensors, in host memory with numpy: no device is involved (a
    transposed tensor stays a view; tensorstore copies it a chunk at a time as it writes)."""
    names, layout = _entry(family, path)
    return layout.to_flax([_host_tensor(name, tensors[name]) for name in names], tuple(want.shape)).astype(
        want.dtype, copy=False)


def _param_bytes(tensors: Mapping[str, _Tensor], family: Family, path: str) -> int:
    return sum(tensors[name].nbytes for name in _entry(family, path)[0])
