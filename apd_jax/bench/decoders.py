"""Benchmarks: APD and its baselines at the real model shapes, against the hardware's own bounds.

Models of the real shapes get random weights created on the device (no
checkpoint), or real converted checkpoints when given. Every figure is taken
after a warm-up call, as the median of timed calls, next to the bound measured in
the same run: device copy bandwidth (bytes read + written) and a large bf16
matmul's rate. A pass's bound is max(bytes moved / bandwidth, FLOPs / matmul rate), its work
counted by bench.bounds; the block decoder's refresh and window passes apart by bench.passes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.bench import bounds, passes
from apd_jax.bench.timing import best_time, median_time
from apd_jax.decoding.apd import APDConfig, apd_generate, leftright_generate
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.diffusion import threshold_generate
from apd_jax.models.config import ModelConfig
from apd_jax.decoding.generation import DecoderConfig, GenerationResult
from apd_jax.models.model import Transformer, abstract_model, forward_logits


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return 0.02 * jax.random.normal(key, shape, dtype)


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with random weights made on the default device: normal(0.02), norm scales 1.

    Leaf by leaf, so that XLA compiles one small generator per distinct weight shape
    rather than the whole initialiser (which takes tens of seconds at 7B).
    """
    graph, state = nnx.split(abstract_model(cfg))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [
        jnp.ones(x.shape, x.dtype) if "norm" in jax.tree_util.keystr(path) else _normal(key, x.shape, x.dtype)
        for (path, x), key in zip(leaves, keys)
    ]
    return nnx.merge(graph, jax.tree.unflatten(treedef, values))


def param_bytes(model: Transformer) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_prompts(configs: list[ModelConfig], batch: int, prompt_len: int) -> list[list[int]]:
    """Random prompt ids every model can read: below each vocabulary, the mask token and
    Qwen's special-token range (ids from 151643 up)."""
    limit = min([150000] + [c.vocab_size for c in configs] + [c.mask_token_id for c in configs if c.mask_token_id])
    return np.random.default_rng(0).integers(0, limit, size=(batch, prompt_len)).tolist()


def logits_difference(model: Transformer, other: Transformer, length: int) -> float:
    """||logits(other) - logits(model)|| / ||logits(model)|| on one random sequence."""
    tokens = jnp.asarray(random_prompts([model.cfg], 1, length))
    ref = forward_logits(model, tokens)
    return float(jnp.linalg.norm(forward_logits(other, tokens) - ref) / jnp.linalg.norm(ref))


