"""Many prompts, each with its own budget: fixed batches against continuous batching over the same slots.

A workload is N prompts whose budgets (max_new_tokens) are drawn uniformly between two bounds. Every
run decodes it through the same compiled APD steps
(`decoding.continuous`) over S slots:
- **fixed**: S prompts at a time in file order, the next S only once all of them are done (each row
  stops at its own budget or eos and then idles): a fixed batch;
- **sorted**: fixed batches of the prompts sorted by budget, largest first (what a user of fixed
  batches can do when the budgets are known; with real checkpoints rows end at their eos, which
  budgets do not predict);
- **continuous**: a finished row's slot takes the next prompt (largest budget first), refilled a group
  at a time.

Each run after the first of a call gives the share of outputs (and of tokens) equal to the first run's:
under sampling, how far batch invariance holds. Tokens count only what each row generates within its
budget or through its eos. Occupancy is rows that
committed a token over passes x S. Each run is timed after a warm-up run of its first S prompts with
their budgets cut to a few tokens (budgets are traced: this compiles every program the run uses without
decoding a whole batch).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence

import jax
import numpy as np

from apd_jax.decoding.apd import APDConfig, apd_slots
from apd_jax.decoding.continuous import Finished, Request, decode, default_group
from apd_jax.models.model import Transformer


@dataclasses.dataclass
class WorkloadRow:
    name: str  # "fixed ...", "sorted ..." or "continuous ..."
    slots: int
    group: int  # slots refilled at once
    prompts: int
    tokens: int  # generated within each row's budget or through its eos
    seconds: float
    tokens_per_s: float
    passes: int
    ms_per_pass: float
    occupancy: float  # rows that committed a token / (passes x slots)
    compile_s: float  # the warm-up run's time
    # Against the first run of the same call (None for that one): the fraction of prompts whose output is
    # the same, and of token positions (over the longer of the two outputs) that agree.
    same_outputs: float | None = None
    same_tokens: float | None = None


def parse_budgets(text: str) -> tuple[int, int]:
    """'LOW-HIGH': budgets drawn uniformly from [LOW, HIGH]."""
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--budgets {text!r}: expected LOW-HIGH, e.g. 32-512") from None
    if not 1 <= low <= high:
        raise ValueError(f"--budgets {text!r}: need 1 <= LOW <= HIGH")
    return low, high


def draw_budgets(n: int, low: int, high: int, seed: int = 0) -> list[int]:
    """n budgets drawn uniformly from [low, high] (a fixed seed: every run decodes the same workload)."""
    return np.random.default_rng(seed).integers(low, high, size=n, endpoint=True).tolist()


WARMUP_TOKENS = 4  # the warm-up run's budget per row
RUNS = ("fixed", "sorted", "continuous")


def _timed_run(drafter: Transformer, verifier: Transformer, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
               config: APDConfig, size: int, group: int, order: Sequence[int] | None, label: str,
               ) -> tuple[WorkloadRow, dict[int, list[int]]]:
    slots = apd_slots(drafter, verifier, prompts, config, size, group)
    requests = [Request(ids, i, max_new_tokens=b) for i, (ids, b) in enumerate(zip(prompts, budgets))]
    key = jax.random.key(0)
    finished: list[Finished] = []
    start = time.perf_counter()
    warmup = [dataclasses.replace(r, max_new_tokens=min(r.max_new_tokens, WARMUP_TOKENS)) for r in requests[: slots.size]]
    decode(slots, warmup, key, lambda rows: None)  # compiles this run's programs
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    usage = decode(slots, requests, key, lambda rows: _progress(finished, rows, len(requests), start, label), order)
    seconds = time.perf_counter() - start
    tokens = sum(len(f.ids) for f in finished)
    name = f"{label} APD R={config.R} W={config.W} M={config.M}, {slots.size} slots"
    row = WorkloadRow(name, slots.size, slots.group, len(requests), tokens, seconds, tokens / seconds, usage.passes,
                      1e3 * seconds / max(usage.passes, 1), usage.occupancy, compile_s)
    return row, {f.index: f.ids for f in finished}


def _progress(finished: list[Finished], rows: list[Finished], total: int, start: float, label: str) -> None:
    """Collect finished rows; print a line at each tenth of the prompts done (a long run shows its pace)."""
    before = len(finished) * 10 // total
    finished.extend(rows)
    if len(finished) * 10 // total > before:
        print(f"  {label}: {len(finished)}/{total} prompts done, {time.perf_counter() - start:.0f} s", flush=True)


def bench_workload(drafter: Transformer, verifier: Transformer, prompts: Sequence[Sequence[int]], budgets: Sequence[int],
                   config: APDConfig, size: int, run: str, group: int | None = None,
                   ) -> tuple[WorkloadRow, dict[int, list[int]]]:
    """One run (`RUNS`) of the prompts and their budgets over `size` slots (config.max_new_tokens: at
    least the largest budget), and each prompt's output by index; the continuous run refills `group`
    slots at once (None: continuous.default_group)."""
    group = group or default_group(size) if run == "continuous" else size
    order = range(len(prompts)) if run == "fixed" else None  # None: continuous.refill_order, largest budget first
    return _timed_run(drafter, verifier, prompts, budgets, config, size, group, order, run)


def agreement(row: WorkloadRow, outputs: dict[int, list[int]], first: dict[int, list[int]]) -> WorkloadRow:
    """`row` with its outputs compared with the first run's (same_outputs, same_tokens): the runs put each
    prompt in other slots beside other rows, so under sampling this is how far batch invariance holds
    (exact in float32 on CPU; on a GPU in bf16, kernels may round differently by shape)."""
    same = sum(outputs[i] == first[i] for i in first)
    agree = sum(sum(a == b for a, b in zip(outputs[i], first[i])) for i in first)
    positions = sum(max(len(outputs[i]), len(first[i])) for i in first)
    return dataclasses.replace(row, same_outputs=same / len(first), same_tokens=agree / max(positions, 1))


HEADER = (f"{'workload':<46} {'slots':>5} {'group':>5} {'prompts':>7} {'tokens':>7} {'tok/s':>8} {'passes':>6} "
          f"{'ms/pass':>8} {'occupancy':>9} {'compile s':>9}")


def format_row(r: WorkloadRow) -> str:
    line = (f"{r.name:<46} {r.slots:>5} {r.group:>5} {r.prompts:>7} {r.tokens:>7} {r.tokens_per_s:>8.1f} "
            f"{r.passes:>6} {r.ms_per_pass:>8.2f} {r.occupancy:>9.1%} {r.compile_s:>9.1f}")
    if r.same_outputs is None:
        return line
    return (f"{line}\n    against the first run: {r.same_outputs:.1%} of the outputs the same, {r.same_tokens:.1%} of "
            "the tokens")


def to_json(rows: list[WorkloadRow], budgets: dict) -> str:
    return json.dumps({"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                       "jax": jax.__version__, "budgets": budgets,
                       "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
