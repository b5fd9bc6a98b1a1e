"""`apd-jax generate`: APD (or another decoder) on a drafter/verifier pair, from a prompt, stdin or a file.

--decoder picks the decoding strategy: apd (default), leftright (Dream K tokens per
pass), ar (the verifier alone), dream (Dream's own sampler over --steps), threshold
(confidence-threshold parallel decoding), learn2pd (a filter from `apd-jax train-filter`;
the embedded drafter ships with one).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

from apd_jax.apd import APDConfig, apd_generate, apd_generate_eager, leftright_generate, shared_vocab_size
from apd_jax.autoregressive import ARConfig, ar_generate
from apd_jax.commands import embedded_filter, read_prompts_file
from apd_jax.checkpoint import load_model, load_orbax, load_tokenizer
from apd_jax.config import tiny_config
from apd_jax.diffusion import ALGORITHMS, DiffusionConfig, ThresholdConfig, diffusion_generate, threshold_generate
from apd_jax.generation import GenerationResult
from apd_jax.learn2pd import Learn2PDConfig, learn2pd_generate, load_filter
from apd_jax.model import Qwen2, init_model
from apd_jax.sharding import make_mesh, parse_mesh, shard_model
from apd_jax import ASSETS_DIR


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with APD", description=__doc__)
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin); with --ids, space-separated ids")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line; generated as one batch")
    p.add_argument("--ids", action="store_true", help="prompts are token ids, not text")
    p.add_argument("--drafter", type=Path,
                   help="Dream checkpoint: HF or apd_jax (orbax) directory (default: the embedded trained pair)")
    p.add_argument("--verifier", type=Path, help="Qwen2 checkpoint: HF directory or apd_jax (orbax) directory")
    p.add_argument("--random-tiny", action="store_true",
                   help="use a tiny randomly initialised pair (no checkpoint; output is noise)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: as stored)")
    p.add_argument("--R", type=float, default=0.7, help="mixture weight in [0, 1] (default 0.7)")
    p.add_argument("--W", type=int, default=16, help="drafter KV window (default 16)")
    p.add_argument("--M", type=int, default=100, help="max lookahead (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--rule", choices=("paper", "reference"), default="paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--live", action="store_true",
                   help="show APD's passes as they happen, each pass's accepted tokens in their own colour")
    p.add_argument("--decoder", choices=DECODERS, default="apd", help="decoding strategy (default apd)")
    p.add_argument("--K", type=int, default=1, help="leftright: tokens committed per pass")
    p.add_argument("--alg", choices=ALGORITHMS, default="entropy", help="dream: unmasking order")
    p.add_argument("--steps", type=int, default=None, help="dream: diffusion steps (default max-new-tokens)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="threshold: confidence to commit a token; learn2pd: the filter's keep probability")
    p.add_argument("--filter", type=Path,
                   help="learn2pd: the trained filter directory (default with the embedded drafter: its own filter)")
    p.add_argument("--eot-threshold", type=float, default=None,
                   help="threshold/learn2pd: drop positions after an eos predicted with this confidence")
    p.add_argument("--mesh", default=None,
                   help="shard over devices, e.g. 'data=2,model=4' (rows over data, tensor parallel over model)")
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    return [args.prompt if args.prompt is not None else sys.stdin.read()]


def _load(path: Path, dtype: str | None, mesh: jax.sharding.Mesh | None) -> Qwen2:
    if mesh is not None and (path / "params").is_dir():
        return load_orbax(path, param_dtype=dtype, mesh=mesh)  # each device reads only its shards
    model = load_model(path, param_dtype=dtype)
    return model if mesh is None else shard_model(model, mesh)


def run(args: argparse.Namespace) -> int:
    config = APDConfig(
        R=args.R, W=args.W, M=args.M, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, rule=args.rule,
    )
    config.validate()
    tok_d = tok_v = None
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    if args.random_tiny:
        if not args.ids:
            raise ValueError("--random-tiny has no tokenizer: give the prompt as token ids with --ids")
        drafter, verifier = init_model(tiny_config(causal=False), 1), init_model(tiny_config(causal=True), 2)
        if mesh is not None:
            drafter, verifier = shard_model(drafter, mesh), shard_model(verifier, mesh)
    else:
        if (args.drafter is None) != (args.verifier is None):
            raise ValueError("give both --drafter DIR and --verifier DIR (or neither, for the embedded pair)")
        if args.drafter is None:  # the small trained pair shipped with apd_jax
            args.drafter, args.verifier = ASSETS_DIR / "drafter", ASSETS_DIR / "verifier"
        drafter = _load(args.drafter, args.dtype, mesh)
        verifier = _load(args.verifier, args.dtype, mesh)
        if not args.ids:
            tok_d, tok_v = load_tokenizer(args.drafter), load_tokenizer(args.verifier)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg, tok_d, tok_v)
    texts = _prompts(args)
    prompts = [list(map(int, t.split())) if args.ids else tok_d.encode(t) for t in texts]
    if args.live:
        return _live(args, drafter, verifier, prompts, texts, config, tok_d)
    if mesh is not None and args.decoder != "apd":
        raise ValueError("--mesh is supported with --decoder apd only")
    start = time.perf_counter()
    result = _decode(args, drafter, verifier, prompts, config, vocab, mesh)
    elapsed = time.perf_counter() - start
    for row, text in enumerate(texts):
        ids = result.sequences()[row]
        print(text + (" " + " ".join(map(str, ids)) if tok_d is None else tok_d.decode(ids)))
        print(f"  [{len(ids)} tokens in {result.row_passes()[row]} passes: accepted {result.accepted_per_pass(row)}]")
    generated = int(result.lengths.sum())
    print(
        f"{generated} tokens, {result.passes} passes, {result.tokens_per_pass():.2f} tokens/pass, "
        f"{generated / elapsed:.1f} tokens/s ({elapsed:.2f} s including compilation)"
    )
    return 0


DECODERS = ("apd", "leftright", "ar", "dream", "threshold", "learn2pd")


def _decode(args, drafter, verifier, prompts, config: APDConfig, vocab: int, mesh) -> GenerationResult:
    key = jax.random.key(args.seed)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k)
    match args.decoder:
        case "apd":
            return apd_generate(drafter, verifier, prompts, config, key, shared_vocab=vocab, mesh=mesh)
        case "leftright":
            return leftright_generate(drafter, prompts, args.K, config, key)
        case "ar":
            return ar_generate(verifier, prompts, ARConfig(**sampling), key)
        case "dream":
            steps = args.steps or args.max_new_tokens
            return diffusion_generate(drafter, prompts, DiffusionConfig(steps=steps, alg=args.alg, **sampling), key)
        case "threshold":
            cfg = ThresholdConfig(threshold=args.threshold, eot_threshold=args.eot_threshold, **sampling)
            return threshold_generate(drafter, prompts, cfg, key)
        case "learn2pd":
            path = args.filter or embedded_filter(args.drafter)
            if path is None:
                raise ValueError("--decoder learn2pd needs --filter DIR for this drafter (only the embedded drafter "
                                 "has one built in; train one with `apd-jax train-filter`)")
            cfg = Learn2PDConfig(keep_threshold=args.threshold, eot_threshold=args.eot_threshold, **sampling)
            return learn2pd_generate(drafter, load_filter(path), prompts, cfg, key)
    raise ValueError(f"unknown decoder {args.decoder!r}")


PASS_COLOURS = ("bold cyan", "bold magenta", "bold green", "bold yellow", "bold blue", "bold red")


def _live(args, drafter, verifier, prompts, texts, config: APDConfig, tokenizer) -> int:
    """APD pass by pass (the readable Python loop), printing each pass's tokens in turn."""
    from rich.console import Console

    if args.decoder != "apd" or len(prompts) != 1:
        raise ValueError("--live shows one prompt decoded with APD (--decoder apd)")
    console = Console(highlight=False, soft_wrap=True)  # generated text keeps its own line breaks
    console.print(texts[0], end="", style="dim")
    passes = []

    def show(tokens: list[int]) -> None:
        text = tokenizer.decode(tokens) if tokenizer else " " + " ".join(map(str, tokens))
        console.print(text, end="", style=PASS_COLOURS[len(passes) % len(PASS_COLOURS)])
        passes.append(len(tokens))

    start = time.perf_counter()
    tokens, counts = apd_generate_eager(drafter, verifier, prompts[0], config, jax.random.key(args.seed), show)
    elapsed = time.perf_counter() - start
    console.print()
    console.print(f"[{len(tokens)} tokens in {len(counts)} passes, {len(tokens) / len(counts):.2f} tokens/pass, "
                  f"{elapsed:.1f} s with per-window compilation; one colour per pass]")
    return 0