def device_ceilings(size_mb: int = 2048) -> dict[str, float]:
    """Measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""
    x = jax.random.normal(jax.random.key(1), (size_mb * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    t = best_time(lambda: copy(x), 20)
    n = 8192 if jax.default_backend() != "cpu" else 512
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = best_time(lambda: mm(a, a), 20)
    return {"bandwidth": 2 * x.nbytes / t, "matmul_flops": 2 * n**3 / tm}


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class Row:
    """One benchmark line.

    bound_ms is the mean over the call's passes of each pass's roofline bound (bench.bounds: the
    weights, the matmul FLOPs, the float32 logits written and read, the K/V caches read and written
    and the sampling filter's traffic; `bound_leaves_out` names what it does not count). APD and
    left-to-right rows replay each pass from the tokens it accepted: bound_ms over the positions the
    rule asks for, bound_compiled_ms over the compiled widths they are padded to (with adaptive
    lookahead, the narrowest draft level holding the widest row, for every row of the batch).

    Rows of the block decoder with a cache (prefix, dual) give its kinds of pass apart
    (bench.passes): refresh (every running row at its block's first pass: the whole canvas), window
    (every one later: the block, dual, or the answer from the block's start, prefix) and mixed (rows
    of a batch at different steps: both forwards; none at batch 1). For each kind: its count
    (refresh_passes, window_passes, mixed_passes: they add up to passes), the ms of one pass
    (refresh_ms ...: the decoder's own pass timed in a compiled loop of that kind alone at the call's
    shapes; the mean over the call's passes of the kind, the prefix window narrowing block by block)
    and its bound (refresh_bound_ms ...). kinds_ms_per_pass is the counts' weighted mean of the kinds'
    times, kinds_ms_per_token the same per generated token, and kinds_cover counts x times over the
    whole call's time (the rest: the loop around the passes).
    Left None where they do not apply, or where a row left a block unfinished.
    Each time's ratio to its bound is Row.ratios(), written beside the fields by to_json.
    """

    name: str
    batch: int
    ms_per_pass: float
    tokens_per_s: float
    tokens_per_pass: float
    passes: int
    compile_s: float
    bound_ms: float  # roofline bound of one pass, the mean over the call's passes
    memory_floor_ms: float  # reading every weight once
    peak_memory_gb: float | None
    # with profile=True: the top device ops of one more call, as (name, ms per pass, calls per pass),
    # and every op of it summed by kind (op_kind) as {kind: (ms per pass, kernels per pass)}
    profile: list[tuple[str, float, float]] | None = None
    profile_kinds: dict[str, tuple[float, float]] | None = None
    bound_leaves_out: str = bounds.LEFT_OUT
    bound_compiled_ms: float | None = None
    refresh_passes: int | None = None
    window_passes: int | None = None
    mixed_passes: int | None = None
    refresh_ms: float | None = None
    window_ms: float | None = None
    mixed_ms: float | None = None
    refresh_bound_ms: float | None = None
    window_bound_ms: float | None = None
    mixed_bound_ms: float | None = None
    kinds_ms_per_pass: float | None = None
    kinds_ms_per_token: float | None = None
    kinds_cover: float | None = None

    @property
    def ratio_to_bound(self) -> float:
        return self.ms_per_pass / self.bound_ms

    def ratios(self) -> dict[str, float | None]:
        """Each time over its bound: the whole pass (to the asked and the compiled bound) and each kind."""
        def over(ms: float | None, bound: float | None) -> float | None:
            return None if ms is None or bound is None else ms / bound

        return {"ratio_to_bound": self.ratio_to_bound,
                "ratio_to_compiled_bound": over(self.ms_per_pass, self.bound_compiled_ms),
                **{f"{kind}_ratio_to_bound": over(getattr(self, f"{kind}_ms"), getattr(self, f"{kind}_bound_ms"))
                   for kind in passes.KINDS}}


def _measure(name: str, batch: int, run: Callable[[], GenerationResult],
             account: Callable[[GenerationResult, float], dict[str, Any]], repeats: int, profile: bool) -> Row:
    """Time `run` (the median of `repeats` calls after one that compiles) and fill the Row's bound
    fields with account(result, seconds of a call)."""
    start = time.perf_counter()
    jax.block_until_ready(run().tokens)
    first = time.perf_counter() - start
    t, result = median_time(run, repeats)
    peak = peak_memory()
    return Row(
        name=name, batch=batch, ms_per_pass=1e3 * t / result.passes,
        tokens_per_s=float(result.lengths.sum()) / t, tokens_per_pass=result.tokens_per_pass(),
        passes=result.passes, compile_s=first - t, peak_memory_gb=None if peak is None else peak / 1e9,
        **(per_pass_profile(run) if profile else {}), **account(result, t),
    )


def sampling_label(cfg: DecoderConfig) -> str:
    """' T=.. p=..' for a sampled setting, '' for greedy: part of a row's name."""
    return "" if cfg.temperature == 0 and cfg.top_p == 1 else f" T={cfg.temperature:g} p={cfg.top_p:g}"


def _sampled_filter(cfg: DecoderConfig) -> bool:
    """APD and AR filter the logits only when they sample (greedy takes the argmax)."""
    return cfg.temperature > 0 and (cfg.top_p < 1 or cfg.top_k > 0)


def _draft_bounds(drafter: Transformer, verifier: Transformer | None, cfg: APDConfig, prompt_len: int,
                  ceilings: dict[str, float]) -> Callable[[GenerationResult, float], dict[str, Any]]:
    """APD's (left-to-right's, verifier None) bounds: each pass replayed (bounds.apd_work), asked and compiled."""
    models = [drafter] + ([] if verifier is None else [verifier])
    nbytes = sum(param_bytes(m) for m in models)

    def account(result: GenerationResult, seconds: float) -> dict[str, Any]:
        per_pass = bounds.apd_work(result.accepted, cfg, prompt_len, verifier is not None, _sampled_filter(cfg))

        def mean(which: int) -> float:
            return statistics.fmean(
                bounds.pass_ms([(m.cfg, w) for m, w in zip(models, works[which])], nbytes, ceilings)
                for works in per_pass)

        return {"bound_ms": mean(0), "bound_compiled_ms": mean(1),
                "memory_floor_ms": bounds.weight_floor_ms(nbytes, ceilings)}

    return account


def bench_apd(drafter: Transformer, verifier: Transformer, cfg: APDConfig, batch: int, prompt_len: int,
              ceilings: dict[str, float], repeats: int, name: str = "APD", profile: bool = False) -> Row:
    prompts = random_prompts([drafter.cfg, verifier.cfg], batch, prompt_len)
    adaptive = "" if cfg.M_min is None else f" adaptive {cfg.M_min},{cfg.M_scale:g},{cfg.M_margin}"
    run = lambda: apd_generate(drafter, verifier, prompts, cfg)  # noqa: E731
    return _measure(f"{name} R={cfg.R} W={cfg.W} M={cfg.M}{adaptive}{sampling_label(cfg)}", batch, run,
                    _draft_bounds(drafter, verifier, cfg, prompt_len, ceilings), repeats, profile)


def bench_leftright(drafter: Transformer, K: int, cfg: APDConfig, batch: int, prompt_len: int,
                    ceilings: dict[str, float], repeats: int, profile: bool = False) -> Row:
    prompts = random_prompts([drafter.cfg], batch, prompt_len)
    run = lambda: leftright_generate(drafter, prompts, K, cfg)  # noqa: E731
    return _measure(f"Dream left-to-right K={K} W={cfg.W} M={cfg.M}{sampling_label(cfg)}", batch, run,
                    _draft_bounds(drafter, None, cfg, prompt_len, ceilings), repeats, profile)


def bench_ar(model: Transformer, cfg: ARConfig, batch: int, prompt_len: int, ceilings: dict[str, float],
             repeats: int, profile: bool = False) -> Row:
    prompts = random_prompts([model.cfg], batch, prompt_len)
    nbytes = param_bytes(model)

    def account(result: GenerationResult, seconds: float) -> dict[str, Any]:
        # Pass 0 prefills the prompt (its first token); pass i > 0 runs one token on i - 1 + prompt_len cached.
        works = [bounds.Work(batch * prompt_len, batch, kv_written=batch * prompt_len, filtered=_sampled_filter(cfg))]
        works += [bounds.Work(batch, batch, kv_read=batch * (prompt_len + i - 1), kv_written=batch,
                              filtered=_sampled_filter(cfg)) for i in range(1, result.passes)]
        return {"bound_ms": statistics.fmean(bounds.pass_ms([(model.cfg, w)], nbytes, ceilings) for w in works),
                "memory_floor_ms": bounds.weight_floor_ms(nbytes, ceilings)}

    run = lambda: ar_generate(model, prompts, cfg)  # noqa: E731
    return _measure(f"AR decode{sampling_label(cfg)}", batch, run, account, repeats, profile)


def _canvas_account(model: Transformer, cfg: passes.CanvasConfig, prompts: list[list[int]], prompt_len: int,
                    ceilings: dict[str, float], repeats: int) -> Callable[[GenerationResult, float], dict[str, Any]]:
    """A block decoder row's bound; with a cache, its refresh and window passes apart (bench.passes)."""
    batch, nbytes = len(prompts), param_bytes(model)
    guided = 2 if getattr(cfg, "cfg_scale", 0) > 0 else 1  # guidance runs a second, prompt-masked row
    filtered = passes.filtered_rule(cfg)

    def work(block: int | None) -> bounds.Work:
        return passes.kind_work(cfg, batch * guided, prompt_len, block, filtered)

    def bound(works: list[bounds.Work]) -> float:
        return bounds.pass_ms([(model.cfg, sum(works[1:], works[0]))], nbytes, ceilings)

    def account(result: GenerationResult, seconds: float) -> dict[str, Any]:
        floor = bounds.weight_floor_ms(nbytes, ceilings)
        if cfg.cache == "none":
            return {"bound_ms": bound([work(None)]), "memory_floor_ms": floor}
        kinds = passes.pass_kinds(result, cfg)
        if kinds is None:  # a row left a block unfinished: one refresh per block, the rest windows (an estimate)
            count = cfg.num_blocks
            guess = [(True, None)] * count + [(False, k % count) for k in range(result.passes - count)]
            return {"bound_ms": statistics.fmean(bound(passes.forwards(kind, work)) for kind in guess),
                    "memory_floor_ms": floor}
        # Each pass's kind and the block its window is timed at: the dual window has one width (block 0's
        # stands for all), the prefix window's follows the lowest block among its rows.
        keyed = [(passes.kind_of(r, k), 0 if k is None or cfg.cache == "dual" else k) for r, k in kinds]
        counts = collections.Counter(keyed)
        seconds_of = passes.time_kinds(model, cfg, prompts, dict(counts), repeats)
        total = sum(n * seconds_of[key] for key, n in counts.items())
        fields = {"bound_ms": statistics.fmean(bound(passes.forwards(kind, work)) for kind in kinds),
                  "memory_floor_ms": floor, "kinds_ms_per_pass": 1e3 * total / result.passes,
                  "kinds_ms_per_token": 1e3 * total / float(result.lengths.sum()), "kinds_cover": total / seconds}
        for name in passes.KINDS:
            mine = [i for i, (kind, _) in enumerate(keyed) if kind == name]
            fields[f"{name}_passes"] = len(mine)
            if mine:
                fields[f"{name}_ms"] = 1e3 * statistics.fmean(seconds_of[keyed[i]] for i in mine)
                fields[f"{name}_bound_ms"] = statistics.fmean(bound(passes.forwards(kinds[i], work)) for i in mine)
        return fields

    return account


def bench_canvas(model: Transformer, cfg: passes.CanvasConfig, batch: int, prompt_len: int,
                 ceilings: dict[str, float], repeats: int, profile: bool = False) -> Row:
    """LLaDA's block decoder (LLaDAConfig), threshold decoding (ThresholdConfig) or Fast-dLLM's Dream
    block decoding (DreamBlockConfig) of a diffusion model.
    Without a cache every pass runs the whole sequence, prompt and answer, through the model; with
    one (cfg.cache) a block's first pass does (a refresh) and its later passes run a window: the
    block (dual), or the answer from the block's start (prefix). Either way the output head and the
    rule run on each row's block alone. The two kinds are counted, bounded and timed apart (Row;
    bench.passes)."""
    prompts = random_prompts([model.cfg], batch, prompt_len)
    block = cfg.block_size
    cache = "" if cfg.cache == "none" else f" cache={cfg.cache}"
    if isinstance(cfg, LLaDAConfig):
        name = f"LLaDA steps={cfg.step_count} block={cfg.block_size}{cache}"
        run = lambda: llada_generate(model, prompts, cfg)  # noqa: E731
    elif isinstance(cfg, DreamBlockConfig):
        rule = "schedule" if cfg.threshold is None else f"threshold={cfg.threshold:g}"
        name = f"Dream block steps={cfg.step_count} block={block} {rule}{cache}"
        run = lambda: dream_block_generate(model, prompts, cfg)  # noqa: E731
    else:
        blocks = "" if cfg.block_length is None else f" block={cfg.block_length}"
        name = f"{model.cfg.model_type} threshold={cfg.threshold:g}{blocks}{cache}"
        run = lambda: threshold_generate(model, prompts, cfg)  # noqa: E731
    return _measure(name + sampling_label(cfg), batch, run,
                    _canvas_account(model, cfg, prompts, prompt_len, ceilings, repeats), repeats, profile)


LEFTRIGHT_WM = (16, 100)  # the left-to-right baseline's (W, M), in JAX and in PyTorch alike
LLADA_BLOCK = 32  # the LLaDA baseline's block_length (the published generate's default), steps = answer length
THRESHOLD = 0.9  # the threshold baseline's (Fast-dLLM's default)


HEADER = (
    f"{'benchmark':<46} {'batch':>5} {'ms/pass':>8} {'bound':>7} {'x bound':>7} {'floor':>6} "
    f"{'tok/s':>8} {'tok/pass':>8} {'passes':>6} {'compile s':>9} {'peak GB':>7}"
)


def _kind_lines(r: Row) -> list[str]:
    """The extra lines under a row: the compiled widths' bound, the kinds of pass and their check."""
    lines = []
    if r.bound_compiled_ms is not None:
        lines.append(f"    bound over the compiled widths {r.bound_compiled_ms:.2f} ms "
                     f"({r.ratios()['ratio_to_compiled_bound']:.2f}x); over the positions asked {r.bound_ms:.2f} ms "
                     f"({r.ratio_to_bound:.2f}x)")
    if r.refresh_passes is not None:
        ratios = r.ratios()
        kinds = [f"{getattr(r, f'{kind}_passes')} {kind} x {getattr(r, f'{kind}_ms'):.2f} ms (bound "
                 f"{getattr(r, f'{kind}_bound_ms'):.2f}, {ratios[f'{kind}_ratio_to_bound']:.2f}x)"
                 for kind in passes.KINDS if getattr(r, f"{kind}_passes")]
        lines.append("    passes: " + " + ".join(kinds) + f" = {r.kinds_ms_per_pass:.2f} ms/pass, "
                     f"{r.kinds_ms_per_token:.2f} ms/token; counts x times = {100 * r.kinds_cover:.0f} % of the "
                     "call's time")
    return lines


def format_row(r: Row) -> str:
    peak = "-" if r.peak_memory_gb is None else f"{r.peak_memory_gb:.1f}"
    line = (
        f"{r.name:<46} {r.batch:>5} {r.ms_per_pass:>8.2f} {r.bound_ms:>7.2f} {r.ratio_to_bound:>7.2f} "
        f"{r.memory_floor_ms:>6.2f} {r.tokens_per_s:>8.1f} {r.tokens_per_pass:>8.2f} {r.passes:>6} "
        f"{r.compile_s:>9.1f} {peak:>7}"
    )
    lines = [line, *_kind_lines(r)]
    if r.profile is None:
        return "\n".join(lines)
    if not r.profile:
        return "\n".join([*lines, "    device profile: the trace holds no device ops (the CPU backend records none)"])
    ops = [f"    {ms:8.3f} ms/pass  x{calls:<6.1f} {name[:90]}" for name, ms, calls in r.profile]
    total = sum(ms for _, ms, _ in r.profile)
    kinds = sorted(r.profile_kinds.items(), key=lambda kind: -kind[1][0])
    busy, kernels = (sum(v[i] for _, v in kinds) for i in (0, 1))
    by_kind = ", ".join(f"{kind} {ms:.2f} ms ({n:.0f})" for kind, (ms, n) in kinds)
    return "\n".join([*lines, "    device profile, top ops:", *ops, f"    {total:8.3f} ms/pass in these ops",
                      f"    every op: {busy:.2f} ms/pass in {kernels:.0f} kernels; by kind (kernels): {by_kind}"])


def to_json(rows: list[Row], ceilings: dict[str, float], extra: dict | None = None) -> str:
    return json.dumps(
        {
            "device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "ceilings": ceilings,
            "rows": [dataclasses.asdict(r) | r.ratios() for r in rows],
            **(extra or {}),
        },
        indent=2,
    )


def device_profile(fn: Callable[[], Any]) -> tuple[list[tuple[str, float, int]], Any]:
    """Device time per op name over one call of `fn`, from a jax.profiler trace.

    Returns ([(op name, total ms, count)] sorted by time, fn's result). Device ops are
    read from each device plane's "XLA Ops" line when there is one, else from its
    stream lines.
    """
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            result = jax.block_until_ready(fn())
        data = ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        chosen = [line for line in lines if line.name == "XLA Ops"] or [
            line for line in lines if line.name.startswith("Stream")
        ]
        for line in chosen:
            for event in line.events:
                totals[event.name][0] += event.duration_ns / 1e6
                totals[event.name][1] += 1
    ranked = sorted(((name, ms, n) for name, (ms, n) in totals.items()), key=lambda r: -r[1])
    return ranked, result


def op_kind(name: str) -> str:
    """A device op's kind from its kernel or fusion name: gemm (cuBLAS's nvjet and XLA's Triton
    gemm fusions), copy, scatter (the KV caches' writes), reduce, or other (elementwise fusions)."""
    if name.startswith(("nvjet", "gemm_fusion", "cutlass")) or "gemm" in name or "cublas" in name:
        return "gemm"
    if "memcpy" in name.lower() or name.startswith("copy"):
        return "copy"
    return next((kind for kind in ("scatter", "reduce") if kind in name), "other")


def per_pass_profile(run: Callable[[], GenerationResult], top: int = 25) -> dict[str, Any]:
    """One more call of `run` profiled, per pass of that call: its `top` device ops as (name, ms, calls)
    and every op summed by kind (op_kind) as {kind: (ms, kernels)}: Row's profile fields."""
    ops, result = device_profile(run)
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ms, n in ops:
        kind = kinds[op_kind(name)]
        kind[0] += ms / result.passes
        kind[1] += n / result.passes
    return {"profile": [(name, ms / result.passes, n / result.passes) for name, ms, n in ops[:top]],
            "profile_kinds": {kind: (ms, n) for kind, (ms, n) in kinds.items()}}
