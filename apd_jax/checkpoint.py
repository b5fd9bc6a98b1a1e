"""Checkpoints: Hugging Face safetensors <-> Flax parameters, and orbax save/restore.

The name mapping is apd_jax.params.PARAM_TABLE (Flax path -> its HF tensors and their
layout: fused q/k/v and gate/up projections hold several HF tensors each). Everything streams: a
checkpoint's names, shapes and dtypes are checked against the model's own abstract
shapes from the safetensors headers before any weight is read; then each parameter's
HF tensors (safetensors `safe_open`) or orbax leaf (tensorstore) are read in blocks of about
64 MB on a few threads, the next tensors' blocks read while this one's are placed (on a mesh each
device only its slice, read once for all the devices that hold the same slice), each block moved to
its device(s) as soon as it is read and the blocks joined there, then converted on the device: host memory
stays near a few blocks, never a whole tensor, let alone the model. Conversion writes orbax from lazy
leaves (one parameter read, converted and written at a time) and exports sharded
safetensors with an index, as the hub ships them. Outputs are written to a temporary
directory and renamed into place, so a failed or interrupted conversion leaves nothing behind; each
holds a manifest of what apd_jax wrote there, and overwrite replaces only such a directory that
holds nothing else (atomic_dir).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import glob
import importlib.metadata
import json
import math
import os
import platform
import secrets
import shutil
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from safetensors import SafetensorError, safe_open

from apd_jax.config import ModelConfig
from apd_jax.model import Qwen2, abstract_model
from apd_jax.params import param_entry
from apd_jax.progress import terminal_progress
from apd_jax.sharding import check_model, param_spec

# safetensors dtype names of the float dtypes a checkpoint may hold.
_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# The exponent bits of each float dtype: all set is Inf or NaN.
_EXPONENT = {np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
             np.dtype(np.float16): (np.uint16, 0x7C00)}
MAX_SHARD_SIZE = 5 * 10**9  # bytes per exported safetensors file, Hugging Face's save_pretrained default
READ_CHUNK_BYTES = 64 * 2**20  # a read block, and an orbax chunk as written
# Blocks read at once: several readers outpace one (page-cache copies and the NaN/Inf scan are
# CPU-bound), and the host holds at most about READ_THREADS blocks (each maybe twice, while it moves).
READ_THREADS = min(4, os.cpu_count() or 1)
_READERS = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="apd_jax_read")
PROGRESS_MIN_BYTES = 2**30  # smaller checkpoints load too fast for a progress bar to help


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


def _entry(path: str) -> tuple[tuple[str, ...], str]:
    """The Hugging Face names and layout of one Flax parameter (params.PARAM_TABLE)."""
    try:
        entry = param_entry(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return entry.hf, entry.layout


def _to_hf(layout: str, x: Any) -> list[Any]:
    """One Flax parameter as its Hugging Face tensors. Only slicing, reshapes and .T, so it
    serves numpy arrays and, under jax.eval_shape, abstract shapes alike."""
    if layout == "same":
        return [x]
    if layout == "T":
        return [x.T]
    if layout == "stack":
        return [x[:, j].T for j in range(x.shape[1])]
    g, lead = x.shape[-2] - 2, x.shape[:-3]  # "qkv": [..., kv_heads, g + 2, head_dim]
    return [part.reshape(*lead, -1).T for part in (x[..., :g, :], x[..., g, :], x[..., g + 1, :])]


def _to_flax(layout: str, tensors: list[Any], shape: tuple[int, ...]) -> Any:
    """The inverse of _to_hf: Hugging Face tensors -> one Flax parameter of `shape`, in the
    tensors' own array library (numpy on the host, jax.numpy on the device)."""
    xp = tensors[0].__array_namespace__()
    if layout == "same":
        return tensors[0]
    if layout == "T":
        return tensors[0].T
    if layout == "stack":
        return xp.stack([t.T for t in tensors], axis=1)
    *lead, kvh, _, d = shape
    q, k, v = (xp.reshape(t.T, (*lead, kvh, -1, d)) for t in tensors)
    return xp.concat([q, k, v], axis=-2)


def _hf_spec(layout: str, spec: jax.sharding.PartitionSpec, ndim: int) -> jax.sharding.PartitionSpec:
    """The partition of each of a parameter's HF tensors that makes _to_flax local to every device:
    a device reads exactly the HF rows/columns its shard of the Flax parameter is made of."""
    full = tuple(spec) + (None,) * (ndim - len(spec))
    if layout == "same":
        return jax.sharding.PartitionSpec(*full)
    if layout == "T":
        return jax.sharding.PartitionSpec(*full[::-1])
    if layout == "stack":  # [in, 2, inter] <- [inter, in] each
        return jax.sharding.PartitionSpec(full[2], full[0])
    return jax.sharding.PartitionSpec(full[-3], *full[:-3])  # "qkv": [..., kv_heads, g + 2, d] <- [rows, ...]


def _nbytes(spec: Any) -> int:
    """Bytes of an array or ShapeDtypeStruct."""
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def _flat_values(model: Qwen2) -> dict[str, Any]:
    """'layers.0.mlp.down_proj.kernel' -> value of every parameter (nnx's own flat state, keys joined)."""
    _, state = nnx.split(model)
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}


