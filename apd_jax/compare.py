"""Every decoder on the same models and prompts: passes per token, agreement, speed.

Agreement is measured against the drafter's full-step greedy output: one token per
pass, left to right (Dream K=1), the output the parallel decoders try to reach in
fewer passes. Speeds are taken on a second call, after compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax

from apd_jax.apd import APDConfig, apd_generate, leftright_generate
from apd_jax.autoregressive import ARConfig, ar_generate
from apd_jax.diffusion import DiffusionConfig, ThresholdConfig, diffusion_generate, threshold_generate
from apd_jax.generation import GenerationResult
from apd_jax.learn2pd import Filter, Learn2PDConfig, learn2pd_generate
from apd_jax.model import Qwen2


@dataclasses.dataclass
class Comparison:
    decoder: str
    passes_per_token: float
    agreement: float  # fraction of the reference's tokens reproduced at the same position
    tokens_per_s: float
    tokens: int


def agreement(result: GenerationResult, reference: GenerationResult) -> float:
    """Position-wise agreement with the reference over the reference's tokens."""
    same = total = 0
    for ours, ref in zip(result.sequences(), reference.sequences()):
        total += len(ref)
        same += sum(a == b for a, b in zip(ours, ref))
    return same / max(total, 1)


def _timed(run: Callable[[], GenerationResult]) -> tuple[GenerationResult, float]:
    jax.block_until_ready(run().tokens)  # compile
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def compare_decoders(
    drafter: Qwen2,
    verifier: Qwen2,
    prompts: list[list[int]],
    max_new_tokens: int,
    apd: APDConfig,
    filter: Filter | None = None,
) -> list[Comparison]:
    n = max_new_tokens
    lr = dataclasses.replace(apd, max_new_tokens=n)
    runs: list[tuple[str, Callable[[], GenerationResult]]] = [
        ("Dream left-to-right K=1 (reference)", lambda: leftright_generate(drafter, prompts, 1, lr)),
        ("Dream left-to-right K=2", lambda: leftright_generate(drafter, prompts, 2, lr)),
        ("Dream left-to-right K=4", lambda: leftright_generate(drafter, prompts, 4, lr)),
        (f"Dream steps={n // 2} entropy", lambda: diffusion_generate(
            drafter, prompts, DiffusionConfig(max_new_tokens=n, steps=n // 2, alg="entropy"))),
        ("confidence threshold 0.9", lambda: threshold_generate(
            drafter, prompts, ThresholdConfig(max_new_tokens=n, threshold=0.9))),
        (f"APD R={apd.R} W={apd.W} M={apd.M}", lambda: apd_generate(drafter, verifier, prompts, lr)),
        ("AR (verifier alone)", lambda: ar_generate(verifier, prompts, ARConfig(max_new_tokens=n))),
    ]
    if filter is not None:
        runs += [
            ("Learn2PD", lambda: learn2pd_generate(
                drafter, filter, prompts, Learn2PDConfig(max_new_tokens=n, eot_threshold=None))),
            ("Learn2PD + EoT", lambda: learn2pd_generate(
                drafter, filter, prompts, Learn2PDConfig(max_new_tokens=n, eot_threshold=0.9))),
        ]
    rows, reference = [], None
    for name, run in runs:
        result, seconds = _timed(run)
        reference = reference or result
        tokens = int(result.lengths.sum())
        rows.append(Comparison(
            decoder=name, passes_per_token=float(result.row_passes().sum()) / max(tokens, 1),
            agreement=agreement(result, reference), tokens_per_s=tokens / seconds, tokens=tokens,
        ))
    return rows


def format_table(rows: list[Comparison]) -> str:
    lines = ["| decoder | passes per token | agreement with K=1 greedy | tokens/s | tokens |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r.decoder} | {r.passes_per_token:.3f} | {r.agreement:.3f} | {r.tokens_per_s:.1f} | {r.tokens} |"
        for r in rows
    ]
    return "\n".join(lines)

