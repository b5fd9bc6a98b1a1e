"""`apd-jax generate`: APD (or another decoder) on a drafter/verifier pair, from a prompt, stdin or a file.

--decoder picks the decoding strategy: apd (default), leftright (Dream K tokens per
pass), ar (the verifier alone), dream (Dream's own sampler over --steps), threshold
(confidence-threshold parallel decoding), learn2pd (a filter from `apd-jax train-filter`;
the embedded drafter ships with one).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax

from apd_jax.decoding.apd import APDConfig, apd_generate, shared_vocab_size
from apd_jax.decoding.apd_steps import live_view
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE, RUN_SUFFIX, RunOutput, generate_continuously
from apd_jax.decoding.batching import generate_in_batches, kept_records, open_output
from apd_jax.decoding.continuous import Request, check_request
from apd_jax.text.chat import chat_prompt_ids, has_chat_template
from apd_jax.text.chat import messages as chat_messages
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.cli.common import DefaultsHelpFormatter, embedded_filter, positive_int, seed, user_path
from apd_jax.cli.options import (
    add_pair_options,
    model_paths,
    optional_float,
    optional_int,
    settings_option,
    settings_values,
)
from apd_jax.models.config import tiny_config
from apd_jax.decoding.registry import DECODERS, Decoder, Models, decoder
from apd_jax.decoding.blocks.cached import CACHE_MODES
from apd_jax.decoding.blocks.llada import REMASKING
from apd_jax.decoding.diffusion import ALGORITHMS
from apd_jax.decoding.generation import CompileTimer, DecoderConfig, check_prompts
from apd_jax.decoding.learn2pd import load_filter
from apd_jax.models.model import init_model
from apd_jax.models.quantize import MODES, quantize
from apd_jax.text.prompts import is_request_file, parse_ids, read_prompt_lines, read_requests
from apd_jax.models.sharding import make_mesh, parse_mesh, shard_model


SLOTTED = [name for name, d in DECODERS.items() if d.slots is not None]  # decoded through continuous batching


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with APD", description=__doc__,
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?",
                   help="prompt text; with --ids, space-separated ids (default: read stdin)")
    p.add_argument("--prompts-file", type=user_path,
                   help="one prompt per line, `\\n` for a newline; or a .jsonl request file, one JSON object a line: "
                        '{"prompt": ..., and any of its own "max_new_tokens" (up to --max-new-tokens), "temperature", '
                        '"top_p", "top_k", "seed"}; decoded --batch-size at a time (default: none)')
    p.add_argument("--ids", action="store_true", help="prompts are token ids, not text")
    add_pair_options(p)
    p.add_argument("--random-tiny", action="store_true",
                   help="use a tiny randomly initialised pair (no checkpoint; output is noise)")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: as stored)")
    p.add_argument("--quantize", choices=tuple(MODES),
                   help="8-bit weights for both models, quantized at load (int8: weight-only; fp8: e4m3 weights and "
                        "activations; fp8-weights: e4m3 weight-only); a checkpoint converted with --quantize loads "
                        "quantized without it (default: none)")
    p.add_argument("--decoder", choices=tuple(DECODERS), default="apd", help="decoding strategy")
    settings_option(p, "--max-new-tokens", "tokens to generate per prompt", type=int)
    settings_option(p, "--temperature", "sampling temperature, 0 is greedy", type=float)
    settings_option(p, "--top-p", "nucleus filter, 1 disables it", type=float)
    settings_option(p, "--top-k", "top-k filter, 0 disables it", type=int)
    settings_option(p, "--max-len", "positions for a prompt and its new tokens (the caches' size); 'none': "
                    "the models' max_position_embeddings", type=optional_int)
    settings_option(p, "--R", "apd: mixture weight in [0, 1]", ["apd"], type=float)
    settings_option(p, "--W", "apd/leftright: drafter KV window", type=int)
    settings_option(p, "--M", "apd/leftright: max lookahead", type=int)
    settings_option(p, "--rule", "apd: acceptance rule", ["apd"], choices=("paper", "reference"))
    settings_option(p, "--K", "leftright: tokens committed per pass", type=int)
    settings_option(p, "--alg", "dream: unmasking order", choices=ALGORITHMS)
    p.add_argument("--steps", type=int, default=argparse.SUPPRESS,
                   help="dream, dream-block, llada: passes in all, >= 1 (default: --max-new-tokens, one token per "
                        "step)")
    settings_option(p, "--block-length", "llada, dream-block, threshold, learn2pd: answer positions per block, "
                    "decoded left to right; 'none': one block", type=optional_int)
    settings_option(p, "--cache", "llada, dream-block, threshold, learn2pd: Fast-dLLM's KV cache over blocks",
                    choices=CACHE_MODES)
    settings_option(p, "--remasking", "llada: which masked positions a step commits", choices=REMASKING)
    settings_option(p, "--cfg-scale", "llada: classifier-free guidance against the prompt fully masked, 0 off",
                    type=float)
    settings_option(p, "--logits-eos-inf", "llada: never predict its eos_id", action="store_true")
    settings_option(p, "--confidence-eos-eot-inf", "llada: commit predictions of eos_id and eot_id last",
                    action="store_true")
    settings_option(p, "--eos-id", "llada: the eos of --logits-eos-inf and --confidence-eos-eot-inf (LLaDA-8B's)",
                    type=int)
    settings_option(p, "--eot-id", "llada: the <|eot_id|> of --confidence-eos-eot-inf (LLaDA-8B's)", type=int)
    settings_option(p, "--threshold", "threshold, dream-block: confidence to commit a token ('none' with "
                    "dream-block: its step schedule); learn2pd: the filter's keep probability", type=optional_float)
    settings_option(p, "--eot-threshold", "threshold/learn2pd: drop positions after an eos predicted with this "
                    "confidence, 'none' disables it", type=optional_float)
    p.add_argument("--filter", type=user_path,
                   help="learn2pd: the trained filter directory (default with the embedded drafter: its own filter)")
    p.add_argument("--seed", type=seed, default=0, help="PRNG seed of sampling")
    settings_option(p, "--M-min", "apd: adaptive lookahead (beyond the paper): the smallest lookahead; "
                    "'none' keeps the paper's fixed M", ["apd"], type=optional_int)
    settings_option(p, "--M-scale", "apd: adaptive lookahead's next M per accepted token", ["apd"], type=float)
    settings_option(p, "--M-margin", "apd: adaptive lookahead's next M beyond M-scale x accepted", ["apd"], type=int)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt in the drafter tokenizer's chat template, as instruct checkpoints "
                        "expect (default: when the tokenizer has one and the prompt is text)")
    p.add_argument("--system", default=None, help="a system message before the prompt (with --chat; default: none)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"prompts decoded at once: with {', '.join(SLOTTED)} the slots of continuous batching (a "
                        "finished row's slot takes the next prompt), with the other decoders the batch size")
    p.add_argument("--output", type=user_path,
                   help="write one JSON object per prompt (text, ids, passes, accepted per pass) to this JSONL "
                        f"file as each finishes, each carrying its prompt's index ({', '.join(SLOTTED)}: in the order "
                        "they finish; other decoders: in input order); the run's settings are recorded beside it in "
                        f"FILE{RUN_SUFFIX} (default: print the text)")
    p.add_argument("--resume", action="store_true",
                   help="with --output: continue an interrupted run, decoding the prompts whose records it lacks; "
                        f"only a file with its {RUN_SUFFIX} beside it and only with the same settings (a differing one "
                        "is named); a cut last record is written again, anything else in the file is refused")
    p.add_argument("--verbose", action="store_true", help="print each prompt's tokens accepted per pass")
    p.add_argument("--live", action="store_true",
                   help="show APD's passes as the compiled loop makes them, each pass's tokens in their own colour")
    p.add_argument("--mesh", default=None,
                   help="shard over devices, e.g. 'data=2,model=4' (rows over data, tensor parallel over model; "
                        "default: one device)")
    p.set_defaults(func=run)


def settings(args: argparse.Namespace) -> DecoderConfig:
    """The chosen decoder's settings: the options given, the settings class's defaults for the rest."""
    values = settings_values(args)
    config = decoder(args.decoder).settings_from(values)
    config.validate()
    return config


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(prompt texts, where each came from: 'prompts file F line N', for errors found later, and each
    prompt's own settings: those a request file's line sets, else none)."""
    if args.prompts_file is not None:
        if args.prompt is not None:
            raise ValueError(f"give a prompt or --prompts-file, not both (the prompt {args.prompt[:40]!r} and "
                             f"--prompts-file {args.prompts_file})")
        if is_request_file(args.prompts_file):
            requests = read_requests(args.prompts_file)
            return ([r.prompt for r in requests], [f"prompts file {args.prompts_file} line {r.line}" for r in requests],
                    [r.settings for r in requests])
        lines = read_prompt_lines(args.prompts_file)
        return ([text for _, text in lines], [f"prompts file {args.prompts_file} line {n}" for n, _ in lines],
                [{} for _ in lines])
    if args.prompt is not None:
        return [args.prompt], ["the prompt"], [{}]
    if sys.stdin.isatty():
        print("apd-jax generate: reading the prompt from stdin (end it with Ctrl-D; or give it as an argument)",
              file=sys.stderr)
    return [sys.stdin.read()], ["the prompt read from stdin"], [{}]


