"""Every decoder on the same models and prompts: passes per token, agreement, speed.

Agreement is measured against the drafter's two full-step greedy outputs, one token
per pass: left to right (Dream K=1), which APD and Dream K=k approach, and most
confident first over the whole canvas, which the threshold and Learn2PD decoders
approach (the Learn2PD oracle's answer). Speeds are taken on a second call, after
compilation.
"""

from __future__ import annotations

import dataclasses
import functools
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
    agreement: float  # fraction of Dream K=1's tokens reproduced at the same position
    agreement_confident: float  # the same against most-confident-first, one token per pass
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


# The two full-step greedy outputs (one token per pass) that agreement is measured against.
LEFT_TO_RIGHT = "Dream left-to-right K=1 (reference)"
CONFIDENT_FIRST = "most confident first, one per pass (reference)"


def compare_decoders(
    drafter: Qwen2,
    verifier: Qwen2,
    prompts: list[list[int]],
    max_new_tokens: int,
    apd: APDConfig,
    filter: Filter | None = None,
    threshold: float = 0.9,
) -> list[Comparison]:
    """threshold: the confidence threshold decoder's and Learn2PD's keep threshold alike
    (both commit a prediction judged right with probability above it)."""
    n = max_new_tokens
    lr = dataclasses.replace(apd, max_new_tokens=n)
    runs: list[tuple[str, Callable[[], GenerationResult]]] = [
        (LEFT_TO_RIGHT, lambda: leftright_generate(drafter, prompts, 1, lr)),
        ("Dream left-to-right K=2", lambda: leftright_generate(drafter, prompts, 2, lr)),
        ("Dream left-to-right K=4", lambda: leftright_generate(drafter, prompts, 4, lr)),
        (CONFIDENT_FIRST, lambda: threshold_generate(
            drafter, prompts, ThresholdConfig(max_new_tokens=n, threshold=1.0))),
        (f"Dream steps={n // 2} entropy", lambda: diffusion_generate(
            drafter, prompts, DiffusionConfig(max_new_tokens=n, steps=n // 2, alg="entropy"))),
        (f"confidence threshold {threshold}", lambda: threshold_generate(
            drafter, prompts, ThresholdConfig(max_new_tokens=n, threshold=threshold))),
        (f"APD R={apd.R} W={apd.W} M={apd.M}", lambda: apd_generate(drafter, verifier, prompts, lr)),
        ("AR (verifier alone)", lambda: ar_generate(verifier, prompts, ARConfig(max_new_tokens=n))),
    ]
    if filter is not None:
        learn2pd = functools.partial(learn2pd_generate, drafter, filter, prompts)
        runs += [
            (f"Learn2PD keep > {threshold}", lambda: learn2pd(
                Learn2PDConfig(max_new_tokens=n, keep_threshold=threshold, eot_threshold=None))),
            (f"Learn2PD keep > {threshold} + EoT 0.9", lambda: learn2pd(
                Learn2PDConfig(max_new_tokens=n, keep_threshold=threshold, eot_threshold=0.9))),
        ]
    results = {name: _timed(run) for name, run in runs}
    leftright, confident = results[LEFT_TO_RIGHT][0], results[CONFIDENT_FIRST][0]
    rows = []
    for name, (result, seconds) in results.items():
        tokens = int(result.lengths.sum())
        rows.append(Comparison(
            decoder=name, passes_per_token=float(result.row_passes().sum()) / max(tokens, 1),
            agreement=agreement(result, leftright), agreement_confident=agreement(result, confident),
            tokens_per_s=tokens / seconds, tokens=tokens,
        ))
    return rows


def format_table(rows: list[Comparison]) -> str:
    lines = [
        "| decoder | passes per token | agreement with K=1 | agreement with most confident first | tokens/s | tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.decoder} | {r.passes_per_token:.3f} | {r.agreement:.3f} | {r.agreement_confident:.3f} "
        f"| {r.tokens_per_s:.1f} | {r.tokens} |"
        for r in rows
    ]
    return "\n".join(lines)

