"""The sampling filter's cost on CPU: sample_rows (per-row knobs, as APD samples) and filter_logits
(scalar knobs) on [4, 16, 152064] float32 logits at top-p 0.95; the mean of 3 jitted calls after one.

    PYTHONPATH=. python3 docs/benchmarks/2026-12-07-cpu/filter_cpu.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.sampling import filter_logits, sample_rows

x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 152064)).astype(np.float32))
keys = jax.random.split(jax.random.key(0), 4)
rows = jax.jit(lambda x, t, p, k: sample_rows(x, keys, t, p, k))
scalar = jax.jit(filter_logits)
for name, call in [("sample_rows", lambda: rows(x, jnp.full((4,), 0.7), jnp.full((4,), 0.95), jnp.zeros((4,), jnp.int32))),
                   ("filter_logits", lambda: scalar(x, jnp.float32(0.95), jnp.int32(0)))]:
    jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(call())
    print(f"{name}: {(time.perf_counter() - start) / 3:.2f} s")
