"""Layer-stack variants at the real shapes, timed side by side in one process: the experiment
behind model.py's fused q/k/v and gate/up projections and its head-major attention.

    PYTHONPATH=. python docs/benchmarks/2026-11-23-h100-fused/layer_variants.py OUTDIR

Each case jits one forward of the whole layer stack (no embedding, no head) over a window
on a donated KV cache, once per variant, and prints the median and best wall time of 30
calls, the compile time, the largest output difference from the first variant and the
top device ops. Wall times include the host's dispatch of every weight array, so compare
variants, not absolute figures. Tiny shapes on a CPU, to check the script itself.

fuse=False runs separate q, k, v and gate, up matmuls (the layout before the fusion);
attn="einsum" is the attention before the change, attn="heads_first" model._gqa_attention.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from apd_jax.bench import _call_times, device_profile, random_model
from apd_jax.cache import attention_mask, write_window
from apd_jax.config import dream_7b_config, qwen25_05b_config, tiny_config
from apd_jax.model import _cudnn_attention, _dot_operands, _gqa_attention, rms_norm, rope

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
f32, bf16 = jnp.float32, jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class V:
    fuse: bool = False
    attn: str = "einsum"  # einsum | heads_first | cudnn
    kv_one: bool = False  # k and v in one cache array (one scatter per layer)


def einsum_attention(q, k, v, mask):
    """The attention before the change: XLA transposes the float32 scores and the probabilities."""
    b, s, h, d = q.shape
    kvh = k.shape[1]
    q = q.reshape(b, s, kvh, h // kvh, d)
    sc = jnp.einsum("bskgd,bktd->bkgst", *_dot_operands(q, k), preferred_element_type=f32) / jnp.sqrt(f32(d))
    sc = jnp.where(mask[:, None, None], sc, jnp.finfo(f32).min)
    p = jax.nn.softmax(sc, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bskgd", *_dot_operands(p, v), preferred_element_type=f32)
    return out.astype(q.dtype).reshape(b, s, h, d)


ATTENTION = {"einsum": einsum_attention, "heads_first": _gqa_attention, "cudnn": _cudnn_attention}


def make_params(model, fuse):
    """Per-layer weights: the model's fused ones, or q, k, v and gate, up sliced out of them."""
    cfg = model.cfg
    g = cfg.num_heads // cfg.num_kv_heads
    out = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv, qkv_b, gate_up = a.qkv_proj.kernel[...], a.qkv_proj.bias[...], m.gate_up_proj.kernel[...]
        p = dict(ln1=layer.input_layernorm.weight[...], ln2=layer.post_attention_layernorm.weight[...],
                 o=a.o_proj.kernel[...], down=m.down_proj.kernel[...])
        if fuse:
            p.update(qkv=qkv.reshape(cfg.hidden_size, -1), qkv_b=qkv_b.reshape(-1), gate_up=gate_up)
        else:
            for name, part in (("q", slice(0, g)), ("k", g), ("v", g + 1)):
                p[name] = qkv[:, :, part].reshape(cfg.hidden_size, -1)
                p[name + "_b"] = qkv_b[:, part].reshape(-1)
            p["gate"], p["up"] = gate_up[:, 0], gate_up[:, 1]
        out.append(p)
    return out


