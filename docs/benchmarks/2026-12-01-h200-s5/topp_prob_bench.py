"""top-p filter on the H200 at Dream's vocabulary: the bisection over logit keys (before) against the
bisection over probability bits (apd_jax.sampling now). The code before, old_sampling.py beside this
script, is `git show 51542a2^:apd_jax/sampling.py > old_sampling.py`; run from the repository root
with PYTHONPATH=. and XLA_PYTHON_CLIENT_PREALLOCATE=false."""
import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import old_sampling
from apd_jax.sampling import filter_logits

out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for b in (1, 16):
    for scale in (3.0, 8.0):
        x = jax.random.normal(jax.random.key(0), (b, 100, 152064), jnp.float32) * scale
        for top_k in (0, 50):
            ref = None
            for name, fn in (("logit keys (before)", old_sampling.filter_logits), ("probability bits (now)", filter_logits)):
                f = jax.jit(fn)
                tp, tk = jnp.float32(0.95), jnp.int32(top_k)
                y = f(x, tp, tk).block_until_ready()
                temp = f.lower(x, tp, tk).compile().memory_analysis().temp_size_in_bytes
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(20):
                        y = f(x, tp, tk)
                    y.block_until_ready(); ts.append((time.perf_counter() - t) / 20 * 1e3)
                kept = jnp.isfinite(y)
                diff = None if ref is None else int(jnp.sum(jnp.any(kept != ref, -1)))
                ref = kept if ref is None else ref
                key = f"b{b} scale {scale:g} top_k {top_k} {name}"
                out[key] = {"ms": round(min(ts), 3), "temp_gb": round(temp / 1e9, 2), "rows_differing": diff,
                            "kept_per_row": round(float(jnp.mean(jnp.sum(kept, -1))), 1)}
                print(key, out[key], flush=True)
print(json.dumps(out))
