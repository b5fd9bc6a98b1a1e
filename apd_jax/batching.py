"""Prompts of any number, decoded in fixed-size batches and written as they finish.

A prompts file of 10,000 lines is not one batch (its caches and logits would not fit
a device), but `batch_size` rows at a time. Every batch has the same shape, the last
one filled up with copies of its first prompt whose results are dropped, so a run
compiles once per prompt-length bucket. With an output file, each prompt's record
is appended, in input order, as soon as its batch finishes: an interrupted run keeps
what it finished, and `resume=True` continues after the last complete record.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apd_jax.generation import GenerationResult
from apd_jax.progress import terminal_progress

DEFAULT_BATCH_SIZE = 32  # past batch 16-32 a 7B drafter's pass is compute-bound: larger batches gain nothing


def record(index: int, prompt: str, result: GenerationResult, row: int, decode: Callable[[list[int]], str]) -> dict:
    """One output line: the prompt, its text and ids, and what the decoder did for it."""
    ids = result.sequences()[row]
    counts = result.accepted_per_pass(row)
    return {"index": index, "prompt": prompt, "text": decode(ids), "ids": ids, "passes": len(counts),
            "accepted_per_pass": counts, "stopped_at_eos": bool(result.stopped_at_eos[row])}


def completed_records(output: Path, prompts: Sequence[str]) -> int:
    """How many leading prompts `output` (a file this function's caller wrote) already holds.

    A last line cut short by an interruption is removed from the file; a record that does
    not belong to these prompts is an error, so a resumed run never mixes two inputs.
    """
    done, keep = 0, 0
    with output.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if line.endswith(b"\n"):
                    raise ValueError(f"{output}: line {done + 1} is not JSON; it is not an apd-jax output file, "
                                     "or was edited: pass another --output") from None
                break  # the half-written last line of an interrupted run
            if not line.endswith(b"\n"):
                break  # a whole record whose newline the interruption cut off: written again
            if done >= len(prompts) or rec.get("index") != done or rec.get("prompt") != prompts[done]:
                raise ValueError(f"{output}: record {done} does not match prompt {done} of this input; it was "
                                 "written for other prompts: pass another --output, or drop --resume")
            done, keep = done + 1, keep + len(line)
    if keep < output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(keep)
    return done


def padded_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int, start: int = 0
                   ) -> list[tuple[range, list[list[int]]]]:
    """(prompt indices, rows) of each batch from prompt `start` on, every batch of one shape: the rows
    of the last one filled up with copies of its first prompt (their results are to be dropped)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    n = len(prompt_ids)
    size = min(batch_size, max(n - start, 1))
    out = []
    for first in range(start, n, size):
        idx = range(first, min(first + size, n))
        rows = [list(prompt_ids[i]) for i in idx]
        out.append((idx, rows + [rows[0]] * (size - len(rows))))
    return out


def generate_in_batches(
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    generate: Callable[[list[list[int]], int], GenerationResult],
    decode: Callable[[list[int]], str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    output: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_batch: Callable[[list[dict], GenerationResult], Any] | None = None,
) -> list[dict]:
    """Decode every prompt, batch_size at a time; the records of the prompts decoded in this call.

    `generate(rows, first)` maps a list of batch_size id lists, the first of them prompt number
    `first`, to a GenerationResult (a sampling decoder can derive the batch's key from `first`,
    so a resumed run draws what an uninterrupted one would). With `output`, records
    are appended to it as JSON lines; the file must not exist unless `resume` is set.
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} id lists")
    start = 0
    if output is not None:
        output = Path(output).expanduser()
        if output.is_dir():
            raise ValueError(f"--output {output} is a directory: give a .jsonl file name")
        if output.exists() and not resume:
            raise FileExistsError(f"--output {output} exists: pass --resume to continue it, or choose another file")
        if not output.parent.is_dir():
            raise FileNotFoundError(f"--output {output}: directory {output.parent} does not exist")
        if output.exists():
            start = completed_records(output, prompts)
    records: list[dict] = []
    with _progress(len(prompts), start, enabled=progress) as advance:
        for idx, rows in padded_batches(prompt_ids, batch_size, start):
            result = generate(rows, idx[0])
            new = [record(i, prompts[i], result, r, decode) for r, i in enumerate(idx)]
            if output is not None:
                with output.open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(rec) + "\n" for rec in new)
                    f.flush()
                    os.fsync(f.fileno())
            records.extend(new)
            if on_batch is not None:
                on_batch(new, result)
            advance(len(new))
    return records


def _progress(total: int, done: int, enabled: bool) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """A progress bar over prompts on a terminal, when there is more than one."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

    columns = ("prompts", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return terminal_progress(columns, "decode", total, show=enabled and total > 1, completed=done)


def generate_batched(
    generate: Callable[[list[list[int]]], GenerationResult], prompt_ids: Sequence[Sequence[int]], batch_size: int
) -> GenerationResult:
    """One GenerationResult for every prompt, decoded batch_size at a time in one shape (the last
    batch filled up with copies of its first prompt, whose rows are dropped); `passes` is the sum
    over the batches, the loop iterations run in all."""
    parts = [(generate(rows), len(idx)) for idx, rows in padded_batches(prompt_ids, batch_size)]
    width = max(r.accepted.shape[1] for r, _ in parts)  # passes the longest batch ran
    cat = lambda field: np.concatenate([getattr(r, field)[:n] for r, n in parts])  # noqa: E731
    accepted = np.concatenate([np.pad(r.accepted[:n], ((0, 0), (0, width - r.accepted.shape[1]))) for r, n in parts])
    return GenerationResult(cat("tokens"), cat("lengths"), accepted, cat("stopped_at_eos"),
                            sum(r.passes for r, _ in parts))
