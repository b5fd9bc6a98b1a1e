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
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from apd_jax.utils.runtime import package_version, runtime_defaults

# Subcommand modules, in the order `apd-jax --help` lists them; each registers the
# command named like its module, with "-" for "_" (train_filter: train-filter).
SUBCOMMANDS = (
    "apd_jax.cli.generate",
    "apd_jax.cli.convert",
    "apd_jax.cli.bench",
    "apd_jax.cli.compare",
    "apd_jax.cli.eval",
    "apd_jax.cli.train",
    "apd_jax.cli.train_filter",
)


def subcommand_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The one module whose command argv names first, else every module (for --help and errors)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    named = [m for m in SUBCOMMANDS if command == m.rsplit(".", 1)[1].replace("_", "-")]
    return tuple(named) or SUBCOMMANDS


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


def build_parser(modules: Sequence[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apd-jax", description="Adaptive Parallel Decoding in JAX: a diffusion drafter and an autoregressive verifier."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version() or 'unknown (not installed)'}")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled programs between runs (default: kept in "
                             "$XDG_CACHE_HOME/apd_jax/jax, so a repeated run skips its compilation)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


def error_message(err: BaseException) -> str:
    """One line for an error a user can fix; an OSError from the system names its file and cause."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def interrupted_note(args: argparse.Namespace) -> str:
    """What an interrupted command kept and how to continue: its module's `interrupted(args)` if it
    has one (a command that writes files says which), else that it wrote nothing."""
    note = getattr(sys.modules[args.func.__module__], "interrupted", None)
    return note(args) if note is not None else "nothing was written"


@contextlib.contextmanager
def interrupts_reach_main() -> Iterator[None]:
    """A Ctrl-C that lands inside a callback Python cannot raise from (a gc callback, a __del__, a
    weakref callback: JAX runs such callbacks) is printed as "Exception ignored" and lost, and the
    command would go on to exit 0. Here it is raised again in the main thread, just after."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # A real SIGINT to the main thread, from another thread: not raised inside the callback itself,
            # and it wakes a main thread that waits in a system call.
            threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        else:
            default(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = default


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: its errors are one line and exit status 2, Ctrl-C one line and 130."""
    argv = sys.argv[1:] if argv is None else argv
    runtime_defaults()  # before any subcommand module imports JAX
    args: argparse.Namespace | None = None
    try:
        with interrupts_reach_main():
            args = build_parser(subcommand_modules(argv)).parse_args(argv)  # imports JAX: Ctrl-C may land here
            if not args.no_compile_cache:
                enable_compile_cache()
            return args.func(args) or 0
    except KeyboardInterrupt:
        note = "nothing was written" if args is None else interrupted_note(args)
        print(f"{_prog(args)}: interrupted; {note}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"{_prog(args)}: error: {error_message(err)}", file=sys.stderr)
        return 2


def _prog(args: argparse.Namespace | None) -> str:
    return "apd-jax" if args is None else f"apd-jax {args.command}"