def _filter_path(args: argparse.Namespace) -> Path:
    path = args.filter or (None if args.random_tiny else embedded_filter(args.drafter))
    if path is None:
        raise ValueError("--decoder learn2pd needs --filter DIR for this drafter (only the embedded drafter "
                         "has one built in; train one with `apd-jax train-filter`)")
    return path


def run_settings(args: argparse.Namespace, config: DecoderConfig, filter_path: Path | None) -> dict[str, Any]:
    """What determines the records of a run besides its prompts: recorded beside --output, so that
    --resume continues only the same run."""
    resolved = lambda path: None if path is None else str(Path(path).resolve())  # noqa: E731
    return {"decoder": args.decoder, **dataclasses.asdict(config), "seed": args.seed, "batch_size": args.batch_size,
            "drafter": resolved(args.drafter), "verifier": resolved(args.verifier), "filter": resolved(filter_path),
            "random_tiny": args.random_tiny, "dtype": args.dtype, "ids": args.ids, "chat": args.chat,
            "system": args.system, **({"quantize": args.quantize} if args.quantize else {})}


def _encode(args: argparse.Namespace, texts: list[str], sources: list[str], tokenizer) -> list[list[int]]:
    """Prompt ids: parsed with --ids; else in the tokenizer's chat template (--chat, the default when it has
    one), or plain text (--no-chat)."""
    if args.ids:
        if args.chat or args.system is not None:
            raise ValueError("--chat and --system apply a chat template to text; with --ids the prompt is ids already")
        return [parse_ids(t, source) for t, source in zip(texts, sources)]
    use_chat = has_chat_template(tokenizer) if args.chat is None else args.chat
    if args.system is not None and not use_chat:
        raise ValueError("--system needs a chat template (--chat); this prompt is plain text (--no-chat, or the "
                         "tokenizer has no chat template)")
    if use_chat:
        return [chat_prompt_ids(tokenizer, chat_messages(t, args.system)) for t in texts]
    return [tokenizer.encode(t) for t in texts]


