"""Command-line options the decoding commands share: decoder settings whose defaults come from the
settings classes (apd_jax.decoding.registry) and the model pair."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apd_jax import ASSETS_DIR
from apd_jax.cli.common import user_path
from apd_jax.decoding.registry import DECODERS, Decoder, defaults


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def describe_defaults(by_decoder: dict[str, Any]) -> str:
    """'default: 0' when every decoder agrees, else the most common one and the others by name."""
    common, _ = Counter(map(_shown, by_decoder.values())).most_common(1)[0]
    others = [f"{name}: {_shown(value)}" for name, value in by_decoder.items() if _shown(value) != common]
    return f"default: {common}" + "".join(f"; {o}" for o in others)


def optional_float(text: str) -> float | None:
    """A float, or None for 'none' (a setting switched off)."""
    return _optional(text, float, "a number")


def optional_int(text: str) -> int | None:
    """An integer, or None for 'none' (a setting switched off)."""
    return _optional(text, int, "an integer")


def _optional(text: str, kind: type, what: str) -> Any:
    """`kind(text)`, None for 'none'; else argparse's error names the flag, the value and what it takes."""
    if text.lower() == "none":
        return None
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what} or 'none'") from None


def settings_option(parser: argparse.ArgumentParser, flag: str, text: str, decoders: Sequence[str] | None = None,
                    **kw: Any) -> None:
    """An option that sets the decoder settings field of its name; left out, the decoder's own default holds.

    Its help lists the defaults of `decoders` (all that have the field when None).
    """
    dest = flag.lstrip("-").replace("-", "_")
    found = defaults(dest)
    if decoders is not None:
        found = {name: value for name, value in found.items() if name in decoders}
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=f"{text} ({describe_defaults(found)})", **kw)


def settings_values(args: argparse.Namespace) -> dict[str, Any]:
    """The decoder settings given on the command line, by field (or alias) name."""
    names = {name for d in DECODERS.values() for name in (*d.fields(), *d.aliases)}
    return {k: v for k, v in vars(args).items() if k in names}


def add_pair_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", type=user_path,
                        help="diffusion checkpoint, Dream or LLaDA: HF or apd_jax (orbax) directory; given alone, the "
                             "decoders of the diffusion model alone run on it (default: the embedded trained pair)")
    parser.add_argument("--verifier", type=user_path,
                        help="Qwen2 checkpoint: HF or apd_jax (orbax) directory (default: the embedded trained pair)")


def model_paths(chosen: Decoder, drafter: Path | None, verifier: Path | None) -> tuple[Path, Path | None]:
    """The checkpoints a decoder runs on: a decoder of the pair takes --drafter and --verifier, both or
    neither (the embedded pair); a decoder of the diffusion model alone (dream, dream-block, threshold,
    learn2pd, llada) takes --drafter (default the embedded drafter) and refuses --verifier."""
    if "verifier" in chosen.uses:
        return pair_paths(drafter, verifier)
    if verifier is not None:
        raise ValueError(f"--decoder {chosen.name} runs the diffusion model alone (--drafter DIR): drop --verifier")
    return (ASSETS_DIR / "drafter" if drafter is None else drafter), None


def pair_paths(drafter: Path | None, verifier: Path | None) -> tuple[Path, Path]:
    """--drafter and --verifier, both or neither (then the small trained pair shipped with apd_jax)."""
    if (drafter is None) != (verifier is None):
        raise ValueError("give both --drafter DIR and --verifier DIR (or neither, for the embedded pair)")
    if drafter is None:
        return ASSETS_DIR / "drafter", ASSETS_DIR / "verifier"
    return drafter, verifier
