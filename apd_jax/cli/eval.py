"""`apd-jax eval`: GSM8K-style exact-match accuracy from a local JSONL file, with speed figures.

--decoder picks the decoder: apd (default) and ar on the drafter/verifier pair; leftright and the
block decoders (threshold, dream-block, llada: with --block-length and Fast-dLLM's --cache) on the
diffusion model alone (--drafter: a Dream or LLaDA checkpoint). apd, leftright and ar decode the
items through --batch-size slots (continuous batching), the block decoders --batch-size at a time.
"""

from __future__ import annotations

import argparse

from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.cli.common import DefaultsHelpFormatter, positive_int, user_path
from apd_jax.cli.options import (
    add_pair_options,
    optional_float,
    model_paths,
    optional_int,
    settings_option,
    settings_values,
)
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE
from apd_jax.decoding.blocks.cached import CACHE_MODES
from apd_jax.decoding.blocks.llada import REMASKING
from apd_jax.decoding.registry import DECODERS, decoder
from apd_jax.evaluation.evaluate import EVAL_DECODERS, evaluate, load_jsonl

BLOCKS = ["threshold", "dream-block", "llada"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="exact-match evaluation on a local JSONL file", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("data", type=user_path, help="JSONL with 'question' and 'answer' per line")
    add_pair_options(p)
    p.add_argument("--decoder", choices=EVAL_DECODERS, default="apd", help="decoding strategy")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N items (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"items decoded at once: with {', '.join(d for d in EVAL_DECODERS if DECODERS[d].slots)} the slots of continuous batching (a "
                        "finished item's slot takes the next), with the other decoders the batch size (the last "
                        "batch filled up)")
    settings_option(p, "--max-new-tokens", "tokens to generate per item", EVAL_DECODERS, type=int)
    settings_option(p, "--R", "apd: mixture weight in [0, 1]", ["apd"], type=float)
    settings_option(p, "--W", "apd/leftright: drafter KV window", ["apd", "leftright"], type=int)
    settings_option(p, "--M", "apd/leftright: max lookahead", ["apd", "leftright"], type=int)
    settings_option(p, "--K", "leftright: tokens committed per pass", ["leftright"], type=int)
    settings_option(p, "--block-length", "threshold, dream-block, llada: answer positions per block, decoded left "
                    "to right; 'none': one block", BLOCKS, type=optional_int)
    settings_option(p, "--cache", "threshold, dream-block, llada: Fast-dLLM's KV cache over blocks", BLOCKS,
                    choices=CACHE_MODES)
    settings_option(p, "--threshold", "threshold, dream-block: confidence to commit a token ('none' with "
                    "dream-block: its step schedule)", ["threshold", "dream-block"], type=optional_float)
    settings_option(p, "--steps", "dream-block, llada: passes in all ('none': --max-new-tokens, one token per "
                    "step)", ["dream-block", "llada"], type=optional_int)
    settings_option(p, "--remasking", "llada: which masked positions a step commits", ["llada"], choices=REMASKING)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    items = load_jsonl(args.data)[: args.limit]
    chosen = decoder(args.decoder)
    config = chosen.settings_from(settings_values(args))
    config.validate()
    drafter_dir, verifier_dir = model_paths(chosen, args.drafter, args.verifier)
    drafter = load_model(drafter_dir)
    verifier = None if verifier_dir is None else load_model(verifier_dir)
    report = evaluate(drafter, verifier, load_tokenizer(drafter_dir), items, config, args.batch_size,
                      decoder=args.decoder)
    print(f"accuracy {report.accuracy:.3f} ({report.correct}/{report.total}), "
          f"{report.tokens_per_s:.1f} tokens/s, {report.tokens_per_pass:.2f} tokens/pass")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """eval writes no file: its result is printed at the end, so an interrupted run keeps none."""
    return ("nothing was written and no result is kept (eval prints it at the end); run it again, with --limit N "
            "for the first N items only")
