"""Sampling pieces on this project's 2-core CPU at the embedded pair's shapes ([1, 100, 4096] float32 logits):
jnp.argmax(x + Gumbel noise) against sampling.gumbel_argmax, and the top-p filter before this session
(old_sampling.py beside this script: `git show 51542a2^:apd_jax/sampling.py > old_sampling.py`) against now.
Run from the repository root: PYTHONPATH=. python docs/benchmarks/2026-12-01-cpu/sampling_micro.py"""
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import old_sampling
from apd_jax.sampling import filter_logits, gumbel_argmax, gumbel_noise

x = jax.random.normal(jax.random.key(0), (1, 100, 4096), jnp.float32) * 3
key, top_p, top_k = jax.random.key(1), jnp.float32(0.95), jnp.int32(0)
cases = {
    "argmax(x + gumbel)": (lambda x, k: jnp.argmax(x + gumbel_noise(k, x.shape), -1), (x, key)),
    "gumbel_argmax": (gumbel_argmax, (x, key)),
    "filter, logit keys (before)": (old_sampling.filter_logits, (x, top_p, top_k)),
    "filter, probability bits (now)": (filter_logits, (x, top_p, top_k)),
}
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for name, (fn, args) in cases.items():
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            y = f(*args)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t) / 20 * 1e3)
    out[name] = round(min(ts), 2)
    print(f"{name}: {min(ts):.2f} ms (min of 5 x 20)", flush=True)
print(json.dumps(out))