def expected_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat 'layers.0.mlp.down_proj.kernel' -> shape/dtype of every parameter, from the model itself."""
    return _flat_values(abstract_model(cfg))


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model -> the shape config.json implies for it."""
    shapes = {}
    for path, want in expected_shapes(cfg).items():
        names, layout = _entry(path)
        parts = jax.eval_shape(lambda x, layout=layout: _to_hf(layout, x), want)
        shapes.update({name: tuple(part.shape) for name, part in zip(names, parts)})
    return shapes


# ----------------------------------------------------------------------------- reading files


def _read_json(file: Path) -> dict:
    """A JSON object from `file`, or a CheckpointError naming the file and what is wrong."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); restore it from the model's original files") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_config(path: str | Path, **kw: Any) -> ModelConfig:
    """ModelConfig.from_dir, with malformed JSON reported as a CheckpointError naming the file."""
    path = Path(path).expanduser()
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            _read_json(path / name)
    return ModelConfig.from_dir(path, **kw)


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
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # tied: the head is the embedding; some exports store it anyway
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


def _blocks(index: tuple[slice, ...], shape: tuple[int, ...], axis: int, step: int) -> list[tuple[slice, ...]]:
    """`index` (one device's part of an array of `shape`) cut along `axis` into blocks of `step` elements."""
    if not shape:
        return [index]
    lo, hi, _ = index[axis].indices(shape[axis])
    return [(*index[:axis], slice(s, min(s + step, hi)), *index[axis + 1 :]) for s in range(lo, max(hi, lo + 1), step)]


def _block_plan(shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """(axis, step) of blocks of whole `chunk`s of about READ_CHUNK_BYTES: along the first axis the
    chunks split (a block then reads each chunk once), as many of them as fit."""
    if not chunk:
        return 0, 1
    axis = next((i for i, (c, n) in enumerate(zip(chunk, shape)) if c < n), 0)
    return axis, chunk[axis] * max(1, READ_CHUNK_BYTES // max(1, math.prod(chunk) * itemsize))


def _even_blocks(
    index: tuple[slice, ...], shape: tuple[int, ...], step: int, axis: int = 0, unit: int = 1
) -> list[tuple[slice, ...]]:
    """`index` (one device's part of an array of `shape`) cut along `axis` into blocks of one size, a
    multiple of `unit` (a stored chunk's length along `axis`; `step` is one too) of at most `step`:
    the units are split evenly and the last block ends at the end, overlapping its neighbour by fewer
    units than there are blocks (read twice, written twice with the same values). Every block of a
    shard then has the same shape: one compiled in-place write serves them all."""
    if not shape:
        return [index]
    lo, hi, _ = index[axis].indices(shape[axis])
    if hi - lo <= step:
        return [index]
    units = -(-(hi - lo) // unit)
    count = -(-units // max(1, step // unit))
    size = -(-units // count) * unit
    starts = [lo + k * size for k in range(count - 1)] + [hi - size]
    return [(*index[:axis], slice(s, s + size), *index[axis + 1 :]) for s in starts]


_END = object()


def _gather(fn: Callable[[Any], Any], items: Iterable[Any], window: int = READ_THREADS) -> Iterator[Any]:
    """fn(item) for each of `items` on the reader threads, yielded in order, with at most `window` calls
    submitted ahead of the one the caller waits for: a result is referenced only by the caller once
    yielded (its future is dropped), so at most about `window` + 1 results are alive. On an error, or
    when the caller closes the generator (contextlib.closing), the calls not yet started are cancelled
    and the running ones waited for (none is left writing into the caller's buffers), then it re-raises."""
    items, pending = iter(items), collections.deque()
    try:
        while True:
            while len(pending) < window and (item := next(items, _END)) is not _END:
                pending.append(_READERS.submit(fn, item))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        for f in pending:
            if not f.cancelled():
                f.exception()


@dataclasses.dataclass(frozen=True)
class _Placement:
    """One array to read onto its devices: its shape and `sharding`, `read(block)` -> the host block,
    `blocks(index)` -> the blocks of one device's part (`index`), cut along `axis`."""

    shape: tuple[int, ...]
    sharding: Sharding
    read: Callable[[tuple[slice, ...]], np.ndarray]
    blocks: Callable[[tuple[slice, ...]], list[tuple[slice, ...]]]
    axis: int


@dataclasses.dataclass(frozen=True)
class _Block:
    """One read: `index` of `array`, moved to `devices` (all that hold the same part) and written at
    `start` along the axis of their shard; `whole`: it is the whole shard; `last`: the array's last."""

    array: _Placement
    devices: tuple[jax.Device, ...]
    index: tuple[slice, ...]
    start: int
    whole: bool
    last: bool


def _block_reads(placements: Iterable[_Placement]) -> Iterator[_Block]:
    """Every block of every placement, in order. Devices that hold the same part (replicated axes)
    share its reads: each block is read once and moved to every device of its group."""
    for p in placements:
        by_index: dict[tuple, tuple[tuple[slice, ...], list[jax.Device]]] = {}
        for d, index in p.sharding.addressable_devices_indices_map(p.shape).items():
            by_index.setdefault(tuple(s.indices(n) for s, n in zip(index, p.shape)), (index, []))[1].append(d)
        reads = [(index, tuple(devices), b, len(parts) == 1)
                 for index, devices in by_index.values() for parts in [p.blocks(index)] for b in parts]
        for k, (index, devices, b, whole) in enumerate(reads):
            start = b[p.axis].indices(p.shape[p.axis])[0] - index[p.axis].indices(p.shape[p.axis])[0] if p.shape else 0
            yield _Block(p, devices, b, start, whole, k == len(reads) - 1)


def _device_arrays(placements: Iterable[_Placement]) -> Iterator[jax.Array]:
    """Each placement as a jax.Array, in order. The blocks of all of them are read on READ_THREADS
    threads, the next arrays' reads running while this one's are written (a model is hundreds of
    tensors of one or two blocks: reading them one array at a time would leave the readers idle),
    each block moved to its devices as soon as it is read and written there into its place in the
    shard (in place: the shard is donated; the shard itself is made on that device from the first
    block, never on the default device).
    The host holds only the blocks in flight (_gather: about READ_THREADS ahead of the one being
    written), never a whole tensor: each thread waits for its block's transfer (which may stage a
    second host copy) before it drops the host block, and a moved block is dropped once written."""

    def put(block: _Block) -> list[jax.Array]:
        host = block.array.read(block.index)
        return [jax.device_put(host, d).block_until_ready() for d in block.devices]

    shards: dict[jax.Device, jax.Array] = {}
    blocks = _block_reads(placements)
    pending = collections.deque()  # the blocks _gather has taken, in order, to pair with its results

    def taken() -> Iterator[_Block]:
        for b in blocks:
            pending.append(b)
            yield b

    with contextlib.closing(_gather(put, taken())) as results:
        for moved in results:
            b = pending.popleft()
            p = b.array
            for device, part in zip(b.devices, moved):
                if device in shards:
                    shards[device] = _put_block(shards[device], part, b.start, p.axis)
                elif b.whole:
                    shards[device] = part
                else:
                    shards[device] = _shard_from_block(part, p.sharding.shard_shape(p.shape), p.axis)
            del moved, part  # the next block is awaited holding no other
            if b.last:
                devices = p.sharding.addressable_devices_indices_map(p.shape)
                yield jax.make_array_from_single_device_arrays(p.shape, p.sharding, [shards.pop(d) for d in devices])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _shard_from_block(block: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """A shard of `shape` on `block`'s own device, `block` at its start along `axis`, zeros elsewhere
    (jnp.zeros(device=...) would fill it on the default device and copy it over)."""
    return jax.lax.dynamic_update_slice_in_dim(jax.numpy.zeros(shape, block.dtype), block, 0, axis)


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _put_block(shard: jax.Array, block: jax.Array, start: int, axis: int) -> jax.Array:
    """`block` written into `shard` from `start` along `axis`, in place (the shard is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(shard, block, start, axis)


def _rows_per_block(t: _Tensor) -> int:
    """Rows of one HF tensor in a block of about READ_CHUNK_BYTES."""
    return max(1, READ_CHUNK_BYTES // max(1, _nbytes(jax.ShapeDtypeStruct(t.shape[1:], _DTYPES[t.dtype]))))


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


def _host_param(tensors: Mapping[str, _Tensor], path: str, want: jax.ShapeDtypeStruct) -> np.ndarray:
    """One Flax parameter from its HF tensors, in host memory with numpy: no device is involved (a
    transposed tensor stays a view; tensorstore copies it a chunk at a time as it writes)."""
    names, layout = _entry(path)
    return _to_flax(layout, [_host_tensor(name, tensors[name]) for name in names], tuple(want.shape)).astype(
        want.dtype, copy=False)


@functools.cache
def _converter(layout: str, shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> Callable[..., jax.Array]:
    """HF tensors -> one Flax parameter, compiled once per (layout, shape, dtype, placement)."""
    return jax.jit(lambda *tensors: _to_flax(layout, list(tensors), shape).astype(dtype), out_shardings=sharding)


def _hf_sharding(layout: str, sharding: Sharding, ndim: int) -> Sharding:
    """Where a parameter's HF tensors go so that converting them is local to each device."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, _hf_spec(layout, sharding.spec, ndim))
    return sharding


def _shardings(cfg: ModelConfig, mesh: Mesh | None) -> Callable[[str], Sharding]:
    """Where each parameter goes: its PARAM_TABLE spec on `mesh`, or the default device."""
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return lambda path: device
    check_model(cfg, mesh)
    return lambda path: NamedSharding(mesh, param_spec(path))


def _progress(description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """A progress bar over `total` bytes on a terminal, for checkpoints worth waiting for."""
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    return terminal_progress(columns, description, total, show=total >= PROGRESS_MIN_BYTES)


def _param_bytes(tensors: Mapping[str, _Tensor], path: str) -> int:
    return sum(tensors[name].nbytes for name in _entry(path)[0])


def load_hf_params(
    path: str | Path, cfg: ModelConfig, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """A HF checkpoint's flat Flax parameters, streamed to the device (or `mesh`) in blocks."""
    path = Path(path).expanduser()
    tensors, place = _checked_index(path, cfg), _shardings(cfg, mesh)
    shapes = expected_shapes(cfg)
    entries = {p: _entry(p) for p in shapes}
    parts = _device_arrays(
        _hf_placement(name, tensors[name], _hf_sharding(layout, place(p), len(shapes[p].shape)))
        for p, (names, layout) in entries.items() for name in names)
    params = {}
    with contextlib.closing(parts), _progress(
            f"loading {path.name}", sum(_param_bytes(tensors, p) for p in shapes)) as advance:
        for p, want in shapes.items():
            names, layout = entries[p]
            hf = [next(parts) for _ in names]
            if layout == "same" and hf[0].dtype == want.dtype:
                params[p] = hf[0]
            else:
                params[p] = _converter(layout, tuple(want.shape), want.dtype, place(p))(*hf)
            del hf  # freed on the device once converted
            _release_host_memory()
            advance(_param_bytes(tensors, p))
    return params


def model_from_params(cfg: ModelConfig, params: dict[str, Any]) -> Qwen2:
    """Build a model whose parameters are `params` (flat Flax paths), placed on the default device
    unless they are jax arrays already."""
    graphdef, state = nnx.split(abstract_model(cfg))
    tree = traverse_util.unflatten_dict({tuple(_keys(k)): jax.numpy.asarray(v) for k, v in params.items()})
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def _keys(path: str) -> list[str | int]:
    """'layers.0.mlp' -> ['layers', 0, 'mlp']: nnx's own keys (layer indices are ints)."""
    return [int(k) if k.isdigit() else k for k in path.split(".")]


def model_params(model: Qwen2) -> dict[str, np.ndarray]:
    """Flat Flax parameters of a model, as host numpy arrays."""
    return {path: np.asarray(value) for path, value in _flat_values(model).items()}


def load_hf(path: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None) -> Qwen2:
    """A Flax model from a Hugging Face checkpoint directory (config.json + safetensors),
    streamed tensor by tensor onto the default device or, given a mesh, into each device's shard."""
    cfg = read_config(path, param_dtype=param_dtype, dtype=dtype)
    return model_from_params(cfg, load_hf_params(path, cfg, mesh))


PARTIAL_MARKER = ".apd_jax_partial"  # in a temporary output directory while it is being written
# In every directory apd_jax writes (atomic_dir): what it wrote there, so that overwrite replaces a
# directory only when it holds nothing else (a user's README.md, .git/ or runs/ are never deleted).
WRITTEN_MANIFEST = ".apd_jax_written.json"
_OURS = {PARTIAL_MARKER, WRITTEN_MANIFEST}


def _entries(root: Path) -> set[str]:
    """Every file, directory and link under `root`, relative to it (links are not followed)."""
    found = set()
    for parent, dirs, files in os.walk(root):
        rel = Path(parent).relative_to(root)
        found.update(str(rel / name) for name in dirs + files)
    return found


def _write_manifest(directory: Path) -> None:
    files = sorted(_entries(directory) - _OURS)
    manifest = {"writer": "apd_jax", "version": _version(), "files": files}
    (directory / WRITTEN_MANIFEST).write_text(json.dumps(manifest, indent=1))


def _version() -> str:
    try:
        return importlib.metadata.version("apd_jax")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that is not pip-installed
        return "unknown"


def _listed(directory: Path) -> set[str] | None:
    """The entries apd_jax's manifest in `directory` says it wrote; None without a readable manifest."""
    try:
        manifest = json.loads((directory / WRITTEN_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) and manifest.get("writer") == "apd_jax" else None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def _outermost(entries: set[str], limit: int = 4) -> str:
    """Up to `limit` of `entries`, each folder named once (not its contents), for a message."""
    top = sorted(e for e in entries if str(Path(e).parent) not in entries)
    more = f" and {len(top) - limit} more" if len(top) > limit else ""
    return ", ".join(top[:limit]) + more


def _check_replaceable(out: Path) -> None:
    """Raise unless overwrite may replace `out`: an empty directory, or one whose manifest lists
    everything it holds (apd_jax wrote it and no one added to it)."""
    refuse = ("--overwrite (overwrite=True) replaces only a directory apd_jax wrote: remove it yourself or choose "
              "another output directory")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; {refuse}")
    entries = _entries(out) - {PARTIAL_MARKER}
    if not entries:
        return
    listed = _listed(out)
    if listed is None:
        raise FileExistsError(
            f"{out} was not written by apd_jax (it has no {WRITTEN_MANIFEST}, as directories written by other "
            f"tools or by earlier versions of apd_jax do not); {refuse}"
        )
    foreign = entries - listed - _OURS
    if foreign:
        raise FileExistsError(f"{out} holds files apd_jax did not write ({_outermost(foreign)}); {refuse}")


def _check_writable(out: Path) -> None:
    """Raise unless `out` can be made: the nearest existing folder above it is a directory this user may write."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(
            f"cannot write {out}: {parent} is a file, not a directory; choose another output directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"cannot write {out}: {parent} is not writable (permissions, or a read-only or immutable file system); "
            "choose a writable output directory"
        )


def check_output(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> None:
    """Refuse an output directory before any work: one that is, is inside or holds a source, one that
    exists (unless overwrite, and then only one apd_jax wrote), or one that cannot be written."""
    target = out.resolve()
    for src in sources:
        src_real = Path(src).expanduser().resolve()
        if target == src_real:
            raise ValueError(f"output directory {out} is the source {src}; choose another output directory")
        if src_real in target.parents:
            raise ValueError(f"output directory {out} is inside the source {src}; choose a directory outside it")
        if target in src_real.parents:
            raise ValueError(
                f"output directory {out} contains the source {src}: replacing it would delete the source; "
                "choose another output directory"
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{out} already exists; choose another output directory, or pass --overwrite (overwrite=True from "
                "Python) to replace a directory apd_jax wrote"
            )
        _check_replaceable(out)
    _check_writable(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove `.NAME.*` temporary directories of `out` that an interrupted run of this machine left:
    only those holding apd_jax's marker whose writing process has gone."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*"):
        marker = tmp / PARTIAL_MARKER
        if tmp.is_symlink() or not marker.is_file():
            continue
        try:
            owner = json.loads(marker.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not _pid_alive(pid):
            _remove_tmp(tmp)


def _marked_tmp(out: Path) -> Path:
    """A new hidden sibling `.NAME.XXXXXXXX` of `out`, marked as this process's at once; made with
    the user's umask (as any folder they make), since it becomes the output."""
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def _remove_tmp(tmp: Path) -> None:
    """Remove a marked temporary directory, its marker last: one that cannot be removed whole stays
    marked, so a later run removes it."""
    for child in tmp.iterdir():
        if child.name == PARTIAL_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if all(child.name == PARTIAL_MARKER for child in tmp.iterdir()):
        (tmp / PARTIAL_MARKER).unlink(missing_ok=True)
        tmp.rmdir()


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool, *, sources: Iterable[Path] = ()) -> Iterator[Path]:
    """A temporary sibling directory that replaces `out` only if the `with` body succeeds, with
    apd_jax's manifest of what it holds (WRITTEN_MANIFEST). An error or Ctrl-C leaves `out` as it
    was and removes the temporary directory: the body must have stopped writing into it (see
    _save_params). `out` is checked by check_output; leftovers of killed runs (marked temporary
    directories) are removed."""
    out = Path(out).expanduser()
    check_output(out, overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    tmp, old = _marked_tmp(out), None
    try:
        yield tmp
        _write_manifest(tmp)
        if out.exists():
            old = _marked_tmp(out)  # the replaced directory waits here, marked, until the new one is in place
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            (old / out.name).rename(out)  # the replaced directory back in its place
        for path in (tmp, old):
            if path is not None and path.exists():
                _remove_tmp(path)
        raise
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    if old is not None:
        _remove_tmp(old)


# Copied alongside the weights so a converted directory is self-contained.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json",
)


def _copy_configs(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ----------------------------------------------------------------------------- orbax


@dataclasses.dataclass(frozen=True)
class _LazyParam:
    """An orbax leaf that is read only when it is written: conversion never holds the model."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]


class _LazyParamHandler(ocp.type_handlers.NumpyHandler):
    """Saves _LazyParam leaves as numpy arrays, one at a time (orbax's own handler writes a batch
    concurrently, which would read every leaf at once); restored by the standard handlers.

    The writing stops before the next leaf once `stop` is set, or when a leaf's read fails: that
    error is kept in `error` for _save_params to raise in the caller's thread (raised in orbax's
    writer thread, absl would log it with its traceback first)."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop
        self.error: Exception | None = None

    async def serialize(self, values, infos, args=None):  # noqa: ANN001 (orbax's TypeHandler signature)
        # Chunks of READ_CHUNK_BYTES: a sharded restore reads only the chunks of its own slice.
        args = [dataclasses.replace(a, chunk_byte_size=READ_CHUNK_BYTES) for a in (args or [ocp.SaveArgs()] * len(values))]

        async def write_one_by_one() -> None:
            for value, info, arg in zip(values, infos, args):
                if self.stop.is_set():
                    return
                try:
                    array = value.read()
                except Exception as err:
                    self.error = err
                    return
                await self._background_serialize([array], [info], [arg])
                del array
                _release_host_memory()

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_one_by_one(), name="apd_jax_lazy_params")]

    async def _open_and_write(self, value: np.ndarray, tspec: dict, ts_context: Any) -> None:
        """Written a few whole chunks at a time: tensorstore buffers those, not a copy of the array."""
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        if value.ndim == 0:
            return await t.write(value)
        axis, step = _block_plan(value.shape, tuple(t.chunk_layout.write_chunk.shape), value.itemsize)
        for block in _blocks((slice(None),) * value.ndim, value.shape, axis, step):
            await t[block].write(value[block])


def _release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold,
    which a long run of mid-sized parameters turns into hundreds of MB of resident memory)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform == "linux" and platform.libc_ver()[0] == "glibc" else None


def _save_params(directory: Path, params: Mapping[str, Any]) -> None:
    """Flat Flax parameters (arrays or _LazyParam) -> an orbax checkpoint at `directory`, written
    on a thread of its own (_write_until_stopped): Ctrl-C stops it between leaves."""
    stop = threading.Event()
    lazy = _LazyParamHandler(stop)
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (_LazyParam, lazy),
    )
    tree = traverse_util.unflatten_dict(params, sep=".")
    # Every leaf in chunks of about READ_CHUNK_BYTES (orbax's default is one chunk per leaf, which a
    # load would read whole), in the layout _orbax_leaf reads: OCDBT with zarr v2 (not zarr3).
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=READ_CHUNK_BYTES), tree)
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=True, use_zarr3=False)

    def save() -> None:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(directory.absolute(), args=ocp.args.PyTreeSave(tree, save_args=save_args))

    _write_until_stopped(save, stop)
    if lazy.error is not None:
        raise lazy.error


def _write_until_stopped(write: Callable[[], None], stop: threading.Event) -> None:
    """write() on a thread of its own, awaited. Ctrl-C raises KeyboardInterrupt in the main thread
    only, anywhere (inside orbax too, while its threads go on writing): here it sets `stop` and
    raises only once write() has returned, so that the caller's cleanup removes a directory nothing
    writes into any more. A second Ctrl-C while waiting is ignored; the wait is one parameter.
    (Awaited through an Event: a Thread.join interrupted by Ctrl-C marks the thread as finished
    while it still runs, in Python before 3.13.)"""
    failed: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            write()
        except BaseException as err:  # raised in the caller's thread below
            failed.append(err)
        finally:
            done.set()

    threading.Thread(target=run, name="apd_jax_write").start()
    try:
        done.wait()
    except KeyboardInterrupt:
        stop.set()
        while not done.is_set():
            with contextlib.suppress(KeyboardInterrupt):
                done.wait()
        raise
    if failed:
        raise failed[0]


def convert_hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """HF checkpoint directory -> out_dir/{config.json, params/ (orbax)}; dtypes as stored.

    Each parameter is read, converted and written before the next, on the host alone (numpy): no
    device array is made and nothing is compiled, so an accelerator's runtime costs it nothing."""
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    check_output(out_dir, overwrite, sources=(hf_dir,))
    cfg = read_config(hf_dir)
    tensors = _checked_index(hf_dir, cfg)
    shapes = expected_shapes(cfg)
    with _progress(f"converting {hf_dir.name}", sum(_param_bytes(tensors, p) for p in shapes)) as advance:

        def read(path: str) -> np.ndarray:
            array = _host_param(tensors, path, shapes[path])
            advance(_param_bytes(tensors, path))
            return array

        lazy = {p: _LazyParam(tuple(s.shape), np.dtype(s.dtype), functools.partial(read, p)) for p, s in shapes.items()}
        with atomic_dir(out_dir, overwrite, sources=(hf_dir,)) as tmp:
            _copy_configs(hf_dir, tmp)
            _save_params(tmp / "params", lazy)
    return out_dir


_RECONVERT = "convert the checkpoint again from its Hugging Face directory (apd-jax convert hf-to-flax)"
_UNFUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # names of apd_jax's layout before the fusion


def _gone(ckpt_dir: Path) -> str | None:
    """The files apd_jax wrote in a checkpoint (its manifest) that are missing, for a message; None if none are."""
    gone = {name for name in _listed(ckpt_dir) or set() if not (ckpt_dir / name).exists()}
    return f"files apd_jax wrote there are missing: {_outermost(gone, 2)}" if gone else None


def _damage(ckpt_dir: Path) -> str:
    """What is known to be wrong with a checkpoint whose data cannot be read: the files apd_jax wrote
    there that are gone, else that a data file is damaged."""
    return _gone(ckpt_dir) or "a data file is damaged (truncated or overwritten)"


def _check_written_files(ckpt_dir: Path) -> None:
    """Every file apd_jax wrote in the checkpoint is there: checked before orbax reads it, whose reading
    threads, given a folder with parts missing, print tracebacks past the error."""
    gone = _gone(ckpt_dir)
    if gone:
        raise CheckpointError(f"{ckpt_dir} is damaged: {gone}; {_RECONVERT}")


def _check_metadata_file(ckpt_dir: Path) -> None:
    """orbax's list of the arrays (params/_METADATA) is there and readable JSON: orbax itself only logs
    a warning without it, and then reports no arrays at all."""
    file = ckpt_dir / "params" / "_METADATA"
    if not file.is_file():
        raise CheckpointError(f"{ckpt_dir} is damaged: {file} (orbax's list of its arrays) is missing; {_RECONVERT}")
    try:
        json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt_dir} is damaged: {file} is not valid JSON ({err}); {_RECONVERT}") from None


def _saved_shapes(ckpt_dir: Path, shapes: Mapping[str, Any]) -> dict[str, Any]:
    """The orbax checkpoint's array metadata, checked to hold exactly this model's parameters."""
    _check_metadata_file(ckpt_dir)
    _check_written_files(ckpt_dir)
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata((ckpt_dir / "params").absolute()).item_metadata
    if metadata is None:
        raise CheckpointError(f"{ckpt_dir} is damaged: orbax cannot read the list of its arrays; {_RECONVERT}")
    saved = {".".join(str(k.key) for k in path): m for path, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
    unexpected, missing = sorted(set(saved) - set(shapes)), sorted(set(shapes) - set(saved))
    if unexpected or missing:
        unfused = any(name in path for path in unexpected for name in _UNFUSED)
        why = ("it was saved by an apd_jax before the fused q/k/v and gate/up projections" if unfused
               else "its params/ does not hold the parameters its config.json describes")
        raise CheckpointError(
            f"{ckpt_dir}: {why} (unexpected {unexpected[:4]}, missing {missing[:4]}): it must be converted again "
            "from its Hugging Face directory (apd-jax convert hf-to-flax)"
        )
    return saved


# orbax's own context for reading its checkpoints: a cache for the OCDBT B-tree nodes only (array
# chunks are read once, so caching them would only hold host memory).
_TS_CONTEXT = {"file_io_concurrency": {"limit": 128}, "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}}


def _open_orbax_leaf(
    params_dir: Path, path: str, want: jax.ShapeDtypeStruct, context: ts.Context
) -> tuple[ts.TensorStore, Callable[[tuple[slice, ...]], np.ndarray]]:
    """One leaf of an orbax checkpoint (OCDBT, zarr, as _save_params writes them), checked to have
    `want`'s shape, and `read(index)` -> that part of it in host memory."""
    spec = {"driver": "zarr", "recheck_cached_metadata": False, "recheck_cached_data": False,
            "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/", "path": path,
                        "cache_pool": "cache_pool#ocdbt"}}
    try:
        t = ts.open(spec, open=True, read=True, context=context).result()
    except ValueError as err:
        raise CheckpointError(
            f"{params_dir} has no readable array {path!r} ({_damage(params_dir.parent)}: {err}); {_RECONVERT}"
        ) from None

    def read(index: tuple[slice, ...]) -> np.ndarray:
        try:
            return t[index].read().result()
        except ValueError as err:
            raise CheckpointError(
                f"{params_dir}: reading {path!r} failed ({_damage(params_dir.parent)}: {err}); {_RECONVERT}"
            ) from None

    shape, dtype = tuple(t.shape), np.dtype(t.dtype.numpy_dtype)
    if shape != tuple(want.shape) or dtype not in _DTYPE_NAMES:
        raise CheckpointError(
            f"{params_dir.parent}: parameter {path!r} is stored with shape {shape} ({dtype}), but "
            f"{params_dir.parent / 'config.json'} implies {tuple(want.shape)}: the config.json does not match the "
            "weights; convert the checkpoint again from its Hugging Face directory"
        )
    return t, read


def _orbax_leaf(
    params_dir: Path, path: str, want: jax.ShapeDtypeStruct, sharding: Sharding, context: ts.Context
) -> _Placement:
    """One leaf of an orbax checkpoint, to be read with tensorstore straight into `sharding`, a few
    stored chunks at a time (_device_arrays). Orbax's restore reads each leaf whole into host
    memory first and lets reads run ahead of the transfers to the device, so a model's restore held
    several GB of host buffers whatever restore_concurrent_gb said."""
    t, read = _open_orbax_leaf(params_dir, path, want, context)
    shape = tuple(t.shape)
    axis, step = _block_plan(shape, tuple(t.chunk_layout.read_chunk.shape), t.dtype.numpy_dtype.itemsize)
    unit = t.chunk_layout.read_chunk.shape[axis] if shape else 1
    return _Placement(shape, sharding, read, lambda index: _even_blocks(index, shape, step, axis, unit), axis)


def _orbax_dir(ckpt_dir: str | Path) -> Path:
    ckpt_dir = Path(ckpt_dir).expanduser()
    if not (ckpt_dir / "params").is_dir() and any(ckpt_dir.glob("*.safetensors")):
        raise CheckpointError(
            f"{ckpt_dir} is a Hugging Face checkpoint (safetensors), not an apd_jax one: apd-jax loads it as it is; "
            "`apd-jax convert hf-to-flax` makes an apd_jax checkpoint of it"
        )
    if not (ckpt_dir / "params").is_dir():
        raise CheckpointError(f"{ckpt_dir} is not an apd_jax checkpoint: {ckpt_dir / 'params'} is missing")
    return ckpt_dir


def load_orbax(
    ckpt_dir: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None
) -> Qwen2:
    """Restore a model saved by convert_hf_to_orbax (or save_orbax) straight onto the default device
    or, given a mesh, into each device's shard of each parameter (apd_jax.sharding's rules): no full
    copy of the model on the host, nor on one device of a mesh.
    """
    ckpt_dir = _orbax_dir(ckpt_dir)
    stored = read_config(ckpt_dir)
    shapes = expected_shapes(stored)
    _saved_shapes(ckpt_dir, shapes)
    cfg = read_config(ckpt_dir, param_dtype=param_dtype, dtype=dtype)
    place, context = _shardings(cfg, mesh), ts.Context(_TS_CONTEXT)
    leaves = _device_arrays(_orbax_leaf(ckpt_dir / "params", path, want, place(path), context)
                            for path, want in shapes.items())
    params = {}
    with contextlib.closing(leaves), _progress(
            f"loading {ckpt_dir.name}", sum(_nbytes(s) for s in shapes.values())) as advance:
        for path, want in shapes.items():  # cast leaf by leaf: one parameter in two dtypes at a time
            params[path] = next(leaves).astype(cfg.param_dtype)
            _release_host_memory()
            advance(_nbytes(want))
    return model_from_params(cfg, params)


def save_orbax(model: Qwen2, out_dir: str | Path, hf_config: dict, *, overwrite: bool = False) -> Path:
    """Save a model's parameters with orbax beside its HF config.json."""
    with atomic_dir(Path(out_dir).expanduser(), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        _save_params(tmp / "params", _flat_values(model))
    return Path(out_dir)


# ----------------------------------------------------------------------------- safetensors export


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


def _write_safetensors(file: Path, specs: Mapping[str, Any], arrays: Iterator[tuple[str, Any]]) -> None:
    """A safetensors file written tensor by tensor: the header first (every shape is known), then
    each Flax parameter's HF tensors as `arrays` yields it, so only one parameter is in memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for path, s in specs.items():
        names, layout = _entry(path)
        for name, part in zip(names, jax.eval_shape(lambda x, layout=layout: _to_hf(layout, x), s)):
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
            for part in _to_hf(_entry(path)[1], np.asarray(array)):
                f.write(np.ascontiguousarray(part).reshape(-1).view(np.uint8).data)  # bytes, any dtype


def _write_hf(
    specs: Mapping[str, Any], arrays: Iterator[tuple[str, Any]], config_dir: Path, out_dir: Path, *,
    overwrite: bool, max_shard_size: int,
) -> Path:
    """Flax parameters (yielded in `specs` order) -> a HF directory: one model.safetensors when it
    fits in max_shard_size, else model-0000k-of-0000n.safetensors and model.safetensors.index.json."""
    plan = _shard_plan(specs, max_shard_size)
    files = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))
    ]
    weight_map = {}
    with atomic_dir(out_dir, overwrite, sources=(config_dir,)) as tmp:
        _copy_configs(config_dir, tmp)
        for file, paths in zip(files, plan):
            _write_safetensors(tmp / file, {p: specs[p] for p in paths}, arrays)
            weight_map.update({name: file for p in paths for name in _entry(p)[0]})
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
    return _write_hf(specs, iter(params.items()), config_dir, out_dir, overwrite=overwrite,
                     max_shard_size=max_shard_size)


def _orbax_host_arrays(ckpt_dir: Path, specs: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, host array) in `specs` order, each leaf read whole with tensorstore (as load_orbax reads it)."""
    context = ts.Context(_TS_CONTEXT)
    for path, want in specs.items():
        _, read = _open_orbax_leaf(ckpt_dir / "params", path, want, context)
        yield path, read((slice(None),) * len(want.shape))


def convert_orbax_to_hf(
    ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, max_shard_size: int = MAX_SHARD_SIZE
) -> Path:
    """apd_jax orbax checkpoint -> HF directory (sharded like the hub's), dtypes as stored; one
    parameter is read and written at a time."""
    out_dir = Path(out_dir).expanduser()
    check_output(out_dir, overwrite, sources=(Path(ckpt_dir).expanduser(),))
    ckpt_dir = _orbax_dir(ckpt_dir)
    cfg = read_config(ckpt_dir)
    saved = _saved_shapes(ckpt_dir, expected_shapes(cfg))
    specs = {p: jax.ShapeDtypeStruct(tuple(saved[p].shape), saved[p].dtype) for p in expected_shapes(cfg)}
    arrays = _orbax_host_arrays(ckpt_dir, specs)
    return _write_hf(specs, arrays, ckpt_dir, out_dir, overwrite=overwrite,
                     max_shard_size=max_shard_size)


def _directory_argument(function: str, path: Any) -> Path:
    """The checkpoint directory given to `function`, `~` expanded; not a str or Path: a TypeError naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function}(path={path!r}): expected a checkpoint directory as a str or Path, "
                        f"not {type(path).__name__}")
    return Path(path).expanduser()


def load_model(path: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None) -> Qwen2:
    """An apd_jax (orbax) directory or a Hugging Face directory, whichever `path` is, streamed onto
    the default device or into each device's shard of `mesh`."""
    path = _directory_argument("load_model", path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"load_model: {path} is a file; expected a checkpoint directory (a Hugging Face one: config.json and "
            "*.safetensors, or an apd_jax one: config.json and params/)"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    if (path / "params").is_dir():
        return load_orbax(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh)
    return load_hf(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh)


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved beside a checkpoint.

    transformers does not know Dream's model_type: AutoTokenizer then falls back to a generic config
    read with PretrainedConfig.from_pretrained, which warns on every run ("You are using a model of
    type `Dream` to instantiate a model of type ``"). The same generic config, built from the dict,
    is handed over instead: the same tokenizer, no warning."""
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = _directory_argument("load_tokenizer", path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); copy the model's tokenizer files "
            "there, or pass token ids with --ids"
        )
    config = None
    if (path / "config.json").is_file():
        fields = _read_json(path / "config.json")
        config = None if fields.get("model_type") in CONFIG_MAPPING else PretrainedConfig.from_dict(fields)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    # Its warning about a text longer than model_max_length, marked as given already: apd_jax checks every
    # prompt against the caches' capacity itself and names the prompt (generation.capacity).
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer
