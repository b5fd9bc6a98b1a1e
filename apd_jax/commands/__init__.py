"""The `apd-jax` subcommands (registered in apd_jax/cli.py) and what they share."""

from pathlib import Path

from apd_jax import ASSETS_DIR


def read_prompts_file(path: Path) -> list[str]:
    """The non-empty lines of a prompts file, one prompt each, with clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompts")
    return lines


def embedded_filter(drafter: Path | None) -> Path | None:
    """The Learn2PD filter shipped for the embedded drafter when `drafter` is that drafter, else None."""
    if drafter is not None and drafter.resolve() == (ASSETS_DIR / "drafter").resolve():
        return ASSETS_DIR / "filter"
    return None
