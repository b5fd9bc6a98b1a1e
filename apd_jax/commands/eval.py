"""`apd-jax eval`: GSM8K-style exact-match accuracy from a local JSONL file, with speed figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from apd_jax import ASSETS_DIR
from apd_jax.apd import APDConfig
from apd_jax.checkpoint import load_model, load_tokenizer
from apd_jax.evaluate import evaluate, load_jsonl


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact-match evaluation on a local JSONL file", description=__doc__)
    p.add_argument("data", type=Path, help="JSONL with 'question' and 'answer' per line")
    p.add_argument("--drafter", type=Path, default=ASSETS_DIR / "drafter")
    p.add_argument("--verifier", type=Path, default=ASSETS_DIR / "verifier")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--R", type=float, default=0.7)
    p.add_argument("--W", type=int, default=16)
    p.add_argument("--M", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    items = load_jsonl(args.data)[: args.limit]
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    config = APDConfig(R=args.R, W=args.W, M=args.M, max_new_tokens=args.max_new_tokens)
    config.validate()
    drafter, verifier = load_model(args.drafter), load_model(args.verifier)
    report = evaluate(drafter, verifier, load_tokenizer(args.drafter), items, config, args.batch_size)
    print(f"accuracy {report.accuracy:.3f} ({report.correct}/{report.total}), "
          f"{report.tokens_per_s:.1f} tokens/s, {report.tokens_per_pass:.2f} tokens/pass")
    return 0
