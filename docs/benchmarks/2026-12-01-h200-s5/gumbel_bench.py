"""Gumbel-max at Dream's vocabulary on the H200: jnp.argmax(x + noise) against sampling.gumbel_argmax."""
import json, time
import jax, jax.numpy as jnp
from apd_jax.sampling import gumbel_argmax, gumbel_noise
out = {}
for b in (1, 16):
    x = jax.random.normal(jax.random.key(0), (b, 100, 152064), jnp.float32) * 3
    k = jax.random.key(1)
    for name, fn in (("argmax", lambda x, k: jnp.argmax(x + gumbel_noise(k, x.shape), -1)), ("max, first index", gumbel_argmax)):
        f = jax.jit(fn); y = f(x, k).block_until_ready()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                y = f(x, k)
            y.block_until_ready(); ts.append((time.perf_counter() - t) / 20 * 1e3)
        out[f"b{b} {name}"] = round(min(ts), 3)
        print(f"b{b} {name}: {min(ts):.3f} ms (min of 5 x 20)", flush=True)
print(json.dumps(out))
