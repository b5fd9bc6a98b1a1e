"""`apd-jax convert`: Hugging Face safetensors <-> apd_jax (orbax) checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from apd_jax.checkpoint import convert_hf_to_orbax, convert_orbax_to_hf


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints", description=__doc__)
    p.add_argument("direction", choices=("hf-to-flax", "flax-to-hf"))
    p.add_argument("src", type=Path, help="source checkpoint directory")
    p.add_argument("dst", type=Path, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {args.src} not found")
    convert = convert_hf_to_orbax if args.direction == "hf-to-flax" else convert_orbax_to_hf
    out = convert(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
