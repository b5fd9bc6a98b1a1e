"""`apd-jax`: generate, convert, and the other subcommands.

Each subcommand module exposes `add_parser(subparsers)`, which registers its
parser with `func=run`. Errors a user can fix (missing directories, bad knobs)
are printed as one message, not a traceback.

`apd-jax NAME ...` imports only NAME's module (so `apd-jax convert` imports no
decoder or training code); `apd-jax --help` and an unknown name import them all.

Compiled programs are kept in JAX's persistent compilation cache, under
$XDG_CACHE_HOME/apd_jax/jax (default ~/.cache/apd_jax/jax), so a second run with the same
shapes skips the compilation; `apd-jax --no-compile-cache NAME ...` turns it off.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Subcommand modules, in the order `apd-jax --help` lists them; each registers the
# command named like its module, with "-" for "_" (train_filter: train-filter).
SUBCOMMANDS = (
    "apd_jax.commands.generate",
    "apd_jax.commands.convert",
    "apd_jax.commands.bench",
    "apd_jax.commands.compare",
    "apd_jax.commands.eval",
    "apd_jax.commands.train",
    "apd_jax.commands.train_filter",
)


def subcommand_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The one module whose command argv names first, else every module (for --help and errors)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    named = [m for m in SUBCOMMANDS if command == m.rsplit(".", 1)[1].replace("_", "-")]
    return tuple(named) or SUBCOMMANDS


def runtime_defaults() -> None:
    """Environment defaults of an apd-jax process, set before the JAX backend starts (XLA reads
    its allocator settings then) and, for the advisories, before transformers is imported; a value
    the user set is kept.

    - XLA_PYTHON_CLIENT_PREALLOCATE=false: by default XLA reserves 75 % of a GPU's memory with its
      first array, and on an H200 that reservation alone holds 3.3 GiB of host memory (0.6 -> 3.9 GiB
      resident; docs/benchmarks/2026-12-01-h200/rss-variants.txt); growing the pool as it is needed
      holds none. Set it to true to reserve up front.
    - TRANSFORMERS_NO_ADVISORY_WARNINGS: transformers' advice (e.g. "PyTorch was not found", printed on
      import where torch is absent: apd_jax uses it only for tokenizers and configs) is not for
      apd-jax's users.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def compile_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apd_jax" / "jax"


def enable_compile_cache() -> Path | None:
    """Keep compiled programs across runs (JAX's persistent compilation cache) in compile_cache_dir(),
    unless the user set a cache directory of their own or the directory cannot be made (then none)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"apd-jax: compilation cache off ({path}: {err.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def _version() -> str:
    try:
        return version("apd_jax")
    except PackageNotFoundError:  # a source checkout that is not pip-installed
        return "unknown (not installed)"


def build_parser(modules: Sequence[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apd-jax", description="Adaptive Parallel Decoding in JAX: a diffusion drafter and an autoregressive verifier."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled programs between runs (default: kept in "
                             "$XDG_CACHE_HOME/apd_jax/jax, so a repeated run skips its compilation)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runtime_defaults()  # before any subcommand module imports JAX or transformers
    args = build_parser(subcommand_modules(argv)).parse_args(argv)
    if not args.no_compile_cache:
        enable_compile_cache()
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"apd-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
