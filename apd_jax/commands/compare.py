"""`apd-jax compare`: every decoder on one model pair and one set of prompts, as a markdown table.

Passes per generated token, agreement with the drafter's full-step (one token per
pass) greedy output, and tokens/s after compilation, for: Dream left-to-right K=1/2/4,
Dream's entropy sampler at half the steps, confidence-threshold decoding, APD, the
verifier alone, and Learn2PD with and without End-of-Text when a filter is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from apd_jax.apd import APDConfig
from apd_jax.commands import read_prompts_file
from apd_jax.checkpoint import load_model, load_tokenizer
from apd_jax.compare import compare_decoders, format_table
from apd_jax.config import tiny_config
from apd_jax.learn2pd import load_filter
from apd_jax.model import init_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare all decoders on one pair", description=__doc__)
    p.add_argument("--drafter", type=Path)
    p.add_argument("--verifier", type=Path)
    p.add_argument("--random-tiny", action="store_true", help="tiny random pair; prompts are token ids")
    p.add_argument("--prompts-file", type=Path, required=True, help="one prompt per line (ids with --random-tiny)")
    p.add_argument("--filter", type=Path, help="a Learn2PD filter saved by `apd-jax train-filter`")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--R", type=float, default=0.7)
    p.add_argument("--W", type=int, default=16)
    p.add_argument("--M", type=int, default=100)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lines = read_prompts_file(args.prompts_file)
    if args.random_tiny:
        drafter, verifier = init_model(tiny_config(causal=False), 1), init_model(tiny_config(causal=True), 2)
        prompts = [list(map(int, line.split())) for line in lines]
    else:
        if args.drafter is None or args.verifier is None:
            raise ValueError("give --drafter DIR and --verifier DIR (or --random-tiny)")
        drafter, verifier = load_model(args.drafter), load_model(args.verifier)
        tokenizer = load_tokenizer(args.drafter)
        prompts = [tokenizer.encode(line.replace("\\n", "\n")) for line in lines]
    filt = load_filter(args.filter) if args.filter else None
    apd = APDConfig(R=args.R, W=args.W, M=args.M, max_new_tokens=args.max_new_tokens)
    print(format_table(compare_decoders(drafter, verifier, prompts, args.max_new_tokens, apd, filt)))
    return 0
