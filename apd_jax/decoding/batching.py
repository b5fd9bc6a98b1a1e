"""Prompts of any number, decoded and written as they finish.

Two ways to run them: continuous batching (`generate_continuously`: S slots, each taking the next
prompt as its row ends, for the decoders with steps over per-row state) and fixed-size batches
(`generate_in_batches`: every batch of one shape, the last filled with copies of its first prompt,
whose results are dropped, so a run compiles once per prompt-length bucket). With an output file F,
each prompt's record (one JSON object a line, carrying its prompt's index) is appended as it
finishes: in the order rows end under continuous batching, in input order in batches. An
interrupted run keeps what it finished. The run is recorded beside F in F + RUN_SUFFIX before any
model loads: run id, apd_jax version, the prompts' count and digest, and the settings that
determine the records.

A new run refuses an existing F or run record, creates both before any work and removes them if it
ends before its first record. A resumed run continues only an F with its run record and the same
settings (each difference named), and decodes the prompts whose records F does not hold (the set
of indices it holds, in any order); it drops bytes after the last newline only when they start a
record still to come, and refuses any other line (one that is no record of this input, or a
record twice), leaving F as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar


from apd_jax.decoding import continuous
from apd_jax.decoding.continuous import Finished, Request, Slots, Usage
from apd_jax.decoding.generation import GenerationResult
from apd_jax.utils.progress import terminal_progress
from apd_jax.utils.runtime import package_version

DEFAULT_BATCH_SIZE = 32  # past batch 16-32 a 7B drafter's pass is compute-bound: larger batches gain nothing
RUN_SUFFIX = ".apd-jax-run.json"  # the run record beside an output file
T = TypeVar("T")


def record(index: int, prompt: str, result: GenerationResult, row: int, decode: Callable[[list[int]], str]) -> dict:
    """One output line: the prompt, its text and ids, and what the decoder did for it."""
    ids = result.tokens[row, : result.lengths[row]].tolist()
    return finished_record(Finished(index, ids, result.accepted_per_pass(row), bool(result.stopped_at_eos[row])),
                           prompt, decode)


def finished_record(f: Finished, prompt: str, decode: Callable[[list[int]], str]) -> dict:
    """One output line of a finished row: index and prompt first (`record_start`), its text and ids, and
    what the decoder did for it."""
    return {"index": f.index, "prompt": prompt, "text": decode(f.ids), "ids": f.ids, "passes": len(f.accepted),
            "accepted_per_pass": f.accepted, "stopped_at_eos": f.stopped_at_eos}


def record_start(index: int, prompt: str) -> bytes:
    """How record `index` begins in an output file: `record` puts index and prompt first, and json.dumps
    writes them the same way every time."""
    return json.dumps({"index": index, "prompt": prompt})[:-1].encode()


def run_record_path(output: Path) -> Path:
    """The run record beside `output`."""
    return output.with_name(output.name + RUN_SUFFIX)


def run_identity(prompts: Sequence[str], settings: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it continues, as JSON values."""
    digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    return json.loads(json.dumps({"apd_jax": package_version() or "unknown", "prompts": len(prompts), "prompts_sha256": digest,
                                  **settings}))


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'NAME RECORDED (now NOW)' for each setting that differs."""
    shown = lambda d, k: json.dumps(d[k]) if k in d else "unset"  # noqa: E731
    return [f"{k} {shown(recorded, k)} (now {shown(now, k)})" for k in sorted(recorded.keys() | now.keys())
            if recorded.get(k, ...) != now.get(k, ...)]


def completed_records(output: Path, prompts: Sequence[str]) -> tuple[frozenset[int], int]:
    """(indices, bytes): the prompts whose records `output` already holds, and the bytes those lines take.

    Bytes after the last newline count as a record cut by an interruption only when they are the start of
    a record still to come or begin with one; anything else, and a complete line that is not a record of
    these prompts (or repeats one), is an error: the file holds what this run did not write.
    """
    done: set[int] = set()
    keep = 0
    with output.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                if any(_starts_record(line, i, prompts[i]) for i in range(len(prompts)) if i not in done):
                    break  # a record an interruption cut short (or cut its newline off): written again
                raise ValueError(f"{output}: line {number} ({line[:40].decode(errors='replace')!r}) is not a record "
                                 "of this run; apd-jax leaves the file as it is: remove that line to resume, or "
                                 "choose another --output")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{output}: line {number} is not JSON; it is not an apd-jax output file, "
                                 "or was edited: pass another --output") from None
            index = rec.get("index") if isinstance(rec, dict) else None
            if type(index) is not int or not 0 <= index < len(prompts) or rec.get("prompt") != prompts[index]:
                what = f": record {index} does not match prompt {index}" if type(index) is int else " is not a record"
                raise ValueError(f"{output}: line {number}{what} of this input; it was written for other prompts or "
                                 "edited: choose another --output")
            if index in done:
                raise ValueError(f"{output}: line {number} repeats record {index}; the file was edited: choose "
                                 "another --output")
            done.add(index)
            keep += len(line)
    return frozenset(done), keep


def _starts_record(line: bytes, index: int, prompt: str) -> bool:
    """Whether `line` is the start of record `index`, or a record that begins as it does (its newline cut)."""
    head = record_start(index, prompt)
    return head.startswith(line) or line.startswith(head)


@dataclasses.dataclass
class RunOutput:
    """The output file of a run: records are appended to it; used as a context manager, a run that
    ends by an exception before its first record removes the files it created."""

    path: Path
    done: frozenset[int]  # the prompts whose records the file held when the run opened it
    created: bool  # this run created the file and its run record
    written: int = 0  # records this run appended

    def append(self, records: Sequence[dict]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in records))
            f.flush()
            os.fsync(f.fileno())
        self.written += len(records)

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if kind is not None and self.created and self.written == 0:
            self.path.unlink(missing_ok=True)
            run_record_path(self.path).unlink(missing_ok=True)


def open_output(output: Path, prompts: Sequence[str], settings: dict[str, Any], *, resume: bool) -> RunOutput:
    """The output file of a run of `prompts` with `settings` (JSON values), checked before any work: a new
    run creates it and its run record, a resumed one checks both against this run (module docstring)."""
    output = Path(output)
    recorded_at = run_record_path(output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory: give a .jsonl file name")
    if output.parent.exists() and not output.parent.is_dir():
        raise NotADirectoryError(f"--output {output}: {output.parent} is a file, not a directory")
    if not output.parent.exists():
        raise FileNotFoundError(f"--output {output}: directory {output.parent} does not exist")
    identity = run_identity(prompts, settings)
    if resume:
        return _reopen(output, prompts, identity)
    if output.exists():
        if recorded_at.exists():
            raise FileExistsError(f"--output {output} exists: pass --resume to continue it, or choose another file")
        raise FileExistsError(f"--output {output} exists, and it was not written by apd-jax generate: choose "
                              "another file")
    if recorded_at.exists():
        raise FileExistsError(f"--output {output}: {recorded_at} exists (the record of a run whose output was "
                              "removed): remove it, or choose another file")
    try:
        _create(output, "")  # an unwritable place fails here, before any work
    except OSError as err:
        raise PermissionError(f"--output {output} cannot be created ({err.strerror or err}); choose another "
                              "place") from None
    try:
        _create(recorded_at, json.dumps({"run": uuid.uuid4().hex, **identity}, indent=1) + "\n")
    except BaseException:
        output.unlink()
        raise
    return RunOutput(output, done=frozenset(), created=True)


def _create(path: Path, text: str) -> None:
    """A new file holding `text`; one whose write fails is removed."""
    f = path.open("x", encoding="utf-8")
    try:
        with f:
            f.write(text)
    except BaseException:
        path.unlink()
        raise


def _reopen(output: Path, prompts: Sequence[str], identity: dict[str, Any]) -> RunOutput:
    """An output to resume: its run record matches this run, its records these prompts; a cut last record
    is removed."""
    recorded_at = run_record_path(output)
    if not output.is_file():
        raise FileNotFoundError(f"--resume: --output {output} does not exist; drop --resume to start the run")
    if not recorded_at.is_file():
        raise ValueError(f"--resume: {output} was not written by apd-jax generate (no {recorded_at.name} beside "
                         "it); choose another --output")
    try:
        recorded = json.loads(recorded_at.read_text(encoding="utf-8"))
        recorded.pop("run")
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"--resume: {recorded_at} is not an apd-jax run record; choose another --output") from None
    changed = differences(recorded, identity)
    if changed:
        raise ValueError(f"--resume: {output} was written with other settings: {'; '.join(changed)}; resume with "
                         "the settings it was written with, or choose another --output")
    done, keep = completed_records(output, prompts)
    with output.open("r+b") as f:  # opened for writing before any work, even when there is nothing to cut
        f.truncate(keep)
    return RunOutput(output, done=done, created=False)


def kept_records(output: Path) -> tuple[int, int] | None:
    """(complete records, prompts) of the run recorded beside `output`; None when there is none."""
    recorded_at = run_record_path(output)
    try:
        prompts = json.loads(recorded_at.read_text(encoding="utf-8"))["prompts"]
        with output.open("rb") as f:
            return sum(line.endswith(b"\n") for line in f), prompts
    except (OSError, ValueError, KeyError, TypeError):
        return None


def padded_batches(items: Sequence[T], batch_size: int, start: int = 0, *, lengths: Sequence[int] | None = None
                   ) -> list[tuple[list[int], list[T]]]:
    """(item indices, items) of each batch from item `start` on, every batch of one size (batch_size, or
    the items left when fewer): the last one filled up with copies of its first item, whose results are
    to be dropped. With `lengths`, items go longest first, so a batch's rows pad to similar lengths.

    The one fixed-shape batching of apd_jax: one compiled shape serves every batch of a call.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    order = list(range(start, len(items)))
    if lengths is not None:
        order.sort(key=lambda i: -lengths[i])
    size = min(batch_size, max(len(order), 1))
    out = []
    for first in range(0, len(order), size):
        idx = order[first : first + size]
        rows = [items[i] for i in idx]
        out.append((idx, rows + [rows[0]] * (size - len(rows))))
    return out


