"""Load and convert benchmark: seconds and peak host RSS of each step, each in a fresh process.

    python -m apd_jax.bench.load --make-random /tmp/rand     # real-shape random Dream-7B + Qwen2.5-0.5B, then the same
    python -m apd_jax.bench.load DREAM_HF_DIR QWEN_HF_DIR     # on given HF directories (a model pair)

For the HF directories given (or made), it runs, each step in its own process so that
its peak RSS (VmHWM) is its own: `convert` each to an apd_jax orbax directory
(beside it, NAME.apd_jax, or under --work), `load-hf` of the pair from the HF directories and
`load-orbax` of the pair from the converted ones, onto the default device (page cache warm:
the conversion has just read the HF files and written the orbax ones). It prints one line per
step and writes every figure to --json: the step's seconds (the load or the conversion alone,
import and backend start measured apart), the process's peak RSS, the baseline RSS after
imports, and device memory (bytes in use / peak, where the backend reports them).

`--make-random DIR` writes random-valued checkpoints of the real shapes (models.config's presets) with
numpy and safetensors, one parameter at a time, sharded at 4 GB with an index as the hub
ships them (no torch, no model in memory): DIR/dream-7b (15.2 GB) and DIR/qwen2.5-0.5b.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apd_jax.utils.runtime import runtime_defaults


def real_configs() -> dict[str, dict[str, Any]]:
    """The config.json dicts of the real shapes, from apd_jax.models.config's presets (bf16 as published).
    Imported here, not at module level, so a step's process imports JAX inside its timed import."""
    import jax.numpy as jnp

    from apd_jax.models.config import dream_7b_config, qwen25_05b_config

    return {name: preset(param_dtype=jnp.bfloat16).to_hf_dict()[0]
            for name, preset in (("dream-7b", dream_7b_config), ("qwen2.5-0.5b", qwen25_05b_config))}


def __getattr__(name: str) -> Any:
    if name == "REAL_CONFIGS":  # built on first use (real_configs)
        return real_configs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


HUB_SHARD_SIZE = 4 * 10**9  # save_pretrained(max_shard_size="4GB")


def _random_param(shape: tuple[int, ...], dtype: Any, rng: Any) -> Any:
    """Random finite values of magnitude 2^-7..2^-6, from random bits (much faster than normals):
    random sign and mantissa, a fixed exponent."""
    import numpy as np

    bits = {2: (np.uint16, 0x807F, 0x3C00), 4: (np.uint32, 0x807FFFFF, 0x3C000000)}
    uint, keep, exponent = bits[np.dtype(dtype).itemsize]
    raw = rng.integers(0, np.iinfo(uint).max, size=shape, dtype=uint, endpoint=True)
    return ((raw & uint(keep)) | uint(exponent)).view(dtype)


