"""`apd-jax eval`: GSM8K-style exact-match accuracy from a local JSONL file, with speed figures."""

from __future__ import annotations

import argparse

from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.cli.common import DefaultsHelpFormatter, positive_int, user_path
from apd_jax.cli.options import (
    add_pair_options,
    pair_paths,
    settings_option,
    settings_values,
)
from apd_jax.decoding.registry import decoder
from apd_jax.evaluation.evaluate import evaluate, load_jsonl

APD = ["apd"]  # eval decodes with APD


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact-match evaluation on a local JSONL file", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("data", type=user_path, help="JSONL with 'question' and 'answer' per line")
    add_pair_options(p)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="items decoded together, in one shape (the last batch filled up)")
    settings_option(p, "--R", "mixture weight in [0, 1]", APD, type=float)
    settings_option(p, "--W", "drafter KV window", APD, type=int)
    settings_option(p, "--M", "max lookahead", APD, type=int)
    settings_option(p, "--max-new-tokens", "tokens to generate per item", APD, type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    items = load_jsonl(args.data)[: args.limit]
    config = decoder("apd").settings_from(settings_values(args))
    config.validate()
    drafter_dir, verifier_dir = pair_paths(args.drafter, args.verifier)
    drafter, verifier = load_model(drafter_dir), load_model(verifier_dir)
    report = evaluate(drafter, verifier, load_tokenizer(drafter_dir), items, config, args.batch_size)
    print(f"accuracy {report.accuracy:.3f} ({report.correct}/{report.total}), "
          f"{report.tokens_per_s:.1f} tokens/s, {report.tokens_per_pass:.2f} tokens/pass")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """eval writes no file: its result is printed at the end, so an interrupted run keeps none."""
    return ("nothing was written and no result is kept (eval prints it at the end); run it again, with --limit N "
            "for the first N items only")