def generate_in_batches(
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    generate: Callable[[list[list[int]], int], GenerationResult],
    decode: Callable[[list[int]], str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    output: RunOutput | None = None,
    progress: bool = True,
    on_batch: Callable[[list[dict], GenerationResult], Any] | None = None,
) -> list[dict]:
    """Decode every prompt, batch_size at a time; the records of the prompts decoded in this call.

    `generate(rows, first)` maps a list of batch_size id lists, the first of them prompt number
    `first`, to a GenerationResult (a sampling decoder can derive the batch's key from `first`,
    so a resumed run draws what an uninterrupted one would). With `output` (from open_output),
    the prompts whose records it does not hold are decoded and their records appended to it.
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} id lists")
    done = frozenset() if output is None else output.done
    pending = [i for i in range(len(prompts)) if i not in done]
    records: list[dict] = []
    with _progress(len(prompts), len(done), enabled=progress) as advance:
        for places, rows in padded_batches([prompt_ids[i] for i in pending], batch_size):
            idx = [pending[p] for p in places]
            result = generate([list(r) for r in rows], idx[0])
            new = [record(i, prompts[i], result, r, decode) for r, i in enumerate(idx)]
            if output is not None:
                output.append(new)
            records.extend(new)
            if on_batch is not None:
                on_batch(new, result)
            advance(len(new))
    return records


def generate_continuously(
    prompts: Sequence[str],
    requests: Sequence[Request],
    slots: Slots,
    key: Any,
    decode: Callable[[list[int]], str],
    *,
    output: RunOutput | None = None,
    progress: bool = True,
    on_records: Callable[[list[dict]], Any] | None = None,
) -> tuple[list[dict], Usage]:
    """Decode every request through the slots (continuous batching, `continuous.decode`); the records of
    the prompts decoded in this call, in the order they finished, and the run's slot usage.

    requests[i] is prompt i (`index` i); each request's noise comes from its seed or from fold_in(key, i),
    so a resumed run draws what an uninterrupted one would. With `output`, the prompts whose records it
    does not hold are decoded and each round's records appended to it as they finish.
    """
    if len(prompts) != len(requests):
        raise ValueError(f"{len(prompts)} prompts but {len(requests)} requests")
    done = frozenset() if output is None else output.done
    records: list[dict] = []
    with _progress(len(prompts), len(done), enabled=progress) as advance:
        def finished(ended: list[Finished]) -> None:
            new = [finished_record(f, prompts[f.index], decode) for f in ended]
            if output is not None and new:
                output.append(new)
            records.extend(new)
            if on_records is not None:
                on_records(new)
            advance(len(new))

        usage = continuous.decode(slots, [r for r in requests if r.index not in done], key, finished)
    return records, usage


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
    return GenerationResult.concatenate([generate(rows).first(len(idx))
                                         for idx, rows in padded_batches(prompt_ids, batch_size)])
