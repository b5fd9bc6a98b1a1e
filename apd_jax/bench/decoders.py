"""Benchmarks: APD and its baselines at the real model shapes, against the hardware's own bounds.

Models of the real shapes get random weights created on the device (no
checkpoint), or real converted checkpoints when given. Every figure is taken
after a warm-up call, as the median of timed calls, next to the bound measured in
the same run: device copy bandwidth (bytes read + written) and a large bf16
matmul's rate. A pass's bound is max(weight bytes / bandwidth, FLOPs / matmul rate).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
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

from apd_jax.decoding.apd import APDConfig, apd_generate, leftright_generate
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.blocks.loop import block_size
from apd_jax.decoding.diffusion import ThresholdConfig, threshold_generate
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


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the decoder layers, parameters of the output head): each costs 2 FLOPs per token."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp), h * cfg.vocab_size


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


def _call_times(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls of fn, waited for, and the last call's output."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times, out


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = _call_times(fn, repeats)
    return statistics.median(times), out


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` calls after as many warm-up calls: a ceiling is the best the device
    does once its clocks are up (an idle GPU starts at a fraction of its clock)."""
    _call_times(fn, repeats)
    return min(_call_times(fn, repeats)[0])


def device_ceilings(size_mb: int = 2048) -> dict[str, float]:
    """Measured copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""
    x = jax.random.normal(jax.random.key(1), (size_mb * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    t = _best_time(lambda: copy(x), 20)
    n = 8192 if jax.default_backend() != "cpu" else 512
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    tm = _best_time(lambda: mm(a, a), 20)
    return {"bandwidth": 2 * x.nbytes / t, "matmul_flops": 2 * n**3 / tm}


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class Row:
    """One benchmark line."""

    name: str
    batch: int
    ms_per_pass: float
    tokens_per_s: float
    tokens_per_pass: float
    passes: int
    compile_s: float
    bound_ms: float  # roofline bound of one pass
    memory_floor_ms: float
    peak_memory_gb: float | None
    # with profile=True: the top device ops of one more call, as (name, ms per pass, calls per pass)
    profile: list[tuple[str, float, float]] | None = None

    @property
    def ratio_to_bound(self) -> float:
        return self.ms_per_pass / self.bound_ms


def _measure(name: str, batch: int, run: Callable[[], GenerationResult],
             bound: Callable[[GenerationResult], tuple[float, float]], repeats: int, profile: bool) -> Row:
    start = time.perf_counter()
    jax.block_until_ready(run().tokens)
    first = time.perf_counter() - start
    t, result = _median_time(run, repeats)
    bound_ms, floor_ms = bound(result)
    peak = peak_memory()
    return Row(
        name=name, batch=batch, ms_per_pass=1e3 * t / result.passes,
        tokens_per_s=float(result.lengths.sum()) / t, tokens_per_pass=result.tokens_per_pass(),
        passes=result.passes, compile_s=first - t, bound_ms=bound_ms, memory_floor_ms=floor_ms,
        peak_memory_gb=None if peak is None else peak / 1e9,
        profile=per_pass_profile(run) if profile else None,
    )


def sampling_label(cfg: DecoderConfig) -> str:
    """' T=.. p=..' for a sampled setting, '' for greedy: part of a row's name."""
    return "" if cfg.temperature == 0 and cfg.top_p == 1 else f" T={cfg.temperature:g} p={cfg.top_p:g}"


def _roofline(flops: float, nbytes: float, ceilings: dict[str, float]) -> tuple[float, float]:
    floor = 1e3 * nbytes / ceilings["bandwidth"]
    return max(floor, 1e3 * flops / ceilings["matmul_flops"]), floor


def bench_apd(drafter: Transformer, verifier: Transformer, cfg: APDConfig, batch: int, prompt_len: int,
              ceilings: dict[str, float], repeats: int, name: str = "APD", profile: bool = False) -> Row:
    prompts = random_prompts([drafter.cfg, verifier.cfg], batch, prompt_len)
    nbytes = param_bytes(drafter) + param_bytes(verifier)
    layers_d, head_d = matmul_params(drafter.cfg)
    layers_v, head_v = matmul_params(verifier.cfg)
    def bound(result: GenerationResult) -> tuple[float, float]:
        # Drafter: a window of about W - 1 + k + M tokens per row; heads and verifier over the draft. With
        # adaptive lookahead, M is the rule's lookahead at the mean k (an estimate: the levels round it up).
        k = result.tokens_per_pass()
        draft = float(cfg.next_lookahead(jnp.int32(math.ceil(k)))) if cfg.M_min is not None else cfg.M
        draft = min(draft, cfg.max_new_tokens)
        window = cfg.W - 1 + k + draft
        flops = 2 * batch * (layers_d * window + (head_d + layers_v + head_v) * draft)
        return _roofline(flops, nbytes, ceilings)

    adaptive = "" if cfg.M_min is None else f" adaptive {cfg.M_min},{cfg.M_scale:g},{cfg.M_margin}"
    run = lambda: apd_generate(drafter, verifier, prompts, cfg)  # noqa: E731
    return _measure(f"{name} R={cfg.R} W={cfg.W} M={cfg.M}{adaptive}{sampling_label(cfg)}", batch, run, bound,
                    repeats, profile)


