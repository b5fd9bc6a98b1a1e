"""apd_jax's own checkpoints: config.json beside an orbax checkpoint of the flat parameters
(params/, OCDBT with zarr v2, in chunks of about READ_CHUNK_BYTES).

Writing: save_orbax from a model; convert_hf_to_orbax from lazy leaves, one HF parameter read,
converted and written at a time on the host alone; both on a thread of their own that Ctrl-C stops
between leaves. A model of 8-bit weights (apd_jax.models.quantize) is saved as its quantized leaves,
its mode recorded in config.json (QUANTIZATION_FIELD), and loaded back as it was saved. Reading: the leaves are checked against the model's shapes, then read with
tensorstore a few stored chunks at a time straight into each device's shard (the block reader).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util
from jax.sharding import Mesh, Sharding

from apd_jax.checkpoints import streaming
from apd_jax.checkpoints.errors import CheckpointError, _read_json, read_config
from apd_jax.checkpoints.flat import _flat_values, _keys, _nbytes, expected_shapes, model_from_params
from apd_jax.checkpoints.safetensors import _DTYPE_NAMES, _checked_index, _host_param, _param_bytes
from apd_jax.checkpoints.streaming import (
    _block_plan, _blocks, _device_arrays, _even_blocks, _Placement, _progress, _release_host_memory, _shardings,
)
from apd_jax.checkpoints.writes import _copy_configs, _listed, _outermost, atomic_dir, check_output
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.models.quantize import MODES, abstract_quantized, check_mode, quantization, quantized_params

# config.json's field naming the 8-bit mode of a checkpoint's weights (absent: unquantized).
QUANTIZATION_FIELD = "apd_jax_quantization"

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
        args = [dataclasses.replace(a, chunk_byte_size=streaming.READ_CHUNK_BYTES)
                for a in (args or [ocp.SaveArgs()] * len(values))]

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
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=streaming.READ_CHUNK_BYTES), tree)
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


def stored_quantization(ckpt_dir: Path) -> str | None:
    """The 8-bit mode config.json records for a checkpoint's weights (QUANTIZATION_FIELD), None if none."""
    file = ckpt_dir / "config.json"
    mode = _read_json(file).get(QUANTIZATION_FIELD) if file.is_file() else None
    if mode is not None and mode not in MODES:
        raise CheckpointError(f"{file}: {QUANTIZATION_FIELD} {mode!r} is none of {', '.join(MODES)}; {_RECONVERT}")
    return mode


def _record_quantization(ckpt_dir: Path, mode: str) -> None:
    file = ckpt_dir / "config.json"
    file.write_text(json.dumps(_read_json(file) | {QUANTIZATION_FIELD: mode}, indent=2))


def _quantized_leaves(
    cfg: ModelConfig, mode: str, read: Callable[[str], np.ndarray]
) -> dict[str, _LazyParam]:
    """The leaves of the model quantized with `mode`, as lazy parameters: the first leaf written of a
    weight reads it (`read`, its unquantized path) and quantizes it on the host's CPU device; its
    other leaves are kept until they are written."""
    target = abstract_quantized(cfg, mode)
    sources = list(expected_shapes(cfg))
    pending: dict[str, np.ndarray] = {}

    def leaf(source: str, path: str) -> np.ndarray:
        if path not in pending:
            with jax.default_device(jax.devices("cpu")[0]):
                tree = quantized_params(
                    traverse_util.unflatten_dict({tuple(_keys(source)): jnp.asarray(read(source))}), target)
                pending.update({".".join(map(str, k)): np.asarray(v)
                                for k, v in traverse_util.flatten_dict(tree).items()})
        return pending.pop(path)

    def source(path: str) -> str:  # the unquantized parameter a leaf is made of: itself or the weight it quantizes
        return next(p for p in sources if path == p or path.startswith(p + "."))

    return {path: _LazyParam(tuple(s.shape), np.dtype(s.dtype), functools.partial(leaf, source(path), path))
            for path, s in _flat_values(target).items()}


