"""Files written whole or not at all: a reader never sees half of one, and an interrupted write
leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write in, renamed onto `path` when the body succeeds and removed
    when it fails or is interrupted: `path` is never left half-written."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(text)
