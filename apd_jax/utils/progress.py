"""Transient progress bars on stderr, shown only when it is a terminal: loading and converting
checkpoints (bytes), decoding a prompts file (prompts)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def terminal_progress(
    columns: Sequence[Any], description: str, total: int, *, show: bool = True, completed: int = 0
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar of `columns` over `total` units that vanishes when done, disabled unless
    `show` and stderr is a terminal; yields advance(n).

    A terminal is a stream whose isatty() says so: rich alone would also draw into a redirected file
    when FORCE_COLOR or TTY_COMPATIBLE is set, and a log or output file must hold no bar."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    on_terminal = _is_tty(console.file) and console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=not (show and on_terminal)) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
