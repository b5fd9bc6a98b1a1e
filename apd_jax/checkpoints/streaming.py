"""The block reader: arrays read in blocks of about READ_CHUNK_BYTES on a few threads and placed onto
their devices as they come.

Each array (a _Placement: its shape, its sharding, how to read a block of it) is cut into blocks,
per device only its own part, read once for all the devices that hold the same part; the next
arrays' blocks are read while this one's are placed, each block moved to its device(s) as soon as
it is read and written into its place in the shard there. The host holds only the blocks in
flight, never a whole tensor. Also here: where each parameter goes (_shardings), its HF tensors'
placement and on-device conversion (_hf_sharding, _converter), the progress bar of a load, and
handing freed heap memory back to the OS.

READ_CHUNK_BYTES is read at call time, here and by the safetensors and orbax modules (which use
`streaming.READ_CHUNK_BYTES`): one setting governs the blocks read and the chunks orbax writes.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding

from apd_jax.models.config import ModelConfig
from apd_jax.models.layouts import Layout
from apd_jax.models.sharding import check_model, param_spec
from apd_jax.utils.progress import terminal_progress

READ_CHUNK_BYTES = 64 * 2**20  # a read block, and an orbax chunk as written
# Blocks read at once: several readers outpace one (page-cache copies and the NaN/Inf scan are
# CPU-bound), and the host holds at most about READ_THREADS blocks (each maybe twice, while it moves).
READ_THREADS = min(4, os.cpu_count() or 1)
PROGRESS_MIN_BYTES = 2**30  # smaller checkpoints load too fast for a progress bar to help


@functools.cache
def _readers() -> ThreadPoolExecutor:
    """The reader threads, started on the first read (importing this module starts none)."""
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="apd_jax_read")


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
                pending.append(_readers().submit(fn, item))
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


@functools.cache
def _converter(layout: Layout, shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> Callable[..., jax.Array]:
    """HF tensors -> one Flax parameter, compiled once per (layout, shape, dtype, placement)."""
    return jax.jit(lambda *tensors: layout.to_flax(list(tensors), shape).astype(dtype), out_shardings=sharding)


def _hf_sharding(layout: Layout, sharding: Sharding, ndim: int) -> Sharding:
    """Where a parameter's HF tensors go so that converting them is local to each device."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, layout.hf_spec(sharding.spec, ndim))
    return sharding


def _shardings(cfg: ModelConfig, mesh: Mesh | None) -> Callable[[str], Sharding]:
    """Where each parameter goes: its family's spec on `mesh`, or the default device."""
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return lambda path: device
    check_model(cfg, mesh)
    return lambda path: NamedSharding(mesh, param_spec(path, cfg.family))


def _progress(description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """A progress bar over `total` bytes on a terminal, for checkpoints worth waiting for."""
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    return terminal_progress(columns, description, total, show=total >= PROGRESS_MIN_BYTES)


def _release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold,
    which a long run of mid-sized parameters turns into hundreds of MB of resident memory)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, opened on first use; None elsewhere (no malloc_trim to call)."""
    return ctypes.CDLL("libc.so.6") if sys.platform == "linux" and platform.libc_ver()[0] == "glibc" else None
