"""`apd-jax generate`: APD (or another decoder) on a drafter/verifier pair, from a prompt, stdin or a file.

--decoder picks the decoding strategy: apd (default), leftright (Dream K tokens per
pass), ar (the verifier alone), dream (Dream's own sampler over --steps), threshold
(confidence-threshold parallel decoding), learn2pd (a filter from `apd-jax train-filter`;
the embedded drafter ships with one).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax

from apd_jax.apd import APDConfig, apd_generate_eager, shared_vocab_size
from apd_jax.checkpoint import load_model, load_orbax, load_tokenizer
from apd_jax.commands import embedded_filter
from apd_jax.commands.options import (
    DefaultsHelpFormatter,
    add_pair_options,
    optional_float,
    pair_paths,
    settings_option,
    settings_values,
)
from apd_jax.config import tiny_config
from apd_jax.decoders import DECODERS, Models, decoder
from apd_jax.diffusion import ALGORITHMS
from apd_jax.generation import DecoderConfig
from apd_jax.learn2pd import load_filter
from apd_jax.model import Qwen2, init_model
from apd_jax.prompts import parse_ids, read_prompts_file
from apd_jax.sharding import make_mesh, parse_mesh, shard_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with APD", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?",
                   help="prompt text; with --ids, space-separated ids (default: read stdin)")
    p.add_argument("--prompts-file", type=Path,
                   help="one prompt per line, `\\n` for a newline; generated as one batch (default: none)")
    p.add_argument("--ids", action="store_true", help="prompts are token ids, not text")
    add_pair_options(p)
    p.add_argument("--random-tiny", action="store_true",
                   help="use a tiny randomly initialised pair (no checkpoint; output is noise)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: as stored)")
    p.add_argument("--decoder", choices=tuple(DECODERS), default="apd", help="decoding strategy")
    settings_option(p, "--max-new-tokens", "tokens to generate per prompt", type=int)
    settings_option(p, "--temperature", "sampling temperature, 0 is greedy", type=float)
    settings_option(p, "--top-p", "nucleus filter, 1 disables it", type=float)
    settings_option(p, "--top-k", "top-k filter, 0 disables it", type=int)
    settings_option(p, "--R", "apd: mixture weight in [0, 1]", ["apd"], type=float)
    settings_option(p, "--W", "apd/leftright: drafter KV window", type=int)
    settings_option(p, "--M", "apd/leftright: max lookahead", type=int)
    settings_option(p, "--rule", "apd: acceptance rule", ["apd"], choices=("paper", "reference"))
    settings_option(p, "--K", "leftright: tokens committed per pass", type=int)
    settings_option(p, "--alg", "dream: unmasking order", choices=ALGORITHMS)
    p.add_argument("--steps", type=int, default=argparse.SUPPRESS,
                   help="dream: diffusion steps, >= 1 (default: --max-new-tokens, one token per step)")
    settings_option(p, "--threshold", "threshold: confidence to commit a token; learn2pd: the filter's keep "
                    "probability", type=float)
    settings_option(p, "--eot-threshold", "threshold/learn2pd: drop positions after an eos predicted with this "
                    "confidence, 'none' disables it", type=optional_float)
    p.add_argument("--filter", type=Path,
                   help="learn2pd: the trained filter directory (default with the embedded drafter: its own filter)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of sampling")
    p.add_argument("--live", action="store_true",
                   help="show APD's passes as they happen, each pass's accepted tokens in their own colour")
    p.add_argument("--mesh", default=None,
                   help="shard over devices, e.g. 'data=2,model=4' (rows over data, tensor parallel over model; "
                        "default: one device)")
    p.set_defaults(func=run)


def settings(args: argparse.Namespace) -> DecoderConfig:
    """The chosen decoder's settings: the options given, the settings class's defaults for the rest."""
    values = settings_values(args)
    config = decoder(args.decoder).settings_from(values)
    if args.decoder == "dream" and "steps" not in values:
        config = dataclasses.replace(config, steps=config.max_new_tokens)  # one token per step
    config.validate()
    return config


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is not None:
        return read_prompts_file(args.prompts_file)
    if args.prompt is not None:
        return [args.prompt]
    if sys.stdin.isatty():
        print("apd-jax generate: reading the prompt from stdin (end it with Ctrl-D; or give it as an argument)",
              file=sys.stderr)
    return [sys.stdin.read()]


def _load(path: Path, dtype: str | None, mesh: jax.sharding.Mesh | None) -> Qwen2:
    if mesh is not None and (path / "params").is_dir():
        return load_orbax(path, param_dtype=dtype, mesh=mesh)  # each device reads only its shards
    model = load_model(path, param_dtype=dtype)
    return model if mesh is None else shard_model(model, mesh)


def _filter(args: argparse.Namespace):
    path = args.filter or (None if args.random_tiny else embedded_filter(args.drafter))
    if path is None:
        raise ValueError("--decoder learn2pd needs --filter DIR for this drafter (only the embedded drafter "
                         "has one built in; train one with `apd-jax train-filter`)")
    return load_filter(path)


def run(args: argparse.Namespace) -> int:
    chosen = decoder(args.decoder)
    config = settings(args)
    tok_d = tok_v = None
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    if mesh is not None and not chosen.sharded:
        raise ValueError(f"--mesh is supported with --decoder apd only, not {args.decoder}")
    if args.random_tiny:
        if not args.ids:
            raise ValueError("--random-tiny has no tokenizer: give the prompt as token ids with --ids")
        drafter, verifier = init_model(tiny_config(causal=False), 1), init_model(tiny_config(causal=True), 2)
        if mesh is not None:
            drafter, verifier = shard_model(drafter, mesh), shard_model(verifier, mesh)
    else:
        args.drafter, args.verifier = pair_paths(args.drafter, args.verifier)
        drafter = _load(args.drafter, args.dtype, mesh)
        verifier = _load(args.verifier, args.dtype, mesh)
        if not args.ids:
            tok_d, tok_v = load_tokenizer(args.drafter), load_tokenizer(args.verifier)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg, tok_d, tok_v)
    texts = _prompts(args)
    prompts = [parse_ids(t, "the prompt") if args.ids else tok_d.encode(t) for t in texts]
    if args.live:
        return _live(args, drafter, verifier, prompts, texts, config, tok_d)
    models = Models(drafter, verifier, _filter(args) if "filter" in chosen.uses else None, vocab, mesh)
    start = time.perf_counter()
    result = chosen.generate(models, prompts, config, jax.random.key(args.seed))
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
