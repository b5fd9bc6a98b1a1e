"""`apd-jax train-filter`: train a Learn2PD filter on oracle traces of a diffusion model (Dream or LLaDA).

For each prompt: the drafter's own greedy answer (one token per pass), then the
Extremely Greedy Parallel oracle towards it, recording per-position features and
keep labels; a 2-layer MLP is fitted to them and saved with orbax. A held-out
share of the prompts reports the filter against a fixed confidence threshold:
at each keep threshold, the filter's precision (kept predictions that are the final
answer) and recall, and the recall of the confidence threshold of equal precision.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from apd_jax.checkpoints import check_output, load_model, load_tokenizer
from apd_jax.cli.common import (
    DefaultsHelpFormatter, corpus_prompts, finite_float, positive_int, seed, user_path,
)
from apd_jax.decoding.blocks.loop import block_problems
from apd_jax.decoding.learn2pd import save_filter
from apd_jax.training.learn2pd_oracle import collect_traces
from apd_jax.training.learn2pd_train import FilterTrainConfig, compare_with_confidence_rule, filter_loss, train_filter
from apd_jax.decoding.generation import capacity, check_prompts
from apd_jax.text.prompts import parse_ids, read_prompt_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-filter", help="train a Learn2PD filter for a Dream or LLaDA model", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--drafter", type=user_path, required=True,
                   help="Dream or LLaDA checkpoint: HF or apd_jax (orbax) directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts-file", type=user_path, help="one prompt per line, `\\n` for a newline")
    source.add_argument("--train-prompts", type=positive_int, metavar="N",
                        help="N prompts from the training files of the stdlib corpus (apd_jax.text.corpus.stdlib_prompts; "
                             "never the held-out files that `apd-jax compare --heldout-prompts` decodes)")
    p.add_argument("--stdlib", type=user_path, default=None,
                   help="--train-prompts: corpus root (default: this Python's stdlib, as `apd-jax train`)")
    p.add_argument("--ids", action="store_true", help="--prompts-file holds space-separated token ids, not text")
    p.add_argument("--out", type=user_path, required=True, help="output directory for the filter")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: as stored)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="canvas length: tokens decoded per prompt")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together")
    p.add_argument("--block-length", type=positive_int, default=None,
                   help="decode the canvas in blocks of this many tokens, left to right, as LLaDA's block decoder "
                        "does (the Learn2PD paper's LLaDA setting: 32); it must divide --max-new-tokens "
                        "(default: one block, the whole canvas)")
    p.add_argument("--holdout", type=finite_float, default=0.2, help="share of prompts held out for the report")
    p.add_argument("--width", type=positive_int, default=FilterTrainConfig.width,
                   help="hidden width of the MLP (256: 1793 parameters)")
    p.add_argument("--steps", type=positive_int, default=FilterTrainConfig.steps, help="optimiser steps")
    p.add_argument("--learning-rate", type=finite_float, default=FilterTrainConfig.learning_rate,
                   help="Adam's learning rate")
    p.add_argument("--train-batch", type=positive_int, default=FilterTrainConfig.batch_size,
                   help="trace samples per optimiser step")
    p.add_argument("--seed", type=seed, default=FilterTrainConfig.seed,
                   help="seed of the initialisation, minibatches and held-out split")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace, seq_len: int) -> tuple[list[list[int]], list[str]]:
    """The prompts' token ids, and where each came from (for error messages)."""
    if args.train_prompts is not None:
        lines = corpus_prompts("--train-prompts", args.train_prompts, args.drafter, heldout=False, seq_len=seq_len,
                               root=args.stdlib)
        where = [f"--train-prompts prompt {n}" for n in range(1, len(lines) + 1)]
    else:
        numbered = read_prompt_lines(args.prompts_file)
        lines = [line for _, line in numbered]
        where = [f"prompts file {args.prompts_file} line {n}" for n, _ in numbered]
    if args.ids:
        return [parse_ids(line, source) for line, source in zip(lines, where)], where
    tokenizer = load_tokenizer(args.drafter)
    return [tokenizer.encode(line) for line in lines], where