def make_forward(cfg, v: V):
    g = cfg.num_heads // cfg.num_kv_heads
    kvh, d, nh = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads

    def fwd(params, x, start, valid, ck, cv):
        b, s, _ = x.shape
        pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)
        kv_end = start + valid
        T = ck.shape[-2]
        kpos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
        mask = attention_mask(pos, kpos, kv_end, cfg.causal)
        for i, p in enumerate(params):
            h = rms_norm(x, p["ln1"], cfg.rms_norm_eps, x.dtype)
            if v.fuse:
                qkv = (h @ p["qkv"] + p["qkv_b"]).reshape(b, s, kvh, g + 2, d)
                q = qkv[:, :, :, :g].reshape(b, s, nh, d)
                k, vv = qkv[:, :, :, g], qkv[:, :, :, g + 1]
            else:
                q = (h @ p["q"] + p["q_b"]).reshape(b, s, nh, d)
                k = (h @ p["k"] + p["k_b"]).reshape(b, s, kvh, d)
                vv = (h @ p["v"] + p["v_b"]).reshape(b, s, kvh, d)
            q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
            if v.kv_one:
                ck = write_window(ck, i, jnp.concatenate([k, vv], -1), pos)
                keys, vals = ck[i][..., :d], ck[i][..., d:]
            else:
                ck, cv = write_window(ck, i, k, pos), write_window(cv, i, vv, pos)
                keys, vals = ck[i], cv[i]
            o = ATTENTION[v.attn](q, keys, vals, mask)
            x = x + o.reshape(b, s, -1) @ p["o"]
            h = rms_norm(x, p["ln2"], cfg.rms_norm_eps, x.dtype)
            if v.fuse:
                gu = jnp.einsum("bsh,hci->bsci", h, p["gate_up"])
                act = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
            else:
                act = jax.nn.silu(h @ p["gate"]) * (h @ p["up"])
            x = x + act @ p["down"]
        return x, ck, cv

    return jax.jit(fwd, donate_argnums=(4, 5))


def timed(fn, n=30):
    _call_times(fn, 5)  # warm-up
    times, _ = _call_times(fn, n)
    return statistics.median(times), min(times)


results = []


def run_case(label, model, variants, batch, s, T, start_at, causal=None):
    cfg = model.cfg if causal is None else model.cfg.replace(causal=causal)
    params = {f: make_params(model, f) for f in {v.fuse for v in variants}}
    x = 0.1 * jax.random.normal(jax.random.key(3), (batch, s, cfg.hidden_size), bf16)
    start = jnp.full((batch,), start_at, jnp.int32)
    valid = jnp.full((batch,), s, jnp.int32)
    ref = None
    for v in variants:
        fwd = make_forward(cfg, v)
        dv = cfg.head_dim * (2 if v.kv_one else 1)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, T, dv)
        state = {"ck": jnp.zeros(shape, bf16), "cv": jnp.zeros((1,) if v.kv_one else shape, bf16)}

        def call():
            y, state["ck"], state["cv"] = fwd(params[v.fuse], x, start, valid, state["ck"], state["cv"])
            return y

        t0 = time.perf_counter()
        lowered = fwd.lower(params[v.fuse], x, start, valid, state["ck"], state["cv"])
        compiled = lowered.compile()
        comp = time.perf_counter() - t0
        if v == variants[0]:
            with open(f"{OUT}/hlo-{label}.txt", "w") as fh:
                fh.write(compiled.as_text())
        y = call()
        err = None if ref is None else float(jnp.max(jnp.abs(y.astype(f32) - ref)) / jnp.max(jnp.abs(ref)))
        if ref is None:
            ref = y.astype(f32)
        med, best = timed(call)
        ops = device_profile(call, top=14)[0] if jax.default_backend() == "gpu" else []
        row = dict(ops=[(n[:60], round(ms, 4), c) for n, ms, c in ops], case=label, variant=dataclasses.asdict(v), batch=batch, s=s, T=T,
                   median_ms=1e3 * med, best_ms=1e3 * best, compile_s=comp, rel_err_vs_first=err)
        results.append(row)
        print(json.dumps(row), flush=True)


def main():
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    if jax.default_backend() == "cpu":  # a quick check of the script itself
        drafter, verifier = random_model(tiny_config(False)), random_model(tiny_config(True))
    else:
        drafter, verifier = (random_model(c(dtype=bf16, param_dtype=bf16)) for c in (dream_7b_config, qwen25_05b_config))
    vs = [V(), V(fuse=True), V(attn="heads_first"), V(kv_one=True)]
    if jax.default_backend() == "gpu":
        vs.append(V(fuse=True, attn="cudnn"))
    run_case("drafter-b1", drafter, vs, 1, 117, 384, 113)
    run_case("verifier-b1", verifier, [V(), V(fuse=True), V(attn="heads_first")], 1, 100, 384, 130)
    run_case("decode7b-b1", drafter, [V(), V(fuse=True)], 1, 1, 384, 200, causal=True)
    run_case("drafter-b16", drafter, [V(), V(fuse=True), V(attn="heads_first")], 16, 147, 384, 113)
    with open(f"{OUT}/variants.json", "w") as fh:
        json.dump(results, fh, indent=1)


main()
