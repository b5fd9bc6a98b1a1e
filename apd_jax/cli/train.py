"""`apd-jax train`: train a small APD pair (tokenizer, Dream-style drafter, Qwen2 verifier) from scratch,
or (--which llada) a small model in LLaDA's layout for LLaDA's block decoder.

The corpus is this Python's standard library source, and with --packages the installed source
of other packages, so it runs offline on a GPU or (slowly) on CPU. Writes OUT/tokenizer,
OUT/drafter and OUT/verifier (Hugging Face layout, for `apd-jax generate --drafter OUT/drafter
--verifier OUT/verifier`) and, when both models exist, OUT/apd_eval.json with APD tokens per
pass on held-out prompts; --which llada writes OUT/llada instead (a LLaDA checkpoint, for
`apd-jax generate --drafter OUT/llada --decoder llada`), with the same tokenizer and the
drafter's objective. Each directory holds a training.json (settings, corpus); train
replaces only directories that hold one, each whole, so a run stopped midway leaves the
earlier ones as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from apd_jax.text import corpus
from apd_jax.cli.common import check_writable, finite_float, nonnegative_int, positive_int, seed, user_path
from apd_jax.models.config import ModelSize
from apd_jax.training.settings import JOBS, PipelineSettings, TrainSettings, models_trained

# Every default below is the settings classes' own.
DRAFTER, VERIFIER, LLADA = PipelineSettings.drafter_train, PipelineSettings.verifier_train, PipelineSettings.llada_train
MODELS = (("drafter", PipelineSettings.drafter), ("verifier", PipelineSettings.verifier),
          ("llada", PipelineSettings.llada))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a small drafter/verifier pair on the Python stdlib",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=user_path, required=True,
                   help="output directory (tokenizer/, drafter/, verifier/; llada/)")
    p.add_argument("--which", choices=JOBS, default=PipelineSettings.which,
                   help="what to train: the pair (both), one of it, the tokenizer alone, or the LLaDA-shaped model "
                        "(llada); the tokenizer is trained first whenever OUT/tokenizer is missing")
    p.add_argument("--retrain-tokenizer", action="store_true", help="retrain OUT/tokenizer even if present")
    p.add_argument("--seed", type=seed, default=DRAFTER.seed,
                   help="drafter and LLaDA model seed; the verifier takes seed + 1")
    g = p.add_argument_group("optimisation (every model alike, unless --verifier-* or --llada-* says otherwise; "
                             "the LLaDA model takes the drafter's --dropout)")
    g.add_argument("--steps", type=positive_int, default=DRAFTER.steps, help="drafter optimiser steps")
    g.add_argument("--verifier-steps", type=positive_int, default=VERIFIER.steps, help="verifier optimiser steps")
    g.add_argument("--llada-steps", type=positive_int, default=LLADA.steps, help="LLaDA model optimiser steps")
    g.add_argument("--batch-size", type=positive_int, default=TrainSettings.batch_size, help="sequences per step")
    g.add_argument("--seq-len", type=positive_int, default=TrainSettings.seq_len, help="training window; also max_position_embeddings")
    g.add_argument("--lr", type=finite_float, default=TrainSettings.lr, help="peak learning rate (AdamW)")
    g.add_argument("--verifier-lr", type=finite_float, default=None, help="default: --lr")
    g.add_argument("--warmup", type=nonnegative_int, default=TrainSettings.warmup, help="linear warmup steps, then cosine decay to 10%%")
    g.add_argument("--weight-decay", type=finite_float, default=TrainSettings.weight_decay, help="AdamW weight decay, on matrices only")
    g.add_argument("--dropout", type=finite_float, default=DRAFTER.dropout,
                   help="residual dropout on every attention and MLP output while training (0: none)")
    g.add_argument("--verifier-dropout", type=finite_float, default=VERIFIER.dropout,
                   help="the verifier's residual dropout (it overfits the stdlib without it)")
    g.add_argument("--suffix-prob", type=finite_float, default=TrainSettings.suffix_prob,
                   help="drafter and LLaDA model: share of rows noised only after a clean prefix")
    g.add_argument("--log-every", type=positive_int, default=TrainSettings.log_every, help="steps per log line (and the first step's)")
    g.add_argument("--micro-batches", type=nonnegative_int, default=TrainSettings.micro_batches,
                   help="split each step's batch in this many slices and add their gradients (the same update, "
                        "less memory); 0: the fewest whose step fits the device's free memory")
    g.add_argument("--eval-every", type=positive_int, default=TrainSettings.eval_every, help="held-out evaluation period (steps)")
    g.add_argument("--eval-windows", type=positive_int, default=TrainSettings.eval_windows, help="held-out windows per evaluation")
    s = p.add_argument_group("model sizes")
    s.add_argument("--vocab-size", type=positive_int, default=PipelineSettings.vocab_size, help="BPE vocabulary, special tokens included")
    for name, size in MODELS:
        s.add_argument(f"--{name}-hidden", type=positive_int, default=size.hidden, help=f"{name} hidden size")
        s.add_argument(f"--{name}-layers", type=positive_int, default=size.layers, help=f"{name} decoder layers")
        s.add_argument(f"--{name}-heads", type=positive_int, default=size.heads, help="head dim = hidden / heads")
        s.add_argument(f"--{name}-kv-heads", type=positive_int, default=size.kv_heads, help=f"{name} key/value heads")
        s.add_argument(f"--{name}-intermediate", type=positive_int, default=size.intermediate, help=f"{name} MLP width")
    d = p.add_argument_group("numerics and data")
    d.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=PipelineSettings.param_dtype, help="master weights")
    d.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=PipelineSettings.dtype,
                   help="compute dtype; auto is bfloat16 on a GPU/TPU, float32 on CPU")
    d.add_argument("--storage-dtype", choices=("bfloat16", "float32"), default=PipelineSettings.storage_dtype,
                   help="dtype of the saved safetensors")
    d.add_argument("--stdlib", type=user_path, default=PipelineSettings.stdlib, help="corpus root (default: this Python's stdlib)")
    d.add_argument("--packages", type=_package_list, default="none",
                   help="installed packages whose .py files join the training files: comma-separated names, "
                        f"'deps' for apd_jax's own dependencies ({','.join(corpus.DEPENDENCY_PACKAGES)}), or "
                        "'none', the stdlib alone, as the embedded pair was trained")
    d.add_argument("--stdlib-repeats", type=positive_int, default=PipelineSettings.stdlib_repeats,
                   help="times the stdlib's tokens appear in the training stream (weights it against --packages)")
    d.add_argument("--max-files", type=positive_int, default=PipelineSettings.max_files,
                   help="use only about this many stdlib files, and the same share of each package's (quick runs)")
    d.add_argument("--eval-prompts", type=nonnegative_int, default=PipelineSettings.eval_prompts,
                   help="held-out prompts for the APD check (0: skip)")
    d.add_argument("--eval-max-new-tokens", type=positive_int, default=PipelineSettings.eval_max_new_tokens, help="tokens per prompt in the APD check")
    p.set_defaults(func=run)


def _package_list(text: str) -> tuple[str, ...]:
    """--packages: comma-separated names; 'deps' stands for DEPENDENCY_PACKAGES, 'none' alone for none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    expanded = [m for n in names for m in (corpus.DEPENDENCY_PACKAGES if n == "deps" else (n,))]
    return tuple(dict.fromkeys(expanded))