# Keep thresholds of the held-out report (the decoder's default is 0.9).
REPORT_THRESHOLDS = (0.5, 0.7, 0.9)


def _entropy(labels: np.ndarray) -> float:
    """The BCE of the best constant guess: the keep rate's binary entropy."""
    p = float(np.mean(labels))
    return float(-(p * np.log(p) + (1 - p) * np.log1p(-p))) if 0 < p < 1 else 0.0


def run(args: argparse.Namespace) -> int:
    config = FilterTrainConfig(
        width=args.width, steps=args.steps, learning_rate=args.learning_rate, batch_size=args.train_batch,
        seed=args.seed,
    )
    config.validate()
    blocks = block_problems(args.block_length, args.max_new_tokens)
    if blocks:
        raise ValueError("--block-length and --max-new-tokens: " + "; ".join(blocks))
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout {args.holdout} must lie in [0, 1)")
    if args.train_prompts is not None and args.ids:
        raise ValueError("--train-prompts makes text prompts: no --ids")
    if args.stdlib is not None and args.train_prompts is None:
        raise ValueError("--stdlib is the corpus of --train-prompts: give --train-prompts N too, or drop --stdlib")
    check_output(args.out, args.overwrite)
    model = load_model(args.drafter, param_dtype=args.dtype)
    if not model.cfg.is_diffusion:
        raise ValueError(f"--drafter {args.drafter} is a causal {model.cfg.model_type} model: the filter is trained "
                         "for a diffusion model (Dream or LLaDA); give its checkpoint")
    prompts, where = _read_prompts(args, model.cfg.max_position_embeddings)
    # Every prompt checked before the first is decoded, named by its file and line.
    check_prompts(prompts, model.cfg.vocab_size, mask_id=model.cfg.mask_token_id,
                  fits=(args.max_new_tokens, capacity(None, model.cfg)), sources=where)

    start = time.perf_counter()
    traces = collect_traces(model, prompts, args.max_new_tokens, args.batch_size, block_length=args.block_length)
    n_held = min(int(round(args.holdout * len(prompts))), len(prompts) - 1)  # keep one prompt to train on
    held = np.random.default_rng(args.seed).permutation(len(prompts))[:n_held]
    train_rows = np.setdiff1d(np.arange(len(prompts)), held)
    train = traces.select(train_rows)
    print(
        f"oracle traces: {len(traces)} samples from {len(prompts)} prompts, "
        f"{traces.labels.mean():.1%} kept, {time.perf_counter() - start:.1f} s"
    )
    filt, losses = train_filter(train, config)
    print(f"trained on {len(train)} samples: BCE {filter_loss(filt, train):.4f} (last minibatch {losses[-1]:.4f}, "
          f"a constant guess {_entropy(train.labels):.4f})")
    if len(held):
        test = traces.select(held)
        print(f"held out ({len(held)} prompts, {len(test)} samples): BCE {filter_loss(filt, test):.4f} "
              f"(a constant guess {_entropy(test.labels):.4f})")
        for keep_threshold in REPORT_THRESHOLDS:
            report = compare_with_confidence_rule(filt, test, keep_threshold)
            ours, rule = report["filter"], report["confidence_equal_precision"]
            line = f"  filter > {keep_threshold}: precision {ours['precision']:.3f}, recall {ours['recall']:.3f}; "
            print(line + ("no confidence threshold is as precise" if rule is None else
                          f"confidence > {rule['tau']:.3f}: precision {rule['precision']:.3f}, "
                          f"recall {rule['recall']:.3f}"))
    save_filter(filt, args.out, overwrite=args.overwrite)
    print(f"filter saved to {args.out}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """The filter is saved whole at the end (checkpoint.atomic_dir), so an interrupted run wrote nothing."""
    before = "was left as it was" if args.out.exists() else "was not written"
    return f"--out {args.out} {before}, with nothing half-written behind; run the same command again to train it"