def make_random(out_dir: str | Path, hf_config: dict[str, Any], *, seed: int = 0,
                max_shard_size: int = HUB_SHARD_SIZE) -> Path:
    """A random-valued HF checkpoint of `hf_config`'s shapes and torch_dtype, written one parameter
    at a time through the exporter (sharded past max_shard_size, with an index)."""
    import jax
    import numpy as np

    from apd_jax import checkpoints as checkpoint
    from apd_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(hf_config)
    specs = checkpoint.expected_shapes(cfg)
    rng = np.random.default_rng(seed)
    arrays: Iterator[tuple[str, Any]] = (
        (path, _random_param(tuple(s.shape), s.dtype, rng)) for path, s in specs.items()
    )
    with tempfile.TemporaryDirectory() as stage:
        (Path(stage) / "config.json").write_text(json.dumps(hf_config, indent=2))
        specs = {p: jax.ShapeDtypeStruct(s.shape, s.dtype) for p, s in specs.items()}
        return checkpoint.write_hf(specs, arrays, Path(stage), Path(out_dir), overwrite=False,
                                   max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------- one step, in its own process


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes: Linux's VmHWM, where there is one. Not
    getrusage's ru_maxrss, which a child started by fork + exec inherits from its parent's resident set
    at the fork (a benchmark that has just made the checkpoints would lift every step's figure)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _device_memory() -> dict[str, int]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats}


def run_step(step: str, paths: list[str]) -> dict[str, Any]:
    """One step in this process: 'baseline' (imports only), 'convert SRC DST', 'load DIR...'."""
    t0 = time.perf_counter()
    import jax
    from flax import nnx

    from apd_jax import checkpoints as checkpoint

    jax.devices()  # the backend starts here, not inside the timed step
    result: dict[str, Any] = {"step": step, "paths": paths, "import_s": time.perf_counter() - t0,
                              "baseline_rss": _peak_rss(), "backend": jax.default_backend()}
    t0 = time.perf_counter()
    if step == "convert":
        checkpoint.convert_hf_to_orbax(paths[0], paths[1], overwrite=True)
    elif step == "load":
        result["each_s"] = {}
        for path in paths:
            t = time.perf_counter()
            model = checkpoint.load_model(path)
            jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
            result["each_s"][path] = time.perf_counter() - t
    elif step != "baseline":
        raise ValueError(f"unknown step {step!r}: use baseline, convert or load")
    result |= {"seconds": time.perf_counter() - t0, "peak_rss": _peak_rss(), "device_memory": _device_memory()}
    return result


def step_in_subprocess(step: str, *paths: str | Path) -> dict[str, Any]:
    """run_step in a fresh Python process, so its peak RSS is the step's own."""
    proc = subprocess.run([sys.executable, "-m", "apd_jax.bench.load", "--step", step, *map(str, paths)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench_load step {step} {paths} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _report(r: dict[str, Any]) -> str:
    device = ", ".join(f"{k} {_gib(v)}" for k, v in r["device_memory"].items())
    return (f"{r['step']:8s} {r['seconds']:7.2f} s  peak RSS {_gib(r['peak_rss'])} (after imports "
            f"{_gib(r['baseline_rss'])})  {device}  {' '.join(Path(p).name for p in r['paths'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apd_jax.bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dirs", nargs="*", type=Path, help="HF checkpoint directories (a model pair, or one)")
    p.add_argument("--make-random", type=Path, metavar="DIR",
                   help="make (if absent) real-shape random Dream-7B and Qwen2.5-0.5B checkpoints under DIR and use them")
    p.add_argument("--work", type=Path, help="where the converted directories go (default: beside each HF one)")
    p.add_argument("--json", type=Path, default=Path("bench_load.json"), help="write every figure here")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = p.parse_args(argv)
    runtime_defaults()  # as `apd-jax` runs; the steps' processes inherit it
    if args.step:
        print(json.dumps(run_step(args.step, [str(d) for d in args.hf_dirs])))
        return 0
    hf_dirs = list(args.hf_dirs)
    if args.make_random:
        for name, config in real_configs().items():
            if not (args.make_random / name).exists():
                t0 = time.perf_counter()
                make_random(args.make_random / name, config)
                print(f"made {args.make_random / name} in {time.perf_counter() - t0:.1f} s", flush=True)
            hf_dirs.append(args.make_random / name)
    if not hf_dirs:
        p.error("give HF checkpoint directories or --make-random DIR")
    converted = [(args.work or d.parent) / f"{d.name}.apd_jax" for d in hf_dirs]
    steps = [("baseline", ())] + [("convert", (d, c)) for d, c in zip(hf_dirs, converted)]
    steps += [("load-hf", tuple(hf_dirs)), ("load-orbax", tuple(converted))]
    results = []
    for step, paths in steps:  # each reported and saved as it finishes: a run cut short keeps what it measured
        r = step_in_subprocess(step.split("-")[0], *paths) | {"step": step}
        results.append(r)
        print(_report(r), flush=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
