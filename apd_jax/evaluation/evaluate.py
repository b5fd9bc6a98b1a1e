"""Evaluating an APD pair: GSM8K-style exact match (`apd-jax eval`), and tokens per pass on text prompts.

`evaluate`: from a local JSONL file, generate, extract the final answer, exact match.
Each line is {"question": ..., "answer": ...}; a GSM8K answer ends in "#### <number>",
otherwise the answer's last number is the reference (an answer without one is an error). Predictions are the number after "####"
when the model writes one, else the last number in the generation.

`evaluate_apd`: greedy APD with a saved pair over text prompts (the APD check that
`apd-jax train` runs on held-out prompts of the corpus, apd_jax.text.corpus.apd_eval_prompts).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import jax
from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn

from apd_jax.decoding.apd import APDConfig, apd_generate, shared_vocab_size
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE, generate_batched, padded_batches
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.decoding.generation import capacity, check_prompts
from apd_jax.models.model import Transformer
from apd_jax.utils.progress import terminal_progress

PROMPT = "Question: {question}\nAnswer:"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# What `apd-jax eval` reads, for its error messages.
EXPECTED = "JSONL: one JSON object with 'question' and 'answer' per line"


def load_jsonl(path: str | Path) -> list[dict]:
    """The items of an evaluation file; a file that is not EXPECTED is an error naming it (and its line)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"evaluation file {path} is a directory; expected a file of {EXPECTED}")
    if not path.exists():  # a pipe (`<(cmd)`) or a device is read like a file
        raise FileNotFoundError(f"evaluation file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"evaluation file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start}); expected {EXPECTED}") from None
    items = []
    # Lines end at \n only: a JSON string may hold a form feed or U+2028, which splitlines() would split at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not JSON ({err.msg}); expected {EXPECTED}") from None
        if not isinstance(item, dict) or not {"question", "answer"} <= item.keys():
            raise ValueError(f"{path}:{n} needs the keys 'question' and 'answer'")
        _check_item(item, f"{path}:{n}")
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items; expected {EXPECTED}")
    return items


def _check_item(item: dict, where: str) -> None:
    """A question to ask (text) and an answer with a number to match: an item that cannot be scored is an
    error, not an item counted wrong."""
    question, answer = item["question"], item["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be non-empty text, got {json.dumps(question)[:40]}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or extract_answer(str(answer)) is None:
        raise ValueError(f"{where}: 'answer' {json.dumps(answer)[:40]} holds no number to match (GSM8K style: "
                         "'... #### 42')")


def _normalise(number: str) -> str:
    return number.replace(",", "").rstrip(".").removesuffix(".0")


def extract_answer(text: str) -> str | None:
    """The final answer of a generation or a GSM8K reference: after '####', else the last number."""
    if "####" in text:
        found = _NUMBER.findall(text.split("####", 1)[1])
        return _normalise(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _normalise(found[-1]) if found else None


@dataclasses.dataclass
class EvalReport:
    accuracy: float
    correct: int
    total: int
    tokens_per_s: float
    tokens_per_pass: float


def evaluate(
    drafter: Transformer, verifier: Transformer, tokenizer, items: list[dict], config: APDConfig,
    batch_size: int = DEFAULT_BATCH_SIZE, prompt: str = PROMPT,
) -> EvalReport:
    """Exact match of the extracted answers; items decoded batch_size at a time, in one shape."""
    correct = tokens = passes = 0
    seconds = 0.0
    ids = [tokenizer.encode(prompt.format(question=item["question"])) for item in items]
    context = capacity(config.max_len, drafter.cfg, verifier.cfg)
    # Every item checked before the first is decoded.
    check_prompts(ids, shared_vocab_size(drafter.cfg, verifier.cfg), fits=(config.max_new_tokens, context),
                  sources=[f"evaluation item {n} ({str(item['question'])[:40]!r})" for n, item in enumerate(items, 1)])
    columns = ("items", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with terminal_progress(columns, "evaluate", len(items)) as advance:
        for idx, rows in padded_batches(ids, batch_size):
            start = time.perf_counter()
            result = apd_generate(drafter, verifier, rows, config, jax.random.key(0))
            seconds += time.perf_counter() - start
            for i, seq in zip(idx, result.sequences()):  # the rows filling up the last batch are dropped
                predicted = extract_answer(tokenizer.decode(seq))
                correct += predicted is not None and predicted == extract_answer(str(items[i]["answer"]))
            tokens += int(result.lengths[: len(idx)].sum())
            passes += int(result.row_passes()[: len(idx)].sum())
            advance(len(idx))
    return EvalReport(correct / len(items), correct, len(items), tokens / max(seconds, 1e-9), tokens / max(passes, 1))


def evaluate_apd(
    drafter_dir: str | Path,
    verifier_dir: str | Path,
    prompts: Sequence[str],
    *,
    R: float = APDConfig.R,
    W: int = APDConfig.W,
    M: int = APDConfig.M,
    max_new_tokens: int = 128,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str | None = None,
) -> dict:
    """Greedy APD over text prompts with a saved pair: tokens per pass and samples."""
    if dtype is None and jax.default_backend() == "cpu":
        dtype = "float32"  # XLA:CPU has no bf16 x bf16 -> f32 dot (the output head)
    drafter = load_model(drafter_dir, param_dtype=dtype)
    verifier = load_model(verifier_dir, param_dtype=dtype)
    tok = load_tokenizer(drafter_dir)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg, tok, load_tokenizer(verifier_dir))
    config = APDConfig(R=R, W=W, M=M, max_new_tokens=max_new_tokens, temperature=0.0)
    result = generate_batched(
        lambda rows: apd_generate(drafter, verifier, rows, config, jax.random.key(0), shared_vocab=vocab),
        [tok.encode(p) for p in prompts], batch_size)
    # Generated tokens (up to each row's eos), as GenerationResult counts them; a sample's
    # "accepted" is what each pass accepted, a final pass's tokens after the eos included.
    samples = [{"prompt": p, "completion": tok.decode(ids), "accepted": result.accepted_per_pass(r)}
               for r, (p, ids) in enumerate(zip(prompts, result.sequences()))]
    return {"R": R, "W": W, "M": M, "max_new_tokens": max_new_tokens, "prompts": len(prompts),
            "tokens": int(result.lengths.sum()), "passes": int(result.row_passes().sum()),
            "tokens_per_pass": result.tokens_per_pass(), "samples": samples}
