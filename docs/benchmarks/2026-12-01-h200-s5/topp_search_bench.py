"""top-p filter on the H200 at Dream's vocabulary: apd_jax.sampling's bisection against a k-way
search (2, 4, 8, 16 parts per step). Run as `PYTHONPATH=. python topp_search_bench.py` with
XLA_PYTHON_CLIENT_PREALLOCATE=false. On the device the k-way search was a candidate
apd_jax.sampling.filter_logits(..., splits=k); it lost at batch 16 and was not kept, so it is
written out here (the same function)."""
import functools, json, math, time
import jax, jax.numpy as jnp
from apd_jax.sampling import NEG_INF, filter_logits


def ordered_keys(x):  # uint32 keys in the float32 order of x
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def kway_filter(logits, top_p, top_k, splits):
    keys, probs = ordered_keys(logits), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def kept(cuts):  # [..., n] candidate cuts; [..., n, V] compares meant to fuse into the sums
        above = keys[..., None, :] >= cuts[..., :, None]
        by_p = (top_p < 1.0) & (jnp.sum(jnp.where(above, probs[..., None, :], 0.0), -1) > top_p)
        by_k = (top_k > 0) & (jnp.sum(above, -1) >= top_k)
        return by_p | by_k

    def step(_, bounds):
        lo, hi = bounds
        span, j = hi - lo, jnp.arange(1, splits, dtype=jnp.uint32)
        cuts = lo + (span // splits) * j + (span % splits) * j // splits
        n_ok = jnp.sum(kept(cuts), -1, keepdims=True)
        at = lambda i: jnp.take_along_axis(cuts, jnp.clip(i, 0, splits - 2), -1)
        return jnp.where(n_ok > 0, at(n_ok - 1), lo), jnp.where(n_ok < splits - 1, at(n_ok), hi)

    lo, hi = jnp.min(keys, -1, keepdims=True), jnp.max(keys, -1, keepdims=True) + 1
    lo, _ = jax.lax.fori_loop(0, math.ceil(32 / math.log2(splits)), step, (lo, hi))
    return jnp.where(keys < lo, NEG_INF, logits)


variants = {"bisection (before)": filter_logits,
            **{f"splits {n}": functools.partial(kway_filter, splits=n) for n in (2, 4, 8, 16)}}
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
for b in (1, 16):
    for scale in (3.0, 8.0):
        x = jax.random.normal(jax.random.key(0), (b, 100, 152064), jnp.float32) * scale
        ref = None
        for name, fn in variants.items():
            f = jax.jit(lambda x, tp, tk: fn(x, tp, tk))
            tp, tk = jnp.float32(0.95), jnp.int32(0)
            y = f(x, tp, tk).block_until_ready()
            temp = f.lower(x, tp, tk).compile().memory_analysis().temp_size_in_bytes
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(20):
                    y = f(x, tp, tk)
                y.block_until_ready()
                ts.append((time.perf_counter() - t) / 20 * 1e3)
            kept = jnp.isfinite(y)
            same = None if ref is None else int(jnp.sum(jnp.any(kept != ref, -1)))
            ref = kept if ref is None else ref
            key = f"b{b} scale {scale:g} {name}"
            out[key] = {"ms": round(min(ts), 3), "temp_gb": round(temp / 1e9, 2),
                        "rows_differing_from_bisection": same,
                        "kept_per_row": round(float(jnp.mean(jnp.sum(kept, -1))), 1)}
            print(key, out[key], flush=True)
print(json.dumps(out))
