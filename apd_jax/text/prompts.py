"""Prompts files for the command line, read with errors that name the file and line.

A plain file holds one prompt a line. A line may hold `\\n` for a newline inside its prompt (and
`\\\\` for a backslash), so a multi-line code prompt fits on one line; with --ids a line is
space-separated token ids.

A request file (a name ending in .jsonl) holds one JSON object a line: the prompt and, where a
request wants its own, its settings:
  {"prompt": "def fib(n):", "max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "seed": 7}
Here each value's type is checked; the ranges are the decoder settings' own (DecoderConfig), checked
where a request's settings are built.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

_ESCAPE = re.compile(r"\\([\\n])")


def unescape(line: str) -> str:
    """`\\n` -> newline and `\\\\` -> backslash; any other backslash stays as it is."""
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", line)


def _text_lines(path: Path) -> list[str]:
    """A prompts file's lines, which end at "\\n" (or "\\r\\n") only: a form feed, a vertical tab or
    U+2028 inside a line is part of its prompt, not a line break (as str.splitlines would have it)."""
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
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) of each non-empty line of a plain prompts file, unescaped."""
    prompts = [(n, unescape(line)) for n, line in enumerate(_text_lines(path), 1) if line.strip()]
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


SEED_MAX = 2**63 - 2  # a jax key takes a signed 64-bit seed, and train's verifier takes seed + 1
# A request's own settings and the JSON types each takes (an int is a number too; a bool is neither).
REQUEST_SETTINGS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "seed": (int,),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One line of a request file: its prompt and the settings it sets (the others are the run's)."""

    line: int
    prompt: str
    settings: dict[str, int | float]


def is_request_file(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def read_requests(path: Path) -> list[Request]:
    """The requests of a .jsonl file, one JSON object a non-empty line: "prompt" (text) and any of
    REQUEST_SETTINGS. A line that is not such an object, an unknown key or a value of the wrong type
    is an error naming the file, the line and the fix."""
    requests = []
    for n, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        where = f"prompts file {path} line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not JSON ({err.msg} at column {err.colno}): a .jsonl request file holds "
                             'one object a line, {"prompt": "..."}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{where} must be an object with a text "prompt", e.g. {{"prompt": "def f(x):"}}')
        unknown = sorted(set(item) - {"prompt", *REQUEST_SETTINGS})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; a request takes \"prompt\" and "
                             f"{', '.join(REQUEST_SETTINGS)}")
        settings = {k: v for k, v in item.items() if k != "prompt"}
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, REQUEST_SETTINGS[key]):
                kind = "an integer" if REQUEST_SETTINGS[key] == (int,) else "a number"
                raise ValueError(f"{where}: {key} {json.dumps(value)} must be {kind}")
        if "seed" in settings and not 0 <= settings["seed"] <= SEED_MAX:
            raise ValueError(f"{where}: seed {settings['seed']} must lie in [0, {SEED_MAX}]")
        requests.append(Request(n, item["prompt"], settings))
    if not requests:
        raise ValueError(f"prompts file {path} holds no requests")
    return requests
