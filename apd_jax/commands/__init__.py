"""The `apd-jax` subcommands (registered in apd_jax/cli.py) and what they share.

`apd-jax --help` imports every subcommand module to build its parser, so they and this
package import no training code (apd_jax.train, optax) at module level: `apd-jax train`
imports it when it runs.
"""

import argparse
from pathlib import Path

from apd_jax import ASSETS_DIR
from apd_jax.corpus import stdlib_prompts
from apd_jax.tokenizer import load_tokenizer_file


def user_path(text: str) -> Path:
    """A path option's value with `~` expanded: a quoted "~/x" (which the shell leaves alone) names the
    same file as an unquoted one. Every path option of every command takes its value through this."""
    return Path(text).expanduser()


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
