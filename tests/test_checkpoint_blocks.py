"""The block reader: how many blocks are alive at once, and how failures stop it."""

import json
import math
import threading
import weakref

import jax
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from apd_jax import checkpoints as checkpoint
from apd_jax.checkpoints.streaming import READ_THREADS, _blocks, _device_arrays, _even_blocks, _gather, _Placement


class Block:
    def __init__(self, k):
        self.k = k


def test_gather_yields_in_order_and_keeps_a_few_results_alive():
    live = weakref.WeakSet()
    peak = 0

    def make(k):
        b = Block(k)
        live.add(b)
        return b

    got = []
    for b in _gather(make, range(50)):
        peak = max(peak, len(live))
        got.append(b.k)
        del b
    assert got == list(range(50))
    assert peak <= READ_THREADS + 2, peak


def test_gather_stops_reading_after_a_failure():
    calls, lock = [], threading.Lock()

    def fail_at_3(k):
        with lock:
            calls.append(k)
        if k == 3:
            raise RuntimeError("bad block")
        return k

    with pytest.raises(RuntimeError, match="bad block"):
        list(_gather(fail_at_3, range(100)))
    assert len(calls) <= 3 + READ_THREADS + 1, calls


def test_device_array_holds_a_few_blocks_not_the_tensor(monkeypatch):
    # 64 blocks of one row: the moved blocks are dropped as they are written, and only about
    # READ_THREADS are read ahead of the one being written.
    refs = []
    peak = 0
    real_put = jax.device_put

    def put(x, device):
        y = real_put(x, device)
        refs.append(weakref.ref(y))
        return y

    def read(index):
        nonlocal peak
        peak = max(peak, sum(r() is not None for r in refs))
        return full[index]

    monkeypatch.setattr("jax.device_put", put)
    full = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    (out,) = _device_arrays([_Placement(full.shape, SingleDeviceSharding(jax.devices()[0]), read,
                                        lambda index: _blocks(index, full.shape, 0, 1), 0)])
    np.testing.assert_array_equal(np.asarray(out), full)
    assert peak <= READ_THREADS + 3, peak


@pytest.mark.skipif(READ_THREADS < 2, reason="one reader thread cannot overlap reads")
def test_reads_run_ahead_across_arrays():
    # A model is hundreds of one-block tensors: their reads must overlap, not wait for each array in
    # turn. Every read waits at a barrier until READ_THREADS reads (of as many arrays) have come, so
    # reads one array at a time would fail.
    barrier = threading.Barrier(READ_THREADS, timeout=20)
    arrays = [np.full((3, 2), k, np.float32) for k in range(2 * READ_THREADS)]

    def reader(x):
        def read(index):
            barrier.wait()
            return x[index]
        return read

    device = SingleDeviceSharding(jax.devices()[0])
    out = list(_device_arrays(_Placement(x.shape, device, reader(x), lambda index: [index], 0) for x in arrays))
    assert len(out) == len(arrays) and all(np.array_equal(np.asarray(o), x) for o, x in zip(out, arrays))


READS_ON_A_MESH = """
import collections, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from apd_jax.checkpoints.streaming import _blocks, _device_arrays, _Placement

mesh = jax.make_mesh((2, 4), ("data", "model"))
full = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
# (spec, blocks read): parts of 16 or 8 rows in blocks of 4 rows; without sharing P() would read 32
for spec, count in ((P(), 4), (P(None, "model"), 16), (P("data", "model"), 16)):
    reads = collections.Counter()
    def read(index):
        reads[tuple((s.start, s.stop) for s in index)] += 1
        return full[index]
    sharding = NamedSharding(mesh, spec)
    (out,) = _device_arrays([_Placement(full.shape, sharding, read, lambda index: _blocks(index, full.shape, 0, 4), 0)])
    np.testing.assert_array_equal(np.asarray(out), full)
    assert out.sharding == sharding
    assert set(reads.values()) == {1} and len(reads) == count, (spec, reads)
print("ok")
"""


def test_replicated_parts_are_read_once_on_a_mesh():
    # Devices holding the same part (replicated axes) share its reads: each block is read once.
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", READS_ON_A_MESH], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


def _stored(params_dir, path):
    import tensorstore as ts

    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": path}}
    return ts.open(spec, open=True, read=True).result()


def test_saved_leaves_are_chunked_and_zarr2(qwen_dir, tmp_path, monkeypatch):
    # save_orbax (jax.Array leaves) and conversion (lazy leaves) both store chunks of about
    # READ_CHUNK_BYTES in the zarr v2 layout _orbax_leaf reads, so a load reads a few chunks at a time.
    monkeypatch.setattr("apd_jax.checkpoints.streaming.READ_CHUNK_BYTES", 3000)
    cfg = json.loads((qwen_dir / "config.json").read_text())
    checkpoint.save_orbax(checkpoint.load_hf(qwen_dir), tmp_path / "saved", cfg)
    checkpoint.convert_hf_to_orbax(qwen_dir, tmp_path / "converted")
    for d in ("saved", "converted"):
        params = (tmp_path / d / "params").absolute()
        assert not list(params.rglob("zarr.json")), "zarr3 metadata: _orbax_leaf reads zarr v2"
        for path, want in checkpoint.expected_shapes(checkpoint.read_config(qwen_dir)).items():
            t = _stored(params, path)
            chunk = tuple(t.chunk_layout.read_chunk.shape)
            if math.prod(want.shape) * t.dtype.numpy_dtype.itemsize > 3000:
                assert math.prod(chunk) * t.dtype.numpy_dtype.itemsize <= 3000, (d, path, chunk)


@pytest.mark.parametrize("lo,hi,unit,chunks", [(0, 100, 8, 3), (0, 64, 8, 2), (16, 48, 4, 3), (0, 7, 4, 1), (0, 9, 4, 1)])
def test_even_blocks_in_whole_chunks_have_one_shape(lo, hi, unit, chunks):
    # The orbax path: blocks along axis 1 of a few stored chunks each, all of one shape.
    shape, step = (3, 100, 5), unit * chunks
    index = (slice(None), slice(lo, hi), slice(None))
    blocks = _even_blocks(index, shape, step, 1, unit)
    sizes = {b[1].stop - b[1].start for b in blocks}
    assert len(sizes) == 1 and (len(blocks) == 1 or sizes.pop() <= step)
    covered = sorted({r for b in blocks for r in range(b[1].start, b[1].stop)})
    assert covered == list(range(lo, hi))
    assert all(b[0] == slice(None) and b[2] == slice(None) for b in blocks)
    assert all((b[1].start - lo) % unit == 0 for b in blocks[:-1])  # chunk-aligned but the last
    assert len(blocks) == max(1, -(-(hi - lo) // step))
