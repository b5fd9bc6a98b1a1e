"""Every decoder on the same models and prompts: passes per token, agreement, speed.

With a verifier (APD's pair), agreement is measured against the drafter's two full-step greedy
outputs, one token per pass: left to right (Dream K=1), which APD and Dream K=k approach, and
most confident first over the whole canvas, which the threshold and Learn2PD decoders approach
(the Learn2PD oracle's answer). Without one, the drafter's own decoders run: a Dream drafter's
are those rows but APD and the verifier alone; a LLaDA drafter's are LLaDA's generate, the
threshold and Learn2PD, measured against the first row. The block rows decode the answer in blocks left to right with
each of Fast-dLLM's KV caches (none, prefix, dual): on Dream, Fast-dLLM's Dream rule (the
threshold and Learn2PD rules take no cache on a shifted family, blocks.cached.check_cacheable);
on LLaDA, LLaDA's rule, the threshold and Learn2PD. Speeds are taken on a second call, after
compilation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.apd_rule import shared_vocab_size
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE, generate_batched
from apd_jax.decoding.blocks.cached import CACHE_MODES
from apd_jax.decoding.registry import Decoder, Models, decoder
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.decoding.generation import DecoderConfig, GenerationResult
from apd_jax.decoding.learn2pd import Filter, Learn2PDConfig
from apd_jax.models.config import ModelConfig
from apd_jax.models.llada import LLADA
from apd_jax.models.model import Transformer, token_logprobs


@dataclasses.dataclass
class Comparison:
    decoder: str
    passes_per_token: float
    agreements: dict[str, float]  # reference (as the table's header names it) -> fraction of its tokens reproduced
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
PAIR_REFERENCES = {"K=1": LEFT_TO_RIGHT, "most confident first": CONFIDENT_FIRST}
FIRST_ROW = "the first row"  # the reference of a drafter compared alone

Run = tuple[str, str, dict[str, Any]]  # (row label, decoder name, its settings)


def _blocks(block_length: int | None, n: int) -> str:
    return "one block" if block_length in (None, n) else f"blocks of {block_length}"


def _cache(cache: str) -> str:
    return "no cache" if cache == "none" else f"{cache} cache"


def block_runs(n: int, threshold: float, learn2pd: bool, *, llada: bool, block_length: int | None = None,
               caches: Sequence[str] = CACHE_MODES) -> list[Run]:
    """The block decoders' rows, one per cache in `caches` (prefix left out beside dual when one block
    spans the answer: the same passes). On a LLaDA drafter: LLaDA's generate at one token per step
    (uncached first: the reference), the threshold and Learn2PD with End-of-Text. On a Dream drafter:
    Fast-dLLM's Dream at `threshold`, and, with blocks shorter than the answer, the threshold and
    Learn2PD in blocks without a cache (the only cache mode their rules take on Dream)."""
    blocks = {"max_new_tokens": n, "block_length": block_length}
    where = _blocks(block_length, n)
    if block_length in (None, n) and "dual" in caches:  # one block: the prefix window is the block, as dual's
        caches = [c for c in caches if c != "prefix"]
    eot = Learn2PDConfig.eot_threshold  # the paper's
    parallel = [(f"confidence threshold {threshold}", "threshold", {"threshold": threshold})]
    if learn2pd:
        parallel.append((f"Learn2PD keep > {threshold} + EoT {eot}", "learn2pd",
                         {"keep_threshold": threshold, "eot_threshold": eot}))
    if llada:
        steps = f"LLaDA low-confidence steps={n}, {where}"
        runs = [(f"{steps}, no cache (reference)", "llada", blocks | {"steps": n, "cache": "none"})]
        runs += [(f"{steps}, {_cache(c)}", "llada", blocks | {"steps": n, "cache": c}) for c in caches if c != "none"]
        return runs + [(f"{label}, {where}, {_cache(c)}", name, blocks | values | {"cache": c})
                       for label, name, values in parallel for c in caches]
    runs = [(f"Fast-dLLM Dream threshold {threshold}, {where}, {_cache(c)}", "dream-block",
             blocks | {"threshold": threshold, "cache": c}) for c in caches]
    if block_length not in (None, n) and "none" in caches:
        runs += [(f"{label}, {where}", name, blocks | values) for label, name, values in parallel]
    return runs


def compared_runs(n: int, apd: APDConfig, threshold: float, learn2pd: bool, *, pair: bool = True,
                  llada: bool = False, block_length: int | None = None,
                  caches: Sequence[str] = CACHE_MODES) -> list[Run]:
    """(row label, decoder name, its settings) of every row. On a Dream drafter: Dream K=1/2/4 and APD
    (both with `apd`'s settings), most confident first, Dream's entropy sampler, the threshold, the
    verifier alone, Learn2PD (`learn2pd`), then the block rows (block_runs); APD and the verifier
    only with a verifier (`pair`). On a LLaDA drafter (`llada`): the block rows alone."""
    blocked = block_runs(n, threshold, learn2pd, llada=llada, block_length=block_length, caches=caches)
    if llada:
        return blocked
    same_as_apd = {f.name: getattr(apd, f.name) for f in dataclasses.fields(apd)} | {"max_new_tokens": n}
    whole = {"max_new_tokens": n}
    runs = [
        (LEFT_TO_RIGHT, "leftright", same_as_apd | {"K": 1}),
        ("Dream left-to-right K=2", "leftright", same_as_apd | {"K": 2}),
        ("Dream left-to-right K=4", "leftright", same_as_apd | {"K": 4}),
        (CONFIDENT_FIRST, "threshold", whole | {"threshold": 1.0}),
        (f"Dream steps={n // 2} entropy", "dream", whole | {"steps": n // 2, "alg": "entropy"}),
        (f"confidence threshold {threshold}", "threshold", whole | {"threshold": threshold}),
    ]
    if pair:
        runs += [(f"APD R={apd.R} W={apd.W} M={apd.M}", "apd", same_as_apd), ("AR (verifier alone)", "ar", whole)]
    if learn2pd:
        eot = Learn2PDConfig.eot_threshold  # the paper's
        runs += [
            (f"Learn2PD keep > {threshold}", "learn2pd", whole | {"keep_threshold": threshold, "eot_threshold": None}),
            (f"Learn2PD keep > {threshold} + EoT {eot}", "learn2pd",
             whole | {"keep_threshold": threshold, "eot_threshold": eot}),
        ]
    return runs + blocked


def planned_runs(
    drafter: ModelConfig,
    verifier: ModelConfig | None,
    n: int,
    apd: APDConfig,
    threshold: float,
    learn2pd: bool,
    *,
    block_length: int | None = None,
    caches: Sequence[str] = CACHE_MODES,
) -> tuple[list[tuple[str, Decoder, DecoderConfig]], dict[str, str]]:
    """Each row's label, decoder and checked settings (compared_runs), and the rows agreement is
    measured against (table header -> row label), from the models' configs: every setting and the
    pair are checked here, before any model loads or decodes. A verifier must share the drafter's
    tokenizer (APD's check: a LLaDA drafter with a Qwen2 verifier is refused)."""
    if verifier is not None:
        shared_vocab_size(drafter, verifier)
    elif drafter.causal:
        raise ValueError(f"the drafter is a causal ({drafter.model_type}) model: compare runs a diffusion drafter "
                         "(Dream or LLaDA)")
    llada = drafter.family == LLADA
    runs = compared_runs(n, apd, threshold, learn2pd, pair=verifier is not None, llada=llada,
                         block_length=block_length, caches=caches)
    planned = []
    for label, name, values in runs:
        chosen = decoder(name)
        config = chosen.settings_from(values)
        config.validate()
        planned.append((label, chosen, config))
    return planned, ({FIRST_ROW: runs[0][0]} if llada else PAIR_REFERENCES)


def measure_runs(
    models: Models,
    prompts: list[list[int]],
    runs: Sequence[tuple[str, Decoder, DecoderConfig]],
    references: dict[str, str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: Callable[[str], None] = lambda line: None,
) -> list[Comparison]:
    """Each of `runs` (planned_runs) on `prompts`, timed on a second call, and its agreement with each
    of the `references` (table header -> the label of a row among the runs)."""
    results = {}
    for label, chosen, config in runs:
        results[label] = _timed(lambda: generate_batched(lambda rows: chosen.generate(models, rows, config),
                                                         prompts, batch_size))
        log(f"[{len(results)}/{len(runs)}] {label}: {results[label][1]:.1f} s")
    rows = []
    for label, (result, seconds) in results.items():
        tokens = int(result.lengths.sum())
        rows.append(Comparison(
            decoder=label, passes_per_token=float(result.row_passes().sum()) / max(tokens, 1),
            agreements={header: agreement(result, results[ref][0]) for header, ref in references.items()},
            tokens_per_s=tokens / seconds, tokens=tokens,
        ))
    return rows


def compare_decoders(
    drafter: Transformer,
    verifier: Transformer | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    apd: APDConfig,
    learned: Filter | None = None,
    threshold: float = ThresholdConfig.threshold,
    *,
    block_length: int | None = None,
    caches: Sequence[str] = CACHE_MODES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log: Callable[[str], None] = lambda line: None,
) -> list[Comparison]:
    """Every row of planned_runs on `prompts` (measure_runs). threshold: the confidence threshold
    decoders' and Learn2PD's keep threshold alike (both commit a prediction judged right with
    probability above it). Learn2PD's rows need its filter, `learned`; APD's and the verifier's a
    verifier."""
    runs, references = planned_runs(drafter.cfg, None if verifier is None else verifier.cfg, max_new_tokens, apd,
                                    threshold, learned is not None, block_length=block_length, caches=caches)
    return measure_runs(Models(drafter, verifier, learned), prompts, runs, references, batch_size, log)


def format_table(rows: list[Comparison]) -> str:
    headers = list(rows[0].agreements) if rows else []
    lines = [
        "| decoder | passes per token | " + "".join(f"agreement with {h} | " for h in headers) + "tokens/s | tokens |",
        "| --- " * (4 + len(headers)) + "|",
    ]
    lines += [
        f"| {r.decoder} | {r.passes_per_token:.3f} | " + "".join(f"{a:.3f} | " for a in r.agreements.values())
        + f"{r.tokens_per_s:.1f} | {r.tokens} |"
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