def run(args: argparse.Namespace) -> int:
    chosen = decoder(args.decoder)
    config = settings(args)
    if args.live and (args.decoder != "apd" or args.mesh is not None):
        raise ValueError("--live shows APD's passes (--decoder apd, one device)")
    if args.quantize is not None and args.mesh is not None:
        raise ValueError("--quantize runs the models on one device: drop --mesh or --quantize")
    mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
    if mesh is not None and not chosen.sharded:
        raise ValueError(f"--mesh is supported with --decoder apd only, not {args.decoder}")
    if args.resume and args.output is None:
        raise ValueError("--resume continues an --output FILE.jsonl: give the file")
    if args.verbose and args.output is not None:
        raise ValueError("--verbose prints each prompt's tokens accepted per pass beside its text; with --output each "
                         "record holds them (accepted_per_pass): drop --verbose")
    texts, sources, own = _prompts(args)  # before loading: a bad prompts file fails at once
    if any(own) and (chosen.slots is None or mesh is not None or args.live):
        first = next(i for i, o in enumerate(own) if o)
        raise ValueError(f"{sources[first]} sets {', '.join(own[first])}: a request's own settings need continuous "
                         f"batching (--decoder {', '.join(SLOTTED)}, one device); give them on the command line")
    if args.live and len(texts) != 1:
        raise ValueError("--live shows one prompt (give one prompt, not a file of several)")
    if args.random_tiny and not args.ids:
        raise ValueError("--random-tiny has no tokenizer: give the prompt as token ids with --ids")
    if args.random_tiny and (args.drafter or args.verifier):
        raise ValueError("--random-tiny makes a tiny random pair instead of loading one: drop --drafter and "
                         "--verifier, or --random-tiny")
    if not args.random_tiny:
        args.drafter, args.verifier = model_paths(chosen, args.drafter, args.verifier)
    if args.filter is not None and "filter" not in chosen.uses:
        raise ValueError(f"--decoder {args.decoder} does not take --filter (a Learn2PD filter: --decoder learn2pd)")
    filter_path = _filter_path(args) if "filter" in chosen.uses else None
    if args.output is None:
        return _generate(args, chosen, config, texts, sources, own, mesh, filter_path, None)
    # Checked (a new run: created) before any model loads; removed again if the run ends before its first record.
    recorded = run_settings(args, config, filter_path)
    if any(own):  # the requests' own settings determine their records too
        recorded["requests_sha256"] = hashlib.sha256(json.dumps(own).encode()).hexdigest()
    with open_output(args.output, texts, recorded, resume=args.resume) as output:
        return _generate(args, chosen, config, texts, sources, own, mesh, filter_path, output)


