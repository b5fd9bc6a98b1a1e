"""Prompts files for the command line: one prompt a line, read with errors that name the file.

A line may hold `\\n` for a newline inside its prompt (and `\\\\` for a backslash), so a
multi-line code prompt fits on one line; with --ids a line is space-separated token ids.
"""

from __future__ import annotations

import re
from pathlib import Path

_ESCAPE = re.compile(r"\\([\\n])")


def unescape(line: str) -> str:
    """`\\n` -> newline and `\\\\` -> backslash; any other backslash stays as it is."""
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", line)


def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) of each non-empty line of a prompts file, unescaped.

    Lines end at "\\n" (or "\\r\\n") only: a form feed, a vertical tab or U+2028 inside a line
    is part of its prompt, not a line break (as str.splitlines would have it).
    """
    if path.is_dir():
        raise ValueError(f"prompts file {path} is a directory; give a text file with one prompt per line")
    if not path.exists():  # a pipe (`--prompts-file <(cmd)`) or a device is read like a file
        raise FileNotFoundError(f"prompts file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")  # not read_text: its universal newlines end a line at "\r"
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompts file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    prompts = [(n, unescape(line)) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def read_prompts_file(path: Path) -> list[str]:
    """The prompts of a file: its non-empty lines, unescaped (read_prompt_lines)."""
    return [prompt for _, prompt in read_prompt_lines(path)]


def parse_ids(text: str, source: str) -> list[int]:
    """A prompt given as space-separated token ids; `source` names where it came from in the error."""
    try:
        return [int(x) for x in text.split()]
    except ValueError:
        raise ValueError(f"{source} must hold space-separated integer token ids (with --ids), got {text[:40]!r}") from None
