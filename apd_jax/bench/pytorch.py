"""PyTorch side by side: the published APD loop and HF `generate` at the real shapes, random bf16 weights.

`apd-jax bench --torch` runs this in its own process (PyTorch and JAX never share the GPU's
memory), on the prompts, settings and weight distribution of `apd-jax bench`:

- **PyTorch APD**: `torch_reference.decoders.torch_apd_generate`, the port of the published `apd_sample`
  loop the parity tests hold apd_jax to; batch 1, greedy, with the drafter's KV cache on and
  off (the published default, Dream's use_cache false: the same loop with W past the length).
- **PyTorch Dream left-to-right K**: `torch_leftright_generate`, the "Dream K=k" baseline.
- **HF `generate`**: greedy decoding of a Qwen2.5-7B-shaped `Qwen2ForCausalLM`.
- **LLaDA `generate`**: the published LLaDA `generate` (bench/llada_generate_published.py) on the published
  modeling code (bench/llada_published/) at LLaDA-8B shapes, steps = answer length; beside it
  Fast-dLLM's cached samplers (bench/fastdllm_generate_published.py): the same rule with the prefix
  and the dual cache, and its threshold rule with the dual cache (its headline setting).
- **Fast-dLLM Dream block decoding**: `DreamGenerationMixin._sample` with the dual cache
  (bench/dream_published/generation_utils_block.py) on Fast-dLLM's Dream modeling code
  (bench/dream_published/modeling_dream.py) at Dream-7B shapes: its timestep schedule at steps =
  answer length and its threshold rule, beside `apd-jax bench --baselines dream-block`'s rows.

Medians of timed calls after a warm-up, synchronised; `--against JAX.json` (an `apd-jax bench`
run of the same session) prints PyTorch's ms per pass over apd_jax's for each matching row.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from apd_jax.utils.runtime import runtime_defaults

# This process may import JAX (the configs): it must not reserve the GPU's memory from PyTorch.
runtime_defaults()

from apd_jax.models.config import ModelConfig  # noqa: E402 (after the defaults: it imports JAX)

NO_CACHE_W = 1 << 30  # a window past any sequence: the drafter recomputes [0, right) every pass


@dataclasses.dataclass(frozen=True)
class TorchRow:
    name: str
    # apd | leftright | ar | llada[ CACHE] | threshold CACHE | dream-block RULE CACHE: matched against
    # `apd-jax bench` rows
    decoder: str
    R: float | None
    W: int | None
    M: int | None
    drafter_cache: bool | None
    batch: int
    ms_per_pass: float  # per token for ar
    tokens_per_pass: float
    passes: int
    tokens_per_s: float
    # Fast-dLLM's cached samplers (LLaDA's, Dream's): refresh passes (the whole sequence) and window passes apart, each
    # pass timed from its forward's start to the next forward's (its forward and the rule after it),
    # on one more call; kinds_cover: those times' sum over the median call's time.
    refresh_passes: int | None = None
    window_passes: int | None = None
    refresh_ms: float | None = None
    window_ms: float | None = None
    kinds_cover: float | None = None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` synchronised calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _randomise(model: Any) -> Any:
    """normal(0.02) weights, unit norm scales: the distribution of `bench.random_model`."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:  # LLaDA's final norm is `ln_f`
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def _build(make: Callable[[], Any]) -> Any:
    """`make()` with parameters created directly on the device in bf16 (no float32 copy of a 7B model)."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(_device()):
            return _randomise(make())
    finally:
        torch.set_default_dtype(default)


def torch_dream(c: ModelConfig) -> Any:
    from apd_jax.bench.torch_reference.dream import DreamConfig, TorchDream

    cfg = DreamConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
    )
    return _build(lambda: TorchDream(cfg))


def torch_qwen2(c: ModelConfig) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
    )
    return _build(lambda: Qwen2ForCausalLM(config))


def torch_llada(c: ModelConfig) -> Any:
    from apd_jax.bench.llada_published.configuration_llada import LLaDAConfig
    from apd_jax.bench.llada_published.modeling_llada import LLaDAModelLM

    config = LLaDAConfig(**c.to_hf_dict()[0])  # the LLaDA family's config.json fields
    # The published LLaDAModelLM builds its modules on the CPU whatever the default device (it sets
    # init_device "cpu"): moved to the device before its weights are drawn.
    return _build(lambda: LLaDAModelLM(config, init_params=False).to(_device()))


def published_dream_config(c: ModelConfig) -> Any:
    """Fast-dLLM's DreamConfig (bench/dream_published/) of `c`'s shapes and token ids."""
    from apd_jax.bench.dream_published.configuration_dream import DreamConfig

    return DreamConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings, mask_token_id=c.mask_token_id, pad_token_id=c.pad_token_id,
    )


def torch_dream_published(c: ModelConfig) -> Any:
    from apd_jax.bench.dream_published.modeling_dream import DreamModel

    return _build(lambda: DreamModel(published_dream_config(c)))


def bench_llada_generate(model: Any, c: ModelConfig, prompt: list[int], gen_length: int, block_length: int,
                         repeats: int) -> TorchRow:
    import torch

    from apd_jax.bench.llada_generate_published import generate

    ids = torch.tensor([prompt], device=_device())
    with torch.no_grad():
        t, _ = _time_calls(lambda: generate(model, ids, steps=gen_length, gen_length=gen_length,
                                            block_length=block_length, mask_id=c.mask_token_id), repeats)
    return TorchRow(f"PyTorch LLaDA generate steps={gen_length} block={block_length} (published)", "llada", None,
                    None, None, None, 1, 1e3 * t / gen_length, 1.0, gen_length, gen_length / t)


class PassClock:
    """A model seen through Fast-dLLM's samplers: each forward call marks its start (a CUDA event on
    the GPU's stream, so nothing waits; the clock on the CPU) and its kind, a refresh when it runs the
    whole sequence of `length` positions, a window pass otherwise. Attributes are the model's."""

    def __init__(self, model: Any, length: int):
        self.model, self.length, self.marks = model, length, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        self.marks.append((x.shape[1] == self.length, _mark()))
        return self.model(x, *args, **kwargs)

    def kinds(self) -> tuple[list[float], list[float]]:
        """([ms of each refresh pass], [ms of each window pass]) of the call just run: each from its
        forward's start to the next forward's, the last to now."""
        import torch

        marks = [m for _, m in self.marks] + [_mark()]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            spans = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        else:
            spans = [1e3 * (b - a) for a, b in zip(marks, marks[1:])]
        return ([ms for (refresh, _), ms in zip(self.marks, spans) if refresh],
                [ms for (refresh, _), ms in zip(self.marks, spans) if not refresh])