def _generate(args: argparse.Namespace, chosen: Decoder, config: DecoderConfig, texts: list[str], sources: list[str],
              own: list[dict[str, Any]], mesh, filter_path: Path | None, output: RunOutput | None) -> int:
    """Load the pair, check every prompt, decode them in batches into `output` (or print them)."""
    start = time.perf_counter()
    tok_d = tok_v = None
    if args.random_tiny:
        drafter, verifier = init_model(tiny_config(causal=False), 1), init_model(tiny_config(causal=True), 2)
        if args.quantize is not None:
            drafter, verifier = quantize(drafter, args.quantize), quantize(verifier, args.quantize)
        if mesh is not None:
            drafter, verifier = shard_model(drafter, mesh), shard_model(verifier, mesh)
    else:
        # Streamed onto the device, or straight into each device's shard of the mesh.
        drafter = load_model(args.drafter, param_dtype=args.dtype, mesh=mesh, quantize=args.quantize)
        tok_d = load_tokenizer(args.drafter)
        if args.verifier is not None:
            verifier = load_model(args.verifier, param_dtype=args.dtype, mesh=mesh, quantize=args.quantize)
            tok_v = load_tokenizer(args.verifier)
        else:
            verifier = None
    # The ids both models score, where a decoder runs both (checked against their tokenizers).
    vocab = None if verifier is None else shared_vocab_size(drafter.cfg, verifier.cfg, tok_d, tok_v)
    prompts = _encode(args, texts, sources, tok_d)
    models = Models(drafter, verifier, None if filter_path is None else load_filter(filter_path), vocab, mesh)
    config = chosen.with_stop_ids(config, models, None if args.ids else tok_d)
    # Every prompt checked before any is decoded: a bad line is named at once, not when its batch runs.
    check_prompts(prompts, chosen.vocab(models), fits=(config.max_new_tokens, chosen.capacity(models, config)),
                  sources=sources)
    load_s = time.perf_counter() - start

    def decode(ids: list[int]) -> str:  # a continuation of the prompt's text
        return "".join(f" {i}" for i in ids) if args.ids or tok_d is None else tok_d.decode(ids)

    key = jax.random.key(args.seed)
    slotted = chosen.slots is not None and not args.live and mesh is None
    slots = chosen.slots(models, prompts, config, args.batch_size) if slotted else None
    usage = None
    with CompileTimer() as compiled:
        start = time.perf_counter()
        if slots is not None:
            # Each prompt's noise from its own index: the same at any --batch-size and after --resume.
            requests = [Request(ids, i, **settings) for i, (ids, settings) in enumerate(zip(prompts, own))]
            for request, source in zip(requests, sources):  # every request checked before any is decoded
                check_request(request, slots, source)
            on_records = None if output is not None else _InOrder(args.verbose)
            records, usage = generate_continuously(texts, requests, slots, key, decode, output=output,
                                                   on_records=on_records)
        else:
            if args.live:
                generate, on_batch = _live_generate(models, config, key, texts[0], decode), None
            else:
                # Each batch's noise from its first prompt's index: a resumed run samples as an uninterrupted one.
                generate = lambda rows, first: chosen.generate(models, rows, config,  # noqa: E731
                                                               jax.random.fold_in(key, first))
                on_batch = None if output is not None else functools.partial(_print_batch, verbose=args.verbose)
            records = generate_in_batches(texts, prompts, generate, decode, batch_size=args.batch_size,
                                          output=output, on_batch=on_batch)
        elapsed = time.perf_counter() - start
    tokens = sum(len(r["ids"]) for r in records)
    passes = sum(r["passes"] for r in records)
    decoding = max(elapsed - compiled.seconds, 1e-9)
    where = f" -> {args.output}" if args.output is not None else ""
    occupancy = "" if usage is None else f", slot occupancy {usage.occupancy:.0%}"
    print(f"{tokens} tokens, {passes} passes, {tokens / max(passes, 1):.2f} tokens/pass, {tokens / decoding:.1f} "
          f"tokens/s{occupancy}; load {load_s:.1f} s, compile {compiled.seconds:.1f} s, generate {decoding:.1f} s"
          f"{where}")
    return 0


