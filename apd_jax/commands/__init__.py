"""The `apd-jax` subcommands (registered in apd_jax/cli.py) and what they share."""

from pathlib import Path


def read_prompts_file(path: Path) -> list[str]:
    """The non-empty lines of a prompts file, one prompt each, with clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} holds no prompts")
    return lines