def settings_from_args(args: argparse.Namespace) -> PipelineSettings:
    if args.stdlib is not None and not args.stdlib.is_dir():
        raise FileNotFoundError(f"--stdlib {args.stdlib} is not a directory")
    if args.max_files is not None and args.max_files < 2:
        raise ValueError(f"--max-files {args.max_files} must be >= 2 (some files are held out)")
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len, warmup=args.warmup,
                  weight_decay=args.weight_decay, seed=args.seed, log_every=args.log_every,
                  eval_every=args.eval_every, eval_windows=args.eval_windows, suffix_prob=args.suffix_prob,
                  micro_batches=args.micro_batches)
    drafter_train = TrainSettings(steps=args.steps, lr=args.lr, dropout=args.dropout, **common)
    verifier_lr = args.lr if args.verifier_lr is None else args.verifier_lr
    verifier_train = TrainSettings(steps=args.verifier_steps, lr=verifier_lr, dropout=args.verifier_dropout,
                                   **(common | {"seed": args.seed + 1}))
    llada_train = TrainSettings(steps=args.llada_steps, lr=args.lr, dropout=args.dropout, **common)
    for name, t in (("drafter", drafter_train), ("verifier", verifier_train), ("LLaDA model", llada_train)):
        try:
            t.validate()
        except ValueError as err:
            raise ValueError(f"{err} (of the {name})") from None

    def size(name: str) -> ModelSize:
        get = lambda f: getattr(args, f"{name}_{f}")  # noqa: E731
        hidden, heads, kv = get("hidden"), get("heads"), get("kv_heads")
        if hidden % heads or heads % kv:
            raise ValueError(f"--{name}-hidden {hidden} must be a multiple of --{name}-heads {heads}, "
                             f"and the heads a multiple of --{name}-kv-heads {kv}")
        return ModelSize(hidden, get("layers"), heads, kv, get("intermediate"))

    return PipelineSettings(
        out=args.out, which=args.which, vocab_size=args.vocab_size, drafter=size("drafter"),
        verifier=size("verifier"), drafter_train=drafter_train, verifier_train=verifier_train,
        llada=size("llada"), llada_train=llada_train,
        param_dtype=args.param_dtype, dtype=args.dtype, storage_dtype=args.storage_dtype, stdlib=args.stdlib,
        packages=args.packages, stdlib_repeats=args.stdlib_repeats, max_files=args.max_files,
        retrain_tokenizer=args.retrain_tokenizer, eval_prompts=args.eval_prompts,
        eval_max_new_tokens=args.eval_max_new_tokens,
    )


def run(args: argparse.Namespace) -> int:
    from apd_jax.training.pipeline import run_pipeline

    check_writable("--out", args.out, directory=True)
    settings = settings_from_args(args)
    print("settings:", json.dumps(dataclasses.asdict(settings), default=str), flush=True)
    run_pipeline(settings)
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """Which of OUT/tokenizer and the model directories asked for are complete, and the command that continues."""
    from apd_jax.training.outputs import EVAL_FILE, RECORD

    out = args.out
    wanted = ["tokenizer"] if args.which == "tokenizer" else models_trained(args.which)
    complete = [name for name in ["tokenizer", *wanted]
                if (out / name / ("tokenizer.json" if name == "tokenizer" else RECORD)).is_file()]
    rest = [name for name in wanted if name not in complete]
    if not rest:
        step = ("everything asked for is complete" if args.which == "llada"
                else f"everything asked for is complete but the APD check, {out / EVAL_FILE}")
    elif len(rest) == 1:
        step = f"to continue, run the same command with --which {rest[0]} (an existing OUT/tokenizer is reused)"
    else:
        step = "to continue, run the same command again"
    kept = ", ".join(str(out / name) for name in complete) or "nothing"
    return f"complete: {kept}; no half-written output was left behind; {step}"