def _mark() -> Any:
    import torch

    if not torch.cuda.is_available():
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


FASTDLLM_SAMPLERS = {"none": "generate", "prefix": "generate_with_prefix_cache", "dual": "generate_with_dual_cache"}


def bench_fastdllm(model: Any, c: ModelConfig, prompt: list[int], gen_length: int, block_length: int, cache: str,
                   threshold: float | None, repeats: int) -> TorchRow:
    """Fast-dLLM's LLaDA sampler with `cache`: LLaDA's rule at steps = answer length (threshold None),
    or its threshold rule; its passes are the forward calls it counts (nfe)."""
    import torch

    from apd_jax.bench import fastdllm_generate_published as published

    sampler = getattr(published, FASTDLLM_SAMPLERS[cache])
    ids = torch.tensor([prompt], device=_device())

    def run(model: Any) -> tuple[Any, int]:
        return sampler(model, ids, steps=gen_length, gen_length=gen_length, block_length=block_length,
                       mask_id=c.mask_token_id, threshold=threshold)

    clock = PassClock(model, len(prompt) + gen_length)
    with torch.no_grad():
        t, (_, nfe) = _time_calls(lambda: run(model), repeats)
        run(clock)
    refresh, window = clock.kinds()
    rule, decoder = ("LLaDA", "llada") if threshold is None else (f"threshold={threshold:g}", "threshold")
    return TorchRow(f"PyTorch Fast-dLLM {rule} steps={gen_length} block={block_length} {cache} cache (published)",
                    f"{decoder} {cache}", None, None, None, None, 1, 1e3 * t / nfe, gen_length / nfe, nfe,
                    gen_length / t, len(refresh), len(window), statistics.fmean(refresh),
                    statistics.fmean(window) if window else None, (sum(refresh) + sum(window)) / (1e3 * t))


