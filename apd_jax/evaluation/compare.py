"""Every decoder on the same models and prompts: passes per token, agreement, speed.

Agreement is measured against the drafter's two full-step greedy outputs, one token
per pass: left to right (Dream K=1), which APD and Dream K=k approach, and most
confident first over the whole canvas, which the threshold and Learn2PD decoders
approach (the Learn2PD oracle's answer). Speeds are taken on a second call, after
compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE, generate_batched
from apd_jax.decoding.registry import Models, decoder
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.decoding.generation import GenerationResult
from apd_jax.decoding.learn2pd import Filter, Learn2PDConfig
from apd_jax.models.model import Transformer, token_logprobs


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


def compared_runs(n: int, apd: APDConfig, threshold: float, learn2pd: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, decoder name, its settings) of each row; APD and Dream K take `apd`'s settings."""
    same_as_apd = {f.name: getattr(apd, f.name) for f in dataclasses.fields(apd)} | {"max_new_tokens": n}
    whole = {"max_new_tokens": n}
    runs = [
        (LEFT_TO_RIGHT, "leftright", same_as_apd | {"K": 1}),
        ("Dream left-to-right K=2", "leftright", same_as_apd | {"K": 2}),
        ("Dream left-to-right K=4", "leftright", same_as_apd | {"K": 4}),
        (CONFIDENT_FIRST, "threshold", whole | {"threshold": 1.0}),
        (f"Dream steps={n // 2} entropy", "dream", whole | {"steps": n // 2, "alg": "entropy"}),
        (f"confidence threshold {threshold}", "threshold", whole | {"threshold": threshold}),
        (f"APD R={apd.R} W={apd.W} M={apd.M}", "apd", same_as_apd),
        ("AR (verifier alone)", "ar", whole),
    ]
    if learn2pd:
        eot = Learn2PDConfig.eot_threshold  # the paper's
        runs += [
            (f"Learn2PD keep > {threshold}", "learn2pd", whole | {"keep_threshold": threshold, "eot_threshold": None}),
            (f"Learn2PD keep > {threshold} + EoT {eot}", "learn2pd",
             whole | {"keep_threshold": threshold, "eot_threshold": eot}),
        ]
    return runs


def compare_decoders(
    drafter: Transformer,
    verifier: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    apd: APDConfig,
    learned: Filter | None = None,
    threshold: float = ThresholdConfig.threshold,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: Callable[[str], None] = lambda line: None,
) -> list[Comparison]:
    """threshold: the confidence threshold decoder's and Learn2PD's keep threshold alike
    (both commit a prediction judged right with probability above it). Learn2PD's rows
    need its filter, `learned`."""
    models = Models(drafter, verifier, learned)
    results = {}
    runs = compared_runs(max_new_tokens, apd, threshold, learned is not None)
    for name, decoder_name, values in runs:
        chosen = decoder(decoder_name)
        config = chosen.settings_from(values)
        results[name] = _timed(lambda: generate_batched(lambda rows: chosen.generate(models, rows, config),
                                                        prompts, batch_size))
        log(f"[{len(results)}/{len(runs)}] {name}: {results[name][1]:.1f} s")
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



@dataclasses.dataclass
class LookaheadRow:
    setting: str
    tokens_per_pass: float
    passes_per_token: float
    agreement: float  # position-wise, with the first setting's output (the paper's fixed M)
    verifier_logprob: float  # the verifier's mean log-probability per generated token (nats)
    exact_match: float | None  # completions: the generation starts with the expected completion
    tokens: int


def verifier_logprob(verifier: Transformer, prompts: list[list[int]], result: GenerationResult) -> float:
    """Mean log p_verifier(token | prompt, tokens before it) over every generated token.

    A quality measure that, unlike position-wise agreement, does not punish a shifted but
    equally likely text.
    """
    rows = [p + g for p, g in zip(prompts, result.sequences())]
    width = max(map(len, rows))
    inputs = np.zeros((len(rows), width - 1), np.int32)
    targets = np.zeros_like(inputs)
    scored = np.zeros(inputs.shape, bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        inputs[i, : len(row) - 1], targets[i, : len(row) - 1] = row[:-1], row[1:]
        scored[i, len(p) - 1 : len(row) - 1] = True
    logp, _ = token_logprobs(verifier, jnp.asarray(inputs), jnp.asarray(targets))
    return float(np.asarray(logp)[scored].mean()) if scored.any() else float("nan")


def lookahead_study(
    drafter: Transformer,
    verifier: Transformer,
    prompts: list[list[int]],
    settings: list[APDConfig],
    completions: tuple[list[list[int]], list[str], Callable[[list[int]], str]] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[LookaheadRow]:
    """APD at each of `settings` (the first is the reference, normally the fixed M) on the same prompts.

    completions: (prompt ids, expected completion texts, decode): the share of those prompts whose
    generation starts with its completion, at the same settings.
    """
    models = Models(drafter, verifier)

    def run(ids: list[list[int]], s: APDConfig) -> GenerationResult:
        return generate_batched(lambda rows: decoder("apd").generate(models, rows, s), ids, batch_size)

    results = [run(prompts, s) for s in settings]
    rows = []
    for s, result in zip(settings, results):
        tokens = int(result.lengths.sum())
        exact = None
        if completions is not None:
            ids, expected, decode = completions
            done = run(ids, s)
            exact = float(np.mean([decode(g).startswith(e) for g, e in zip(done.sequences(), expected)]))
        adaptive = "" if s.M_min is None else f" adaptive M_min={s.M_min} x{s.M_scale} +{s.M_margin}"
        rows.append(LookaheadRow(
            setting=f"R={s.R} W={s.W} M={s.M}{adaptive}", tokens_per_pass=result.tokens_per_pass(),
            passes_per_token=float(result.row_passes().sum()) / max(tokens, 1),
            agreement=agreement(result, results[0]), verifier_logprob=verifier_logprob(verifier, prompts, result),
            exact_match=exact, tokens=tokens,
        ))
    return rows


def format_lookahead_table(rows: list[LookaheadRow]) -> str:
    lines = [
        "| APD setting | tokens per pass | passes per token | agreement with the first row | verifier log p per "
        "token | completion exact match | tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.setting} | {r.tokens_per_pass:.2f} | {r.passes_per_token:.3f} | {r.agreement:.3f} "
        f"| {r.verifier_logprob:.3f} | {'-' if r.exact_match is None else f'{r.exact_match:.3f}'} | {r.tokens} |"
        for r in rows
    ]
    return "\n".join(lines)