def bench_leftright(drafter: Transformer, K: int, cfg: APDConfig, batch: int, prompt_len: int,
                    ceilings: dict[str, float], repeats: int, profile: bool = False) -> Row:
    prompts = random_prompts([drafter.cfg], batch, prompt_len)
    layers_d, head_d = matmul_params(drafter.cfg)
    draft = min(cfg.M, cfg.max_new_tokens)

    def bound(result: GenerationResult) -> tuple[float, float]:
        flops = 2 * batch * (layers_d * (cfg.W - 1 + K + draft) + head_d * draft)
        return _roofline(flops, param_bytes(drafter), ceilings)

    run = lambda: leftright_generate(drafter, prompts, K, cfg)  # noqa: E731
    return _measure(f"Dream left-to-right K={K} W={cfg.W} M={cfg.M}{sampling_label(cfg)}", batch, run, bound,
                    repeats, profile)


def bench_ar(model: Transformer, cfg: ARConfig, batch: int, prompt_len: int, ceilings: dict[str, float],
             repeats: int, profile: bool = False) -> Row:
    prompts = random_prompts([model.cfg], batch, prompt_len)
    layers, head = matmul_params(model.cfg)

    def bound(result: GenerationResult) -> tuple[float, float]:
        return _roofline(2 * batch * (layers + head), param_bytes(model), ceilings)

    run = lambda: ar_generate(model, prompts, cfg)  # noqa: E731
    return _measure(f"AR decode{sampling_label(cfg)}", batch, run, bound, repeats, profile)


def bench_canvas(model: Transformer, cfg: LLaDAConfig | ThresholdConfig | DreamBlockConfig, batch: int, prompt_len: int,
                 ceilings: dict[str, float], repeats: int, profile: bool = False) -> Row:
    """LLaDA's block decoder (LLaDAConfig), threshold decoding (ThresholdConfig) or Fast-dLLM's Dream
    block decoding (DreamBlockConfig) of a diffusion model.
    Without a cache every pass runs the whole sequence, prompt and answer, through the model; with
    one (cfg.cache) a block's first pass does (a refresh) and its later passes run a window: the
    block (dual), or the answer from the block's start, (N + block) / 2 positions on average
    (prefix). The bound is the passes' mean, with one refresh per block and the rows in step."""
    prompts = random_prompts([model.cfg], batch, prompt_len)
    layers, head = matmul_params(model.cfg)
    guided = 2 if getattr(cfg, "cfg_scale", 0) > 0 else 1  # guidance runs a second, prompt-masked row
    n, block = cfg.max_new_tokens, block_size(cfg.block_length, cfg.max_new_tokens)
    window = {"none": prompt_len + n, "prefix": (n + block) / 2, "dual": block}[cfg.cache]

    def bound(result: GenerationResult) -> tuple[float, float]:
        def pass_ms(tokens: float, answer: float) -> float:
            return _roofline(2 * batch * guided * (layers * tokens + head * answer), param_bytes(model), ceilings)[0]

        refreshes = n // block if cfg.cache != "none" else 0
        refresh_ms = refreshes * pass_ms(prompt_len + n, n)
        window_ms = (result.passes - refreshes) * pass_ms(window, n if cfg.cache == "none" else window)
        return (refresh_ms + window_ms) / result.passes, _roofline(0, param_bytes(model), ceilings)[1]

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
    return _measure(name + sampling_label(cfg), batch, run, bound, repeats, profile)


LEFTRIGHT_WM = (16, 100)  # the left-to-right baseline's (W, M), in JAX and in PyTorch alike
LLADA_BLOCK = 32  # the LLaDA baseline's block_length (the published generate's default), steps = answer length
THRESHOLD = 0.9  # the threshold baseline's (Fast-dLLM's default)


HEADER = (
    f"{'benchmark':<46} {'batch':>5} {'ms/pass':>8} {'bound':>7} {'x bound':>7} {'floor':>6} "
    f"{'tok/s':>8} {'tok/pass':>8} {'passes':>6} {'compile s':>9} {'peak GB':>7}"
)


def format_row(r: Row) -> str:
    peak = "-" if r.peak_memory_gb is None else f"{r.peak_memory_gb:.1f}"
    line = (
        f"{r.name:<46} {r.batch:>5} {r.ms_per_pass:>8.2f} {r.bound_ms:>7.2f} {r.ratio_to_bound:>7.2f} "
        f"{r.memory_floor_ms:>6.2f} {r.tokens_per_s:>8.1f} {r.tokens_per_pass:>8.2f} {r.passes:>6} "
        f"{r.compile_s:>9.1f} {peak:>7}"
    )
    if r.profile is None:
        return line
    if not r.profile:
        return line + "\n    device profile: the trace holds no device ops (the CPU backend records none)"
    ops = [f"    {ms:8.3f} ms/pass  x{calls:<6.1f} {name[:90]}" for name, ms, calls in r.profile]
    total = sum(ms for _, ms, _ in r.profile)
    return "\n".join([line, "    device profile, top ops:", *ops, f"    {total:8.3f} ms/pass in these ops"])


def to_json(rows: list[Row], ceilings: dict[str, float], extra: dict | None = None) -> str:
    return json.dumps(
        {
            "device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "ceilings": ceilings,
            "rows": [dataclasses.asdict(r) | {"ratio_to_bound": r.ratio_to_bound} for r in rows],
            **(extra or {}),
        },
        indent=2,
    )


def device_profile(fn: Callable[[], Any], top: int = 25) -> tuple[list[tuple[str, float, int]], Any]:
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
    return ranked[:top], result


def per_pass_profile(run: Callable[[], GenerationResult]) -> list[tuple[str, float, float]]:
    """The top device ops of one call of `run`, as (name, ms per pass, calls per pass),
    divided by that call's own pass count."""
    ops, result = device_profile(run)
    return [(name, ms / result.passes, n / result.passes) for name, ms, n in ops]
