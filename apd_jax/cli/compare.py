"""`apd-jax compare`: every decoder on one model pair and one set of prompts, as a markdown table.

Passes per generated token, agreement with the drafter's two full-step (one token per
pass) greedy outputs, left to right and most confident first, and tokens/s after
compilation, for: Dream left-to-right K=1/2/4, the most-confident-first decoder,
Dream's entropy sampler at half the steps, confidence-threshold decoding, APD, the
verifier alone, Learn2PD with and without End-of-Text when a filter is given (or the
drafter is the embedded one, which ships with its filter), and the block decoders with
each of Fast-dLLM's KV caches (--block-length, --cache): Fast-dLLM's Dream, and the
threshold and Learn2PD in blocks.

--drafter alone (no --verifier) compares the drafter's own decoders; a LLaDA drafter
(apd_jax has no verifier of its tokenizer, so no APD) gets LLaDA's generate with
low-confidence remasking, the threshold and Learn2PD in blocks, with each cache,
agreement measured against the first row (LLaDA's generate, one token per step, no cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from apd_jax.checkpoints import load_model, load_tokenizer, read_config
from apd_jax.cli.common import DefaultsHelpFormatter, corpus_prompts, embedded_filter, positive_int, user_path
from apd_jax.cli.options import (
    add_pair_options,
    optional_int,
    pair_paths,
    settings_option,
    settings_values,
)
from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE
from apd_jax.decoding.blocks.cached import CACHE_MODES
from apd_jax.evaluation.compare import (
    compare_decoders,
    format_lookahead_table,
    format_table,
    lookahead_study,
    planned_runs,
)
from apd_jax.models.config import ModelConfig, tiny_config
from apd_jax.models.families import FAMILIES
from apd_jax.decoding.registry import decoder
from apd_jax.decoding.learn2pd import load_filter
from apd_jax.models.model import init_model
from apd_jax.text.prompts import parse_ids, read_prompts_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare all decoders on one pair", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    add_pair_options(p)
    p.add_argument("--random-tiny", action="store_true", help="tiny random pair; prompts are token ids")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts-file", type=user_path,
                        help="one prompt per line, `\\n` for a newline (ids with --random-tiny)")
    source.add_argument("--heldout-prompts", type=positive_int, metavar="N",
                        help="the first N held-out prompts of the stdlib corpus (apd_jax.text.corpus.stdlib_prompts: "
                             "the embedded pair's APD check; files it was not trained on)")
    p.add_argument("--stdlib", type=user_path, default=None,
                   help="--heldout-prompts: corpus root (default: this Python's stdlib, as `apd-jax train`)")
    p.add_argument("--filter", type=user_path,
                   help="a Learn2PD filter from `apd-jax train-filter` (default with the embedded drafter: its own)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens every decoder generates per prompt")
    settings_option(p, "--threshold", "the threshold and Fast-dLLM Dream rows' confidence and the Learn2PD rows' "
                    "keep threshold", ["threshold"], type=float)
    settings_option(p, "--block-length", "the block rows' answer positions per block, decoded left to right; "
                    "'none': one block", ["dream-block", "llada", "threshold", "learn2pd"], type=optional_int)
    p.add_argument("--cache", choices=CACHE_MODES, default=None,
                   help="the block rows with this one of Fast-dLLM's KV caches only (LLaDA's uncached reference row "
                        "stays) (default: a row for each)")
    settings_option(p, "--R", "APD's mixture weight", ["apd"], type=float)
    settings_option(p, "--W", "APD's and Dream K's drafter KV window", ["apd"], type=int)
    settings_option(p, "--M", "APD's and Dream K's max lookahead", ["apd"], type=int)
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="prompts each decoder decodes at once; more prompts run in batches of this size")
    p.add_argument("--lookahead", default=None, metavar="SPEC",
                   help="instead of the decoders: APD at each ';'-separated lookahead, 'M' (the paper's fixed M) "
                        "or 'M,M_min,M_scale,M_margin' (adaptive), e.g. '100;24;100,8,2,4'; the first is the "
                        "reference for agreement (default: none)")
    p.add_argument("--completions", type=user_path, default=None,
                   help="with --lookahead: a JSONL of {prompt, completion} for an exact-match column (default: none)")
    p.set_defaults(func=run)


def lookahead_settings(spec: str, base: APDConfig) -> list[APDConfig]:
    """--lookahead SPEC -> one APD setting per entry, the rest of `base` kept."""
    settings = []
    for entry in filter(None, spec.split(";")):
        try:
            parts = entry.split(",")
            if len(parts) == 1:
                settings.append(dataclasses.replace(base, M=int(parts[0])))
            elif len(parts) == 4:
                M, m_min, scale, margin = parts
                settings.append(dataclasses.replace(base, M=int(M), M_min=int(m_min), M_scale=float(scale),
                                                    M_margin=int(margin)))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--lookahead entry {entry!r}: expected 'M' or 'M,M_min,M_scale,M_margin'") from None
    if not settings:
        raise ValueError(f"--lookahead {spec!r} names no setting")
    for s in settings:
        s.validate()
    return settings


COMPLETIONS = "one JSON object with 'prompt' and 'completion' per line"


def _read_completions(path: Path) -> list[dict]:
    """--completions: the {prompt, completion} items of a JSONL file; anything else names the file (and line)."""
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise FileNotFoundError(f"--completions {path} {problem}: expected a JSONL file, {COMPLETIONS}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--completions {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}); expected {COMPLETIONS}") from None
    items = []
    for n, line in enumerate(text.split("\n"), 1):  # lines end at \n only, as JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--completions {path}:{n} is not JSON ({err.msg}); expected {COMPLETIONS}") from None
        if not isinstance(item, dict) or not {"prompt", "completion"} <= item.keys():
            raise ValueError(f"--completions {path}:{n} needs the keys 'prompt' and 'completion'")
        items.append(item)
    return items


def _completions(items: list[dict], tokenizer) -> tuple[list[list[int]], list[str], object]:
    return [tokenizer.encode(i["prompt"]) for i in items], [i["completion"] for i in items], tokenizer.decode


def _check_options(args: argparse.Namespace) -> tuple[APDConfig, float, list[APDConfig] | None, list[dict] | None]:
    """Every setting and input file checked before any model loads: APD's settings, the threshold, the
    --lookahead study's settings and the --completions items (each None when not given)."""
    if args.random_tiny and args.prompts_file is None:
        raise ValueError("--random-tiny has no tokenizer: give token ids with --prompts-file")
    if args.random_tiny and (args.drafter or args.verifier):
        raise ValueError("--random-tiny makes a tiny random pair instead of loading one: drop --drafter and "
                         "--verifier, or --random-tiny")
    if args.stdlib is not None and args.heldout_prompts is None:
        raise ValueError("--stdlib is the corpus of --heldout-prompts: give --heldout-prompts N too, or drop --stdlib")
    values = settings_values(args)
    apd = decoder("apd").settings_from({k: v for k, v in values.items() if k in ("R", "W", "M")}
                                       | {"max_new_tokens": args.max_new_tokens})
    apd.validate()
    threshold = values.get("threshold", decoder("threshold").settings.threshold)
    decoder("threshold").settings_from({"threshold": threshold, "max_new_tokens": args.max_new_tokens}).validate()
    if args.completions is not None:
        if args.lookahead is None:
            raise ValueError("--completions adds a column to the --lookahead study: give --lookahead too")
        if args.random_tiny:
            raise ValueError("--completions needs a tokenizer (not --random-tiny)")
    if args.lookahead is not None and (args.cache is not None or "block_length" in values):
        raise ValueError("--block-length and --cache set the block decoders' rows; --lookahead studies APD alone: "
                         "drop them")
    if args.filter is not None and not args.filter.is_dir():
        raise FileNotFoundError(f"--filter {args.filter} is not a directory: give a filter of `apd-jax train-filter`")
    settings = None if args.lookahead is None else lookahead_settings(args.lookahead, apd)
    return apd, threshold, settings, None if args.completions is None else _read_completions(args.completions)


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig | None]:
    """The drafter's and the verifier's configs (None: no verifier), read before any weights: --drafter and
    --verifier both or neither (the embedded pair), or --drafter alone (its own decoders)."""
    if args.random_tiny:
        return tiny_config(causal=False), tiny_config(causal=True)
    if args.drafter is not None and args.verifier is None:
        return read_config(args.drafter), None
    args.drafter, args.verifier = pair_paths(args.drafter, args.verifier)
    return read_config(args.drafter), read_config(args.verifier)