class _InOrder:
    """Prints finished records in input order: each as soon as every earlier prompt's has been printed."""

    def __init__(self, verbose: bool) -> None:
        self.waiting: dict[int, dict] = {}
        self.next = 0
        self.verbose = verbose

    def __call__(self, records: list[dict]) -> None:
        self.waiting.update((r["index"], r) for r in records)
        ready = []
        while self.next in self.waiting:
            ready.append(self.waiting.pop(self.next))
            self.next += 1
        _print_batch(ready, None, verbose=self.verbose)


def interrupted(args: argparse.Namespace) -> str:
    """What a run stopped by Ctrl-C kept: the records in --output and how to continue them."""
    if args.output is None:
        return "the texts printed above are what was kept (no --output)"
    kept = kept_records(args.output)
    if kept is None:
        return f"nothing was written to {args.output}"
    done, total = kept
    return f"kept {done} of {total} records in {args.output}; run the same command with --resume to continue"


def _print_batch(records: list[dict], result, *, verbose: bool) -> None:
    for r in records:
        print(r["prompt"] + r["text"], flush=True)
        if verbose:
            print(f"  [{len(r['ids'])} tokens in {r['passes']} passes: accepted {r['accepted_per_pass']}]", flush=True)


PASS_COLOURS = ("bold cyan", "bold magenta", "bold green", "bold yellow", "bold blue", "bold red")


def _live_generate(models: Models, config: APDConfig, key, prompt_text: str, decode):
    """APD on one prompt with each pass's accepted tokens printed, in turn, from inside the compiled loop."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)  # generated text keeps its own line breaks
    generated: list[int] = []
    shown = [0, 0]  # characters of the generated text printed so far, passes shown

    def show(draft, kept, eos_at) -> None:
        if kept[0] == 0:
            return
        generated.extend(draft[0, : int(kept[0])].tolist())
        # The whole text so far, less a character still cut in half (a byte-level token split).
        text = decode(generated).rstrip("\ufffd")
        console.print(text[shown[0]:], end="", style=PASS_COLOURS[shown[1] % len(PASS_COLOURS)])
        shown[0], shown[1] = len(text), shown[1] + 1

    def generate(rows, first: int):
        console.print(prompt_text, end="", style="dim")
        with live_view(show):
            result = apd_generate(models.drafter, models.verifier, rows, config, key, shared_vocab=models.shared_vocab,
                                  live=True)
        console.print()
        return result

    return generate
