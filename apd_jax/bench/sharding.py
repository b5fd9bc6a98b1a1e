"""APD on 2 devices: one device vs tensor parallel (model=2) vs data parallel (data=2), same models.

    python -m apd_jax.bench.sharding 1,16          # Dream-7B / Qwen2.5-0.5B shapes, random bf16 weights
    python -m apd_jax.bench.sharding 1,4 tiny      # the same on tiny models (CPU: XLA_FLAGS=
                                                 #   --xla_force_host_platform_device_count=2)

Median of 3 timed calls after a compiling one. Random weights accept different prefixes once
bf16 sums are split differently, so compare ms/pass as well as the total; "rows equal" is the
fraction of rows generated exactly as on one device.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.bench import decoders as bench
from apd_jax.decoding.apd import APDConfig, apd_generate
from apd_jax.models.config import dream_7b_config, qwen25_05b_config, tiny_config
from apd_jax.models.sharding import make_mesh, shard_model


def main(batches: list[int], tiny: bool) -> None:
    if tiny:
        d_cfg, v_cfg, new_tokens, prompt_len = tiny_config(False), tiny_config(True), 32, 16
    else:
        bf16 = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
        d_cfg, v_cfg, new_tokens, prompt_len = dream_7b_config(**bf16), qwen25_05b_config(**bf16), 256, 128
    drafter, verifier = bench.random_model(d_cfg, 1), bench.random_model(v_cfg, 2)
    config = APDConfig(max_new_tokens=new_tokens, eos_token_ids=())  # the paper's R, W, M
    layouts = {"1 dev": None, "TP=2": make_mesh(data=1, model=2), "DP=2": make_mesh(data=2, model=1)}
    models = {k: (drafter, verifier) if m is None else (shard_model(drafter, m), shard_model(verifier, m))
              for k, m in layouts.items()}
    print(f"{jax.devices()}: drafter {d_cfg.model_type} {d_cfg.num_layers} layers, verifier {v_cfg.num_layers}")
    for batch in batches:
        prompts = bench.random_prompts([d_cfg, v_cfg], batch, prompt_len)
        reference = None
        for name, mesh in layouts.items():
            if mesh is not None and batch % mesh.shape["data"]:
                print(f"batch {batch:2d} {name}: skipped (batch not divisible by data)")
                continue
            apd_generate(*models[name], prompts, config, mesh=mesh)  # compile
            times = []
            for _ in range(3):
                start = time.perf_counter()
                out = apd_generate(*models[name], prompts, config, mesh=mesh)
                times.append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(times)
            reference = reference or out
            same = np.mean([a == b for a, b in zip(out.sequences(), reference.sequences())])
            print(f"batch {batch:2d} {name}: {ms:8.1f} ms {ms / out.passes:7.2f} ms/pass {out.passes:3d} passes "
                  f"{out.lengths.sum() / ms * 1e3:7.0f} tok/s  rows equal to 1 dev {same:.2f}", flush=True)


if __name__ == "__main__":
    from apd_jax.utils.runtime import runtime_defaults

    runtime_defaults()  # before the backend starts, as `apd-jax` runs
    main([int(b) for b in sys.argv[1].split(",")], tiny=sys.argv[2:] == ["tiny"])
