"""`apd-jax`: generate, convert, and the other subcommands.

Each subcommand module exposes `add_parser(subparsers)`, which registers its
parser with `func=run`. Errors a user can fix (missing directories, bad knobs)
are printed as one message, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `apd-jax --help` lists them.
SUBCOMMANDS = (
    "apd_jax.commands.generate",
    "apd_jax.commands.convert",
    "apd_jax.commands.bench",
    "apd_jax.commands.compare",
    "apd_jax.commands.eval",
    "apd_jax.commands.train",
    "apd_jax.commands.train_filter",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apd-jax", description="Adaptive Parallel Decoding in JAX: a diffusion drafter and an autoregressive verifier."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"apd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
