"""`apd-jax bench`: APD, left-to-right, autoregressive and LLaDA decoding at real shapes, against hardware bounds.

Default shapes: Dream-v0-Instruct-7B drafter, Qwen2.5-0.5B verifier, Qwen2.5-7B for
the AR baseline, LLaDA-8B for the LLaDA baseline (its block decoder, steps = answer length,
and threshold decoding), random bf16 weights made on the device. `--shapes tiny` runs the
same code path on tiny models (CPU, CI). `--torch` runs the PyTorch side instead
(apd_jax/bench/pytorch.py: the published APD loop, Dream left-to-right, HF `generate`, Fast-dLLM's
published Dream block decoding, LLaDA's published `generate` and Fast-dLLM's LLaDA samplers at the same shapes),
in its own process so the two frameworks never share the GPU's memory; run it after `apd-jax bench --json J.json`
with `--against J.json` for the ratios.
`--quantize MODE` gives every model 8-bit weights (apd_jax.models.quantize) and prints each one's
logits' relative difference from its unquantized self; `--quality N` instead decodes N held-out
prompts with the embedded pair's weights as stored, in the other float dtype and in 8 bits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from apd_jax.bench import decoders as bench
from apd_jax.bench import workload
from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.autoregressive import ARConfig
from apd_jax.decoding.blocks.dream import DreamBlockConfig
from apd_jax.decoding.blocks.llada import LLaDAConfig
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.checkpoints import load_model
from apd_jax.cli.common import (
    DefaultsHelpFormatter, check_writable, corpus_prompts, finite_float, positive_int, positive_int_list, user_path,
)
from apd_jax.models.config import (
    ATTENTION_IMPLEMENTATIONS, ModelConfig, dream_7b_config, llada_8b_config, qwen25_05b_config, qwen25_7b_config,
    tiny_config,
)
from apd_jax.models.llada import LLADA
from apd_jax.models.model import Transformer, with_config
from apd_jax.models.quantize import MODES, quantize
from apd_jax.text.tokenizer import load_tokenizer_file
from apd_jax.utils.files import written_atomically


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark decoding speed", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--shapes", choices=("real", "tiny"), default="real",
                   help="real: Dream-7B / Qwen2.5-0.5B / Qwen2.5-7B shapes; tiny: tiny models (CPU, CI)")
    p.add_argument("--drafter", type=user_path, help="real drafter checkpoint (default: random weights)")
    p.add_argument("--verifier", type=user_path, help="real verifier checkpoint (default: random weights)")
    p.add_argument("--batch", type=positive_int_list, default="1,4,16,32", help="comma-separated batch sizes")
    p.add_argument("--settings", default="0.7,16,100;0.6,32,200",
                   help="APD settings, ';'-separated: 'R,W,M', or 'R,W,M,M_min,M_scale,M_margin' for adaptive "
                        "lookahead; none: no APD rows (only the --baselines; the Dream/Qwen pair is then not built "
                        "unless a baseline runs on it)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per row")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens generated per row")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed calls of each benchmark after its first, compiling one; the median is reported")
    p.add_argument("--temperature", type=finite_float, default=0.0,
                   help="every decoder's sampling temperature (0: greedy, as the published code's default)")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="every decoder's nucleus filter (1: off)")
    p.add_argument("--baselines", type=_baselines, default="ar,leftright",
                   help="comma-separated: ar, leftright, llada (LLaDA-8B: its block decoder without and with "
                        "Fast-dLLM's prefix and dual caches, and threshold decoding), dream-block (Fast-dLLM's Dream "
                        "block decoding, dual cache: its schedule and threshold rule); batch 1, the dual-cache rows "
                        "also at every --batch size; or none. With --torch: the published code of each, batch 1")
    p.add_argument("--caches", type=_caches, default="none,prefix,dual",
                   help="the KV cache modes of the llada and dream-block rows, comma-separated none, prefix, dual "
                        "(the prefix rows compile a window per block: one call each keeps calls short); "
                        "dream-block runs dual only, as the published code")
    p.add_argument("--profile", action="store_true",
                   help="profile one more call of every benchmark and print its top device ops per pass")
    p.add_argument("--torch", action="store_true",
                   help="the PyTorch side instead: the published APD loop (drafter cache on and off), Dream "
                        "left-to-right and HF generate, and the published code of the --baselines (Fast-dLLM's "
                        "Dream block decoding, LLaDA's generate, Fast-dLLM's samplers), same shapes and settings "
                        "(CUDA GPU)")
    p.add_argument("--against", type=user_path,
                   help="with --torch: the JSON of an `apd-jax bench` run, to print PyTorch/apd_jax ratios "
                        "(default: none)")
    p.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="xla",
                   help="attention implementation of every model (cudnn: CUDA GPUs; its logits are "
                        "compared with xla's first)")
    p.add_argument("--quantize", choices=tuple(MODES),
                   help="8-bit weights for every model (drafter, verifier, the AR and LLaDA baselines; int8: "
                        "weight-only; fp8: e4m3 weights and activations; fp8-weights: e4m3 weight-only), each model's "
                        "logits compared with its unquantized self's first (default: none)")
    p.add_argument("--quality", type=positive_int, metavar="N",
                   help="instead of timing: N held-out prompts of the stdlib corpus decoded greedily by APD (the first "
                        "--settings entry, --max-new-tokens) with the unquantized pair (--drafter and --verifier, "
                        "default the embedded pair) and with each 8-bit mode (--quantize: that one); prints tokens per "
                        "pass, the unquantized verifier's mean log-likelihood of the output and the agreement with the "
                        "unquantized output (default: off)")
    p.add_argument("--workload", type=positive_int, metavar="N",
                   help="instead of the rows above: N prompts with budgets drawn from --budgets, decoded by APD "
                        "(the first --settings entry) in fixed batches (in file order, or sorted by budget) and with "
                        "continuous batching over the first --batch slots; prints tokens/s and slot occupancy "
                        "(default: off)")
    p.add_argument("--budgets", type=_budgets, default="32-512",
                   help="with --workload: each prompt's max_new_tokens, uniform in LOW-HIGH")
    p.add_argument("--runs", type=_runs, default="fixed,continuous",
                   help="with --workload: the runs to time, comma-separated (one per call keeps each call short; "
                        "the workload is the same in every call)")
    p.add_argument("--group", type=positive_int, default=None,
                   help="with --workload: slots the continuous run refills at once (default: an eighth of them)")
    p.add_argument("--json", type=user_path, help="write the results as JSON here (default: print only)")
    p.set_defaults(func=run)


BASELINES = ("ar", "leftright", "llada", "dream-block")


def _baselines(text: str) -> list[str]:
    """--baselines: comma-separated BASELINES, or 'none' alone."""
    names = [name.strip() for name in text.split(",")]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: unknown baseline {unknown[0]!r}; expected "
                                         f"comma-separated {', '.join(BASELINES)}, or none")
    return names


CACHES = ("none", "prefix", "dual")


def _caches(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not names or any(name not in CACHES for name in names):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated {', '.join(CACHES)}")
    return names


def _runs(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in workload.RUNS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated {', '.join(workload.RUNS)}")
    return names


def _budgets(text: str) -> tuple[int, int]:
    try:
        return workload.parse_budgets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse_settings(text: str, max_new_tokens: int, **sampling: float) -> list[APDConfig]:
    """'R,W,M' (the paper's fixed M) or 'R,W,M,M_min,M_scale,M_margin' (adaptive lookahead), ';'-separated,
    or 'none' (no setting: an empty list); `sampling`: temperature and top_p of every setting."""
    if text.strip() == "none":
        return []
    settings = []
    for entry in filter(None, text.split(";")):
        parts = entry.split(",")
        try:
            if len(parts) not in (3, 6):
                raise ValueError
            knobs = dict(R=float(parts[0]), W=int(parts[1]), M=int(parts[2]))
            if len(parts) == 6:
                knobs |= dict(M_min=int(parts[3]), M_scale=float(parts[4]), M_margin=int(parts[5]))
        except ValueError:
            raise ValueError(f"--settings entry {entry!r}: expected 'R,W,M' or 'R,W,M,M_min,M_scale,M_margin'") from None
        config = APDConfig(**knobs, max_new_tokens=max_new_tokens, eos_token_ids=(), **sampling)
        config.validate()
        settings.append(config)
    if not settings:
        raise ValueError(f"--settings {text!r} names no setting: expected ';'-separated 'R,W,M' entries, e.g. "
                         "'0.7,16,100', or none")
    return settings


def _configs(shapes: str) -> tuple[ModelConfig, ModelConfig, ModelConfig, ModelConfig]:
    """(drafter, verifier, AR baseline, LLaDA baseline) configs."""
    if shapes == "tiny":
        return (tiny_config(causal=False), tiny_config(causal=True), tiny_config(causal=True, num_layers=3),
                tiny_config(causal=False, family=LLADA, num_kv_heads=4))
    bf16 = dict(param_dtype=bench.jnp.bfloat16, dtype=bench.jnp.bfloat16)
    return dream_7b_config(**bf16), qwen25_05b_config(**bf16), qwen25_7b_config(**bf16), llada_8b_config(**bf16)


def _bench_json(path: Path) -> dict | None:
    """The JSON of an `apd-jax bench` run in `path` (a dict with its rows), or None when it holds none."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("rows"), list) else None


def _check_paths(args: argparse.Namespace) -> None:
    """Fail before a long run, not after it: --json cannot be written or would replace a file that is
    not an earlier run's JSON, or --against is not one."""
    if args.json is not None:
        check_writable("--json", args.json, directory=False)
        if args.json.exists() and _bench_json(args.json) is None:
            raise FileExistsError(f"--json {args.json} exists and is not the JSON of an `apd-jax bench` run: "
                                  "choose another file or move it away")
    if args.against is not None:
        if not args.against.is_file():
            problem = "is a directory" if args.against.is_dir() else "not found"
            raise FileNotFoundError(f"--against {args.against} {problem}: give the JSON of an `apd-jax bench --json` "
                                    "run")
        if _bench_json(args.against) is None:
            raise ValueError(f"--against {args.against} is not the JSON of an `apd-jax bench --json` run (a JSON "
                             "object with its rows)")


def _write_json(args: argparse.Namespace, text: str, rows: int) -> None:
    """--json's text, written whole (a temporary file renamed onto it); `rows` kept for interrupted()."""
    with written_atomically(args.json) as tmp:
        tmp.write_text(text)
    args.rows_kept = rows


def interrupted(args: argparse.Namespace) -> str:
    if args.json is None:
        return "nothing was written; the rows printed are what was measured"
    rows = getattr(args, "rows_kept", 0)
    if rows == 0:
        before = "was left as it was" if args.json.exists() else "was not written"
        return f"--json {args.json} {before} (nothing half-written was left behind)"
    return f"--json {args.json} holds the {rows} rows measured before the interrupt, each written whole"


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    if args.group is not None and (args.workload is None or args.group > args.batch[0]):
        raise ValueError("--group is the continuous run's refill group of a --workload: give --workload, and a "
                         "group of at most the slots (the first --batch)")
    if "dream-block" in args.baselines and "dual" not in args.caches:
        raise ValueError("--baselines dream-block runs the dual cache only, as the published code: add dual to "
                         f"--caches (now {','.join(args.caches)}), or drop dream-block")
    if args.against is not None and not args.torch:
        raise ValueError("--against gives the PyTorch/apd_jax ratios of a --torch run: add --torch, or drop --against")
    if args.quality is not None and (args.workload is not None or args.torch):
        raise ValueError("--quality decodes held-out prompts instead of timing: drop --workload and --torch")
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    settings = _parse_settings(args.settings, args.max_new_tokens, **sampling)
    if not settings and (args.quality is not None or args.workload is not None):
        raise ValueError("--quality and --workload decode with APD: give an APD --settings entry, e.g. 0.7,16,100")
    if not settings and not args.baselines:
        raise ValueError("--settings none and --baselines none leave nothing to time: give either")
    if args.torch:
        if args.temperature > 0 or args.top_p < 1:
            raise ValueError("--torch times greedy decoding only: drop --temperature and --top-p")
        if args.quantize is not None:
            raise ValueError("--torch times the published code's bf16 weights: drop --quantize")
        return _torch(args, settings)
    if args.quality is not None:
        return _quality(args, settings[0])
    batches = args.batch
    d_cfg, v_cfg, ar_cfg, llada_cfg = _configs(args.shapes)
    differences: dict[str, float] = {}  # each quantized model's logits against its unquantized self's
    drafter = verifier = None
    if settings or {"leftright", "dream-block"} & set(args.baselines):  # the rows that run the Dream/Qwen pair
        drafter, verifier = _pair(args, d_cfg, v_cfg, differences)
    if args.workload is not None:
        return _workload(args, drafter, verifier, settings[0])
    ceilings = bench.device_ceilings(64 if args.shapes == "tiny" else 2048)
    print(f"device {bench.jax.devices()[0].device_kind}: copy {ceilings['bandwidth'] / 1e9:.0f} GB/s, "
          f"bf16 matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    print(bench.HEADER, flush=True)
    rows = []

    def report(row: bench.Row) -> None:
        rows.append(row)
        print(bench.format_row(row), flush=True)
        if args.json:  # after every row, so a run cut short keeps what it measured
            quantized = {} if args.quantize is None else {"quantize": args.quantize, "logits_difference": differences}
            _write_json(args, bench.to_json(rows, ceilings, quantized), len(rows))

    for cfg in settings:
        for b in batches:
            report(bench.bench_apd(drafter, verifier, cfg, b, args.prompt_len, ceilings, args.repeats,
                                   profile=args.profile))
    baselines = args.baselines
    if "leftright" in baselines:
        W, M = bench.LEFTRIGHT_WM
        cfg = APDConfig(W=W, M=M, max_new_tokens=args.max_new_tokens, eos_token_ids=(), **sampling)
        report(bench.bench_leftright(drafter, 1, cfg, 1, args.prompt_len, ceilings, args.repeats,
                                     profile=args.profile))
    n, block = args.max_new_tokens, min(bench.LLADA_BLOCK, args.max_new_tokens)
    wide = [b for b in batches if b > 1]  # the dual-cache block rows run at these batch sizes too

    def canvas(model, cfg, batch: int) -> None:
        report(bench.bench_canvas(model, cfg, batch, args.prompt_len, ceilings, args.repeats, profile=args.profile))

    if "dream-block" in baselines:  # Fast-dLLM's Dream block decoding, dual cache (run checks --caches has it)
        for threshold in (None, bench.THRESHOLD):
            cfg = DreamBlockConfig(max_new_tokens=n, block_length=block, threshold=threshold, eos_token_ids=(),
                                   **sampling)
            canvas(drafter, cfg, 1)
        for b in wide:
            canvas(drafter, cfg, b)
    if "ar" in baselines:
        del drafter, verifier  # make room for the 7B AR model
        ar = _quantized(bench.random_model(ar_cfg.replace(attention=args.attention), 3), "ar", args, differences)
        report(bench.bench_ar(ar, ARConfig(max_new_tokens=args.max_new_tokens, eos_token_ids=(), **sampling), 1,
                              args.prompt_len, ceilings, args.repeats, profile=args.profile))
        del ar
    if "llada" in baselines:
        drafter = verifier = None  # make room for the 8B model
        llada = _quantized(bench.random_model(llada_cfg.replace(attention=args.attention), 4), "llada", args,
                           differences)
        rule = {cache: LLaDAConfig(max_new_tokens=n, block_length=block, cache=cache, eos_token_ids=(), **sampling)
                for cache in args.caches}
        threshold = {cache: ThresholdConfig(threshold=bench.THRESHOLD, max_new_tokens=n, eos_token_ids=(), **sampling,
                                            **({} if cache == "none" else dict(block_length=block, cache=cache)))
                     for cache in args.caches if cache != "prefix"}  # the whole answer at once without a cache
        for cfg in [*rule.values(), *threshold.values()]:
            canvas(llada, cfg, 1)
        for b in wide if "dual" in rule else ():
            canvas(llada, rule["dual"], b)  # the dual cache, LLaDA's rule
    return 0


def _pair(args: argparse.Namespace, d_cfg: ModelConfig, v_cfg: ModelConfig,
          differences: dict[str, float]) -> tuple[Transformer, Transformer]:
    """The drafter and verifier: --drafter and --verifier, else random weights of the shapes; with
    --attention's implementation (each one's logits compared with xla attention's first) and
    --quantize's weights."""
    drafter = load_model(args.drafter) if args.drafter else bench.random_model(d_cfg, 1)
    verifier = load_model(args.verifier) if args.verifier else bench.random_model(v_cfg, 2)
    if args.attention != "xla":
        switched = [with_config(m, m.cfg.replace(attention=args.attention)) for m in (drafter, verifier)]
        for model, other in zip((drafter, verifier), switched):
            print(f"{model.cfg.model_type} logits, {args.attention} vs xla attention: relative difference "
                  f"{bench.logits_difference(model, other, args.prompt_len):.2e}", flush=True)
        drafter, verifier = switched
    return _quantized(drafter, "drafter", args, differences), _quantized(verifier, "verifier", args, differences)


def _quantized(model: Transformer, name: str, args: argparse.Namespace, differences: dict[str, float]) -> Transformer:
    """With --quantize, `model` with 8-bit weights, the relative difference of its logits from the
    unquantized model's (bench.logits_difference, --prompt-len tokens) printed and kept in `differences`."""
    if args.quantize is None:
        return model
    quantized = quantize(model, args.quantize)
    differences[name] = bench.logits_difference(model, quantized, args.prompt_len)
    print(f"{name} ({model.cfg.model_type}) logits, {args.quantize} vs unquantized weights: relative difference "
          f"{differences[name]:.2e}", flush=True)
    return quantized


def _quality(args: argparse.Namespace, config: APDConfig) -> int:
    """--quality: APD's greedy output on held-out prompts with the pair's weights as stored, in the other
    float dtype (how far any change of numerics moves a greedy output) and with 8-bit weights."""
    from apd_jax.cli.options import pair_paths  # with the decoder registry: not for --help
    from apd_jax.decoding.apd import apd_generate
    from apd_jax.evaluation.compare import agreement, verifier_logprob

    if args.temperature > 0 or args.top_p < 1:
        raise ValueError("--quality compares greedy outputs: drop --temperature and --top-p")
    drafter_dir, verifier_dir = pair_paths(args.drafter, args.verifier)
    drafter, verifier = load_model(drafter_dir), load_model(verifier_dir)
    texts = corpus_prompts("--quality", args.quality, drafter_dir, heldout=True,
                           seq_len=drafter.cfg.max_position_embeddings, root=None)
    tokenizer = load_tokenizer_file(drafter_dir)
    prompts = [tokenizer.encode(text).ids for text in texts]
    stored = drafter.cfg.param_dtype.__name__
    other = "bfloat16" if stored == "float32" else "float32"

    def pairs():  # (label, drafter, verifier), the stored weights first: the reference
        yield f"{stored} (as stored)", drafter, verifier
        yield other, load_model(drafter_dir, param_dtype=other), load_model(verifier_dir, param_dtype=other)
        for mode in [args.quantize] if args.quantize else MODES:
            yield mode, quantize(drafter, mode), quantize(verifier, mode)

    print(f"APD {config.R}, {config.W}, {config.M}, greedy, on {len(prompts)} held-out prompts, "
          f"{config.max_new_tokens} tokens each; log-likelihood under the verifier as stored", flush=True)
    print("| weights | tokens per pass | verifier log-likelihood per token | agreement with the stored weights' "
          "output |\n| --- | --- | --- | --- |", flush=True)
    reference = None
    for label, d, v in pairs():
        result = apd_generate(d, v, prompts, config)
        reference = result if reference is None else reference
        tokens_per_pass = float(result.lengths.sum()) / float(result.row_passes().sum())
        print(f"| {label} | {tokens_per_pass:.3f} | {verifier_logprob(verifier, prompts, result):.4f} "
              f"| {agreement(result, reference):.4f} |", flush=True)
    return 0


def _workload(args: argparse.Namespace, drafter, verifier, config: APDConfig) -> int:
    """--workload: fixed batches against continuous batching of the same prompts and budgets."""
    low, high = args.budgets
    budgets = workload.draw_budgets(args.workload, low, high)
    prompts = bench.random_prompts([drafter.cfg, verifier.cfg], args.workload, args.prompt_len)
    config = dataclasses.replace(config, max_new_tokens=max(budgets))
    print(f"device {bench.jax.devices()[0].device_kind}: {args.workload} prompts of {args.prompt_len} tokens, "
          f"budgets uniform in {low}-{high}", flush=True)
    print(workload.HEADER, flush=True)
    rows, first = [], None
    for run in args.runs:
        row, outputs = workload.bench_workload(drafter, verifier, prompts, budgets, config, args.batch[0], run,
                                               args.group)
        first = first or outputs
        rows.append(row if outputs is first else workload.agreement(row, outputs, first))
        print(workload.format_row(rows[-1]), flush=True)
        if args.json:  # after every row, so a run cut short keeps what it measured
            _write_json(args, workload.to_json(rows, {"distribution": "uniform", "low": low, "high": high}), len(rows))
    for row, run in zip(rows[1:], args.runs[1:]):
        print(f"{run} / {args.runs[0]} tokens/s: {row.tokens_per_s / rows[0].tokens_per_s:.2f}x", flush=True)
    return 0


def _torch(args: argparse.Namespace, settings: list[APDConfig]) -> int:
    from apd_jax.bench import pytorch as bench_torch

    def report(rows: list[bench_torch.TorchRow]) -> None:
        if args.json:  # after every row, so a run cut short keeps what it measured
            _write_json(args, bench_torch.to_json(rows), len(rows))

    fixed = [(c.R, c.W, c.M) for c in settings if c.M_min is None]
    if not fixed and not args.baselines:
        raise ValueError("--torch times the published loop at a fixed M, and --settings gives only adaptive-lookahead "
                         "entries: add an 'R,W,M' entry or a --baselines entry")
    if len(fixed) < len(settings):
        print("(adaptive-lookahead settings skipped: the published loop has a fixed M)", flush=True)
    rows = bench_torch.run(_configs(args.shapes), fixed, args.prompt_len, args.max_new_tokens, args.repeats,
                           args.baselines, log=lambda line: print(line, flush=True), on_row=report,
                           caches=args.caches)
    if args.against is not None:
        for line in bench_torch.ratios(rows, args.against):
            print(line, flush=True)
    return 0
