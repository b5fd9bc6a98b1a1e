"""`apd-jax convert`: Hugging Face safetensors <-> apd_jax (orbax) checkpoints."""

from __future__ import annotations

import argparse

from apd_jax.checkpoints import MAX_SHARD_SIZE, convert_hf_to_orbax, convert_orbax_to_hf
from apd_jax.cli.common import finite_float, user_path
from apd_jax.models.quantize import MODES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints", description=__doc__)
    p.add_argument("direction", choices=("hf-to-flax", "flax-to-hf"))
    p.add_argument("src", type=user_path, help="source checkpoint directory")
    p.add_argument("dst", type=user_path, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace dst if apd_jax wrote it and it holds nothing else (never the source, nor a "
                        "directory with files of yours)")
    p.add_argument("--max-shard-size", type=finite_float, default=MAX_SHARD_SIZE / 10**9, metavar="GB",
                   help="flax-to-hf: safetensors files of at most this many GB, with an index past one "
                        "(default %(default)g, as save_pretrained)")
    p.add_argument("--quantize", choices=tuple(MODES),
                   help="hf-to-flax: save 8-bit weights (int8: weight-only; fp8: e4m3 weights and activations, fp8 "
                        "GEMMs; fp8-weights: e4m3 weight-only), one scale per output channel; loads back quantized "
                        "(default: as stored)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {args.src} not found")
    if args.max_shard_size <= 0:
        raise ValueError(f"--max-shard-size {args.max_shard_size} must be > 0")
    if args.quantize is not None and args.direction != "hf-to-flax":
        raise ValueError("--quantize quantizes an hf-to-flax conversion; a Hugging Face checkpoint holds unquantized "
                         "weights: drop --quantize")
    if args.direction == "hf-to-flax":
        out = convert_hf_to_orbax(args.src, args.dst, overwrite=args.overwrite, quantize=args.quantize)
    else:
        out = convert_orbax_to_hf(args.src, args.dst, overwrite=args.overwrite,
                                  max_shard_size=int(args.max_shard_size * 10**9))
    print(f"wrote {out}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C left: the output is renamed into place only once complete, and the temporary
    directory is removed once the writing has stopped (checkpoint.atomic_dir)."""
    kept = f"{args.dst} was left as it was" if args.dst.exists() else f"{args.dst} was not written"
    return f"{kept} and nothing was left behind; run the same command again to convert"
