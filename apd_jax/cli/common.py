"""The `apd-jax` subcommands (registered in apd_jax/cli/app.py) and what they share.

`apd-jax --help` imports every subcommand module to build its parser, so they and this
package import no training code (apd_jax.training's loop and objectives, optax) at module level: `apd-jax train`
imports it when it runs.
"""

import argparse
import math
import os
from pathlib import Path

from apd_jax import ASSETS_DIR
from apd_jax.text.corpus import stdlib_prompts
from apd_jax.text.prompts import SEED_MAX
from apd_jax.text.tokenizer import load_tokenizer_file


def user_path(text: str) -> Path:
    """A path option's value with `~` expanded: a quoted "~/x" (which the shell leaves alone) names the
    same file as an unquoted one. Every path option of every command takes its value through this."""
    return Path(text).expanduser()


# Option types (argparse `type=`): a bad value ends as "apd-jax CMD: error: argument --FLAG: ...",
# naming the flag, the value and what is expected, before any work.


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= {least}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a count, a size, a length)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a count where 0 turns something off, a seed)."""
    return _integer(text, 0)




def seed(text: str) -> int:
    """A PRNG seed: an integer from 0 to SEED_MAX."""
    value = nonnegative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer from 0 to {SEED_MAX}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, at least one ("1,4,16")."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected comma-separated integers >= 1, "
                                         "e.g. 1,4,16")
    return values


def finite_float(text: str) -> float:
    """A finite number (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a finite number")
    return value


def check_writable(flag: str, path: Path, *, directory: bool) -> None:
    """Fail before any work when the output `path` of `flag` cannot be written: a file where a
    directory goes or the reverse, a parent that is a file, or no permission to write where it goes."""
    if path.exists() and path.is_dir() != directory:
        if directory:
            raise FileExistsError(f"{flag} {path} is a file, not a directory: give a directory to write into")
        raise IsADirectoryError(f"{flag} {path} is a directory: give a file name, e.g. {path / 'out.json'}")
    absolute = path.absolute()
    home = absolute if directory and path.is_dir() else next(p for p in absolute.parents if p.exists())
    if not home.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {home} is a file, not a directory; choose another path")
    if not os.access(home, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {home} is not writable (permissions, or a read-only file system); "
                              "choose another path")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to an option's help unless the help states its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def embedded_filter(drafter: Path | None) -> Path | None:
    """The Learn2PD filter shipped for the embedded drafter when `drafter` is that drafter, else None."""
    if drafter is not None and drafter.resolve() == (ASSETS_DIR / "drafter").resolve():
        return ASSETS_DIR / "filter"
    return None


def corpus_prompts(option: str, n: int, drafter: Path, *, heldout: bool, seq_len: int, root: Path | None) -> list[str]:
    """`option` N: n prompt texts of the stdlib corpus, held-out or training files (corpus.stdlib_prompts)."""
    if n < 1:
        raise ValueError(f"{option} {n} must be >= 1")
    # stdlib_prompts measures prompts with the raw `tokenizers` tokenizer of an apd-jax trained pair.
    return stdlib_prompts(load_tokenizer_file(drafter), n, heldout=heldout, seq_len=seq_len, root=root)
