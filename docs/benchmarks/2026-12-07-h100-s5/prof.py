"""Batch-1 APD profile at real shapes: every device op of one call, grouped, and the optimized HLO."""
import collections, json, os, sys, tempfile, time
from pathlib import Path
import jax, jax.numpy as jnp
from jax.profiler import ProfileData
from apd_jax.bench import decoders as bench
from apd_jax.cli.bench import _configs
from apd_jax.decoding.apd import apd_generate
from apd_jax.decoding.apd_rule import APDConfig

out = Path(os.environ["OUT"])
d_cfg, v_cfg, _, _ = _configs("real")
drafter, verifier = bench.random_model(d_cfg, 1), bench.random_model(v_cfg, 2)
cfg = APDConfig(R=0.7, W=16, M=100, max_new_tokens=256)
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
prompts = bench.random_prompts([d_cfg, v_cfg], batch, 128)
run = lambda: apd_generate(drafter, verifier, prompts, cfg)
jax.block_until_ready(run().tokens)
t = time.perf_counter(); r = run(); jax.block_until_ready(r.tokens); t = time.perf_counter() - t
print(f"batch {batch}: {1e3 * t / r.passes:.2f} ms/pass, {r.passes} passes", flush=True)
with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
        r = jax.block_until_ready(run())
    data = ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
ops = collections.defaultdict(lambda: [0.0, 0])
lines_seen = []
events = []
for plane in data.planes:
    if not plane.name.startswith("/device:"):
        continue
    lines = list(plane.lines)
    lines_seen += [(plane.name, l.name) for l in lines]
    chosen = [l for l in lines if l.name == "XLA Ops"] or [l for l in lines if l.name.startswith("Stream")]
    for l in chosen:
        for e in l.events:
            ops[e.name][0] += e.duration_ns / 1e6; ops[e.name][1] += 1
            events.append((e.start_ns, e.duration_ns, e.name))
events.sort()
busy = sum(d for _, d, _ in events) / 1e6
span = (events[-1][0] + events[-1][1] - events[0][0]) / 1e6 if events else 0
print(f"{len(events) / r.passes:.0f} device ops/pass, busy {busy / r.passes:.2f} ms/pass, span {span / r.passes:.2f} ms/pass", flush=True)
ranked = sorted(((n, ms / r.passes, c / r.passes) for n, (ms, c) in ops.items()), key=lambda x: -x[1])
for n, ms, c in ranked[:60]:
    print(f"{ms:8.3f} ms/pass x{c:6.1f}  {n[:110]}")
# one pass's events in order (the middle pass), for the timeline
mid = len(events) // 2
json.dump({"ms_per_pass": 1e3 * t / r.passes, "passes": r.passes, "lines": lines_seen,
           "ops": ranked, "window": [(s - events[0][0], d, n) for s, d, n in events[mid - 800: mid + 800]]},
          open(out / f"prof-b{batch}.json", "w"))