def fastdllm_dream_sample(model: Any, ids: Any, gen_length: int, block_length: int, threshold: float | None,
                          mask_token_id: int, cache: str = "dual", steps: int | None = None) -> Any:
    """Fast-dLLM's Dream block decoding with the dual or the prefix cache, greedy: the published
    `_sample`'s canvas ([1, P + gen_length]) at `steps` (gen_length unless given, as bench runs it), by
    its timestep schedule (threshold None: alg "entropy", as Fast-dLLM's scripts run it) or its threshold
    rule (alg "confidence_threshold").

    `diffusion_generate` (under no_grad) only builds this config and calls `_sample`; calling `_sample`
    with the model as `self` lets a PassClock stand in for it, and names top_k: the published code takes
    it from the model config, where transformers 5 no longer puts one."""
    import torch

    from apd_jax.bench.dream_published.generation_utils_block import DreamGenerationConfig, DreamGenerationMixin
    from apd_jax.decoding.blocks.dream import DreamBlockConfig

    if cache not in ("dual", "prefix"):
        raise ValueError(f"cache={cache!r}: Fast-dLLM's Dream block decoding runs 'dual' or 'prefix'")
    settings = DreamGenerationConfig(  # top_k as apd_jax's DreamBlockConfig (the model config's in transformers 4)
        temperature=0.0, top_p=None, top_k=DreamBlockConfig().top_k, max_length=ids.shape[1] + gen_length,
        steps=gen_length if steps is None else steps, alg="entropy" if threshold is None else "confidence_threshold",
        mask_token_id=mask_token_id,
    )
    with torch.no_grad():
        return DreamGenerationMixin._sample(model, ids, attention_mask=None, generation_config=settings,
                                            threshold=threshold, block_length=block_length,
                                            dual_cache=cache == "dual")


def bench_fastdllm_dream(model: Any, c: ModelConfig, prompt: list[int], gen_length: int, block_length: int,
                         threshold: float | None, repeats: int) -> TorchRow:
    """Fast-dLLM's Dream block decoding (fastdllm_dream_sample) on its published model; its passes are
    the model's forward calls, counted on the PassClock's run."""
    import torch

    ids = torch.tensor([prompt], device=_device())
    t, _ = _time_calls(lambda: fastdllm_dream_sample(model, ids, gen_length, block_length, threshold,
                                                     c.mask_token_id), repeats)
    clock = PassClock(model, len(prompt) + gen_length)
    fastdllm_dream_sample(clock, ids, gen_length, block_length, threshold, c.mask_token_id)
    refresh, window = clock.kinds()
    passes = len(refresh) + len(window)
    rule = "schedule" if threshold is None else f"threshold={threshold:g}"
    return TorchRow(f"PyTorch Fast-dLLM Dream {rule} steps={gen_length} block={block_length} dual cache (published)",
                    f"dream-block {rule.partition('=')[0]} dual", None, None, None, None, 1, 1e3 * t / passes,
                    gen_length / passes, passes, gen_length / t, len(refresh), len(window), statistics.fmean(refresh),
                    statistics.fmean(window) if window else None, (sum(refresh) + sum(window)) / (1e3 * t))


def bench_apd(drafter: Any, verifier: Any, d_cfg: ModelConfig, v_cfg: ModelConfig, prompt: list[int],
              R: float, W: int, M: int, max_new_tokens: int, repeats: int, drafter_cache: bool) -> TorchRow:
    import torch

    from apd_jax.bench.torch_reference.decoders import torch_apd_generate

    def run() -> tuple[list[int], list[int]]:
        # eos -1: never stop early, so every call decodes max_new_tokens (as `apd-jax bench` does).
        return torch_apd_generate(
            drafter, verifier, prompt, max_new_tokens=max_new_tokens, R=R, W=W if drafter_cache else NO_CACHE_W,
            M=M, mask_token_id=d_cfg.mask_token_id, eos_token_id=-1,
            shared_vocab_size=min(d_cfg.vocab_size, v_cfg.vocab_size),
        )

    with torch.device(_device()):  # the reference makes its index tensors on the default device
        t, (tokens, counts) = _time_calls(run, repeats)
    cache = "on" if drafter_cache else "off (published default)"
    return TorchRow(f"PyTorch APD R={R} W={W} M={M}, drafter cache {cache}", "apd", R, W, M, drafter_cache, 1,
                    1e3 * t / len(counts), len(tokens) / len(counts), len(counts), len(tokens) / t)