def convert_hf_to_orbax(
    hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, quantize: str | None = None
) -> Path:
    """HF checkpoint directory -> out_dir/{config.json, params/ (orbax)}; dtypes as stored, or the
    weights quantized with `quantize` (apd_jax.models.quantize's modes; recorded in config.json).

    Each parameter is read, converted and written before the next, on the host alone (numpy): no
    device array is made and nothing is compiled, so an accelerator's runtime costs it nothing
    (quantizing, each weight is quantized by small programs compiled for the host's CPU)."""
    hf_dir, out_dir = Path(hf_dir).expanduser(), Path(out_dir).expanduser()
    if quantize is not None:
        check_mode(quantize)
    check_output(out_dir, overwrite, sources=(hf_dir,))
    cfg = read_config(hf_dir)
    tensors = _checked_index(hf_dir, cfg)
    shapes = expected_shapes(cfg)
    family = cfg.family
    with _progress(f"converting {hf_dir.name}", sum(_param_bytes(tensors, family, p) for p in shapes)) as advance:

        def read(path: str) -> np.ndarray:
            array = _host_param(tensors, family, path, shapes[path])
            advance(_param_bytes(tensors, family, path))
            return array

        if quantize is None:
            lazy = {p: _LazyParam(tuple(s.shape), np.dtype(s.dtype), functools.partial(read, p))
                    for p, s in shapes.items()}
        else:
            lazy = _quantized_leaves(cfg, quantize, read)
        with atomic_dir(out_dir, overwrite, sources=(hf_dir,)) as tmp:
            _copy_configs(hf_dir, tmp)
            if quantize is not None:
                _record_quantization(tmp, quantize)
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
    if shape != tuple(want.shape) or (dtype not in _DTYPE_NAMES and dtype != np.dtype(want.dtype)):
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
) -> Transformer:
    """Restore a model saved by convert_hf_to_orbax (or save_orbax) straight onto the default device
    or, given a mesh, into each device's shard of each parameter (apd_jax.models.sharding's rules): no full
    copy of the model on the host, nor on one device of a mesh. A checkpoint of 8-bit weights loads as
    that quantized model (its 8-bit leaves as stored, its scales in `param_dtype`), on one device.
    """
    ckpt_dir = _orbax_dir(ckpt_dir)
    stored, mode = read_config(ckpt_dir), stored_quantization(ckpt_dir)
    if mode is not None and mesh is not None:
        raise ValueError(f"{ckpt_dir} holds {mode} weights, which load onto one device: drop the mesh, or "
                         "convert the checkpoint again without --quantize")
    shapes = expected_shapes(stored, mode)
    _saved_shapes(ckpt_dir, shapes)
    cfg = read_config(ckpt_dir, param_dtype=param_dtype, dtype=dtype)
    place, context = _shardings(cfg, mesh), ts.Context(_TS_CONTEXT)
    leaves = _device_arrays(_orbax_leaf(ckpt_dir / "params", path, want, place(path), context)
                            for path, want in shapes.items())
    params = {}
    with contextlib.closing(leaves), _progress(
            f"loading {ckpt_dir.name}", sum(_nbytes(s) for s in shapes.values())) as advance:
        for path, want in shapes.items():  # cast leaf by leaf: one parameter in two dtypes at a time
            leaf = next(leaves)  # 8-bit leaves stay as they are
            params[path] = leaf.astype(cfg.param_dtype) if np.dtype(want.dtype) in _DTYPE_NAMES else leaf
            _release_host_memory()
            advance(_nbytes(want))
    return model_from_params(cfg, params, mode)


def save_orbax(model: Transformer, out_dir: str | Path, hf_config: dict, *, overwrite: bool = False) -> Path:
    """Save a model's parameters with orbax beside its HF config.json (a quantized model's mode recorded there)."""
    mode = quantization(model)
    with atomic_dir(Path(out_dir).expanduser(), overwrite) as tmp:
        record = {} if mode is None else {QUANTIZATION_FIELD: mode}
        (tmp / "config.json").write_text(json.dumps(hf_config | record, indent=2))
        _save_params(tmp / "params", _flat_values(model))
    return Path(out_dir)


def _orbax_host_arrays(ckpt_dir: Path, specs: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, host array) in `specs` order, each leaf read whole with tensorstore (as load_orbax reads it)."""
    context = ts.Context(_TS_CONTEXT)
    for path, want in specs.items():
        _, read = _open_orbax_leaf(ckpt_dir / "params", path, want, context)
        yield path, read((slice(None),) * len(want.shape))