def _without_verifier(drafter: ModelConfig) -> str:
    """The line saying why a drafter compared alone has no APD rows."""
    if any(f.causal and f.vocabulary == drafter.family.vocabulary for f in FAMILIES.values()):
        return "(no APD or AR rows: no --verifier given; give one sharing the drafter's tokenizer for them)"
    return (f"(no APD or AR rows: APD needs a causal verifier sharing the drafter's tokenizer, and apd_jax has none "
            f"for a {drafter.model_type} drafter)")


def run(args: argparse.Namespace) -> int:
    apd, threshold, settings, completion_items = _check_options(args)
    drafter_cfg, verifier_cfg = _configs(args)
    if settings is not None and verifier_cfg is None:
        raise ValueError("--lookahead studies APD, which needs a verifier: give --verifier DIR too")
    path = args.filter or (None if args.random_tiny else embedded_filter(args.drafter))
    caches = CACHE_MODES if args.cache is None else (args.cache,)
    block_length = settings_values(args).get("block_length")
    if settings is None:  # every row's settings and the pair checked before any model loads
        planned_runs(drafter_cfg, verifier_cfg, args.max_new_tokens, apd, threshold, path is not None,
                     block_length=block_length, caches=caches)
    if args.random_tiny:
        drafter, verifier = init_model(drafter_cfg, 1), init_model(verifier_cfg, 2)
        prompts = [parse_ids(line, f"prompts file {args.prompts_file}")
                   for line in read_prompts_file(args.prompts_file)]
    else:
        drafter = load_model(args.drafter)
        verifier = None if verifier_cfg is None else load_model(args.verifier)
        if args.heldout_prompts is not None:
            texts = corpus_prompts("--heldout-prompts", args.heldout_prompts, args.drafter, heldout=True,
                                   seq_len=drafter_cfg.max_position_embeddings, root=args.stdlib)
        else:
            texts = read_prompts_file(args.prompts_file)
        tokenizer = load_tokenizer(args.drafter)
        prompts = [tokenizer.encode(text) for text in texts]
    if path is None:
        print("(no Learn2PD rows: give --filter DIR for this drafter)", file=sys.stderr)
    if verifier is None:
        print(_without_verifier(drafter_cfg), file=sys.stderr)
    learned = None if path is None else load_filter(path)
    if settings is not None:
        completions = None if completion_items is None else _completions(completion_items, tokenizer)
        print(format_lookahead_table(lookahead_study(drafter, verifier, prompts, settings, completions,
                                                     args.batch_size)))
        return 0
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    print(format_table(compare_decoders(drafter, verifier, prompts, args.max_new_tokens, apd, learned, threshold,
                                        block_length=block_length, caches=caches, batch_size=args.batch_size,
                                        log=progress)))
    return 0