def bench_leftright(drafter: Any, d_cfg: ModelConfig, prompt: list[int], K: int, W: int, M: int,
                    max_new_tokens: int, repeats: int) -> TorchRow:
    import torch

    from apd_jax.bench.torch_reference.decoders import torch_leftright_generate

    def run() -> tuple[list[int], list[int]]:
        return torch_leftright_generate(drafter, prompt, max_new_tokens=max_new_tokens, K=K, W=W, M=M,
                                        mask_token_id=d_cfg.mask_token_id, eos_token_id=-1,
                                        shared_vocab_size=d_cfg.vocab_size)

    with torch.device(_device()):
        t, (tokens, counts) = _time_calls(run, repeats)
    return TorchRow(f"PyTorch Dream left-to-right K={K} W={W} M={M}", "leftright", None, W, M, True, 1,
                    1e3 * t / len(counts), len(tokens) / len(counts), len(counts), len(tokens) / t)


def bench_hf_generate(model: Any, prompt: list[int], max_new_tokens: int, repeats: int) -> TorchRow:
    import torch

    ids = torch.tensor([prompt], device=_device())
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        t, _ = _time_calls(lambda: model.generate(ids, **gen), repeats)
    return TorchRow("PyTorch HF generate (Qwen2.5-7B shapes)", "ar", None, None, None, None, 1,
                    1e3 * t / max_new_tokens, 1.0, max_new_tokens, max_new_tokens / t)


HEADER = f"{'benchmark':<70} {'batch':>5} {'ms/pass':>8} {'tok/pass':>8} {'passes':>6} {'tok/s':>7}"


def format_row(r: TorchRow) -> str:
    line = (f"{r.name:<70} {r.batch:>5} {r.ms_per_pass:>8.2f} {r.tokens_per_pass:>8.2f} {r.passes:>6} "
            f"{r.tokens_per_s:>7.1f}")
    if r.refresh_passes is None:
        return line
    window = f" + {r.window_passes} window x {r.window_ms:.2f} ms" if r.window_passes else ""
    return (f"{line}\n    passes: {r.refresh_passes} refresh x {r.refresh_ms:.2f} ms{window}; their sum = "
            f"{100 * r.kinds_cover:.0f} % of the call's time")


def _jax_key(row: dict) -> tuple | None:
    """(decoder, R, W, M) of an `apd-jax bench` JSON row at batch 1 (its names: 'APD R=.. W=.. M=..')."""
    if row["batch"] != 1 or "adaptive" in row["name"]:  # the published loop has no adaptive lookahead
        return None
    fields = dict(part.split("=") for part in row["name"].split() if "=" in part)
    if row["name"].startswith("APD"):
        return ("apd", float(fields["R"]), int(fields["W"]), int(fields["M"]))
    if row["name"].startswith("Dream left-to-right"):
        return ("leftright", None, int(fields["W"]), int(fields["M"]))
    if row["name"].startswith("AR decode"):
        return ("ar", None, None, None)
    cache = fields.get("cache")
    if row["name"].startswith("Dream block"):  # before the threshold rows: its threshold is Dream's rule
        rule = "schedule" if "schedule" in row["name"].split() else "threshold"
        return (f"dream-block {rule} {cache or 'none'}", None, None, None)
    if row["name"].startswith("LLaDA steps="):
        return ("llada" if cache is None else f"llada {cache}", None, None, None)
    if "threshold" in fields and cache is not None:  # Fast-dLLM's threshold rule decodes with a cache only
        return (f"threshold {cache}", None, None, None)
    return None


def ratios(rows: list[TorchRow], jax_json: Path) -> list[str]:
    """One line per PyTorch row that `apd-jax bench` also ran: PyTorch ms / apd_jax ms."""
    jax_rows = {k: r for r in json.loads(jax_json.read_text())["rows"] if (k := _jax_key(r)) is not None}
    lines = []
    for r in rows:
        j = jax_rows.get((r.decoder, r.R, r.W, r.M))
        if j is not None:
            line = (f"{r.name}: {r.ms_per_pass:.2f} ms against apd_jax's {j['ms_per_pass']:.2f} ms "
                    f"({r.ms_per_pass / j['ms_per_pass']:.1f}x)")
            for kind in ("refresh", "window"):
                mine, theirs = getattr(r, f"{kind}_ms"), j.get(f"{kind}_ms")
                if mine is not None and theirs is not None:
                    line += f"; {kind} {mine:.2f} ms against {theirs:.2f} ms ({mine / theirs:.1f}x)"
            lines.append(line)
    return lines


def run(shapes: tuple[ModelConfig, ModelConfig, ModelConfig, ModelConfig], settings: list[tuple[float, int, int]],
        prompt_len: int, max_new_tokens: int, repeats: int, baselines: list[str],
        log: Callable[[str], None] = print,
        on_row: Callable[[list[TorchRow]], None] = lambda rows: None,
        caches: Sequence[str] = ("none", "prefix", "dual")) -> list[TorchRow]:
    """Every PyTorch row: HF generate (if asked for), APD per setting (drafter cache on and off), left-to-right,
    Fast-dLLM's Dream block decoding (dual cache) and LLaDA's generate (no cache) and Fast-dLLM's cached
    samplers (if asked for), those of the block decoders with a cache mode in `caches`.

    `on_row` receives the rows so far after each one (bench writes its JSON there)."""
    import torch
    import transformers

    from apd_jax.bench.decoders import LEFTRIGHT_WM, LLADA_BLOCK, THRESHOLD, random_prompts

    d_cfg, v_cfg, ar_cfg, llada_cfg = shapes
    if not torch.cuda.is_available() and d_cfg.hidden_size > 1024:
        raise ValueError("apd-jax bench --torch at the real shapes needs a CUDA GPU (--shapes tiny runs on CPU)")
    log(f"PyTorch {torch.__version__}, transformers {transformers.__version__}, {_device_name()}")
    prompt = random_prompts([d_cfg, v_cfg], 1, prompt_len)[0]
    rows: list[TorchRow] = []

    def report(row: TorchRow) -> None:
        rows.append(row)
        log(format_row(row))
        on_row(rows)

    log(HEADER)
    if "ar" in baselines:  # first: the fastest row, and the only one that needs its own 7B model
        ar = torch_qwen2(ar_cfg)
        report(bench_hf_generate(ar, prompt, max_new_tokens, repeats))
        del ar
    drafter = verifier = None
    if settings or "leftright" in baselines:
        drafter, verifier = torch_dream(d_cfg), torch_qwen2(v_cfg)
    for R, W, M in settings:
        for cache in (True, False):
            report(bench_apd(drafter, verifier, d_cfg, v_cfg, prompt, R, W, M, max_new_tokens, repeats, cache))
    if "leftright" in baselines:
        report(bench_leftright(drafter, d_cfg, prompt, 1, *LEFTRIGHT_WM, max_new_tokens, repeats))
    block = min(LLADA_BLOCK, max_new_tokens)  # as `apd-jax bench` decodes its block rows
    # Fast-dLLM's Dream: the schedule and the threshold rule, dual cache, as `apd-jax bench` runs them.
    if "dream-block" in baselines and "dual" in caches:
        drafter = verifier = None  # make room for Fast-dLLM's Dream model
        dream = torch_dream_published(d_cfg)
        dream_prompt = random_prompts([d_cfg], 1, prompt_len)[0]
        for threshold in (None, THRESHOLD):
            report(bench_fastdllm_dream(dream, d_cfg, dream_prompt, max_new_tokens, block, threshold, repeats))
        dream = None
    if "llada" in baselines:
        drafter = verifier = None  # make room for the 8B model
        llada = torch_llada(llada_cfg)
        llada_prompt = random_prompts([llada_cfg], 1, prompt_len)[0]
        if "none" in caches:
            report(bench_llada_generate(llada, llada_cfg, llada_prompt, max_new_tokens, block, repeats))
        for cache, threshold in [(c, t) for c, t in (("prefix", None), ("dual", None), ("dual", THRESHOLD))
                                 if c in caches]:
            report(bench_fastdllm(llada, llada_cfg, llada_prompt, max_new_tokens, block, cache, threshold, repeats))
    return rows


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def to_json(rows: list[TorchRow]) -> str:
    import torch
    import transformers

    return json.dumps({"device": _device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
