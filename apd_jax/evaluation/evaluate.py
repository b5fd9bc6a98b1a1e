"""Evaluating a decoder: GSM8K-style exact match (`apd-jax eval`), and APD's tokens per pass on text prompts.

`evaluate`: from a local JSONL file, generate, extract the final answer, exact match.
Each line is {"question": ..., "answer": ...}; a GSM8K answer ends in "#### <number>",
otherwise the answer's last number is the reference (an answer without one is an error).
Predictions are the number after "####" when the model writes one, else the last number in the
generation. The decoders with steps over per-row state (Decoder.slots: APD, left-to-right, AR, the
block decoders and Learn2PD) decode the items through continuous batching, the others (Dream's own sampler) in fixed
batches; either way each item decodes as it would alone.

`evaluate_apd`: greedy APD with a saved pair over text prompts (the APD check that
`apd-jax train` runs on held-out prompts of the corpus, apd_jax.text.corpus.apd_eval_prompts).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.decoding.apd import APDConfig, apd_generate, shared_vocab_size
from apd_jax.decoding.batching import DEFAULT_BATCH_SIZE, generate_batched, generate_continuously
from apd_jax.decoding.batching import generate_in_batches
from apd_jax.decoding.continuous import Request
from apd_jax.decoding.generation import DecoderConfig, check_prompts
from apd_jax.decoding import registry
from apd_jax.decoding.registry import Decoder, Models
from apd_jax.models.model import Transformer

# The decoders `apd-jax eval` and the lm-eval adapter run: APD and AR on the pair, and the diffusion
# model's own (left-to-right K, and the block decoders: threshold, Fast-dLLM's Dream, LLaDA's, each
# with or without Fast-dLLM's caches). dream (Dream's whole-canvas sampler) and learn2pd (it needs a
# trained filter) are `apd-jax generate`'s and `compare`'s.
EVAL_DECODERS = ("apd", "leftright", "ar", "threshold", "dream-block", "llada")

def decode_all(chosen: Decoder, models: Models, config: DecoderConfig, texts: Sequence[str],
               ids: Sequence[Sequence[int]], size: int, key: jax.Array, decode: Callable[[list[int]], str], *,
               continuous: bool = True) -> list[dict]:
    """Every prompt's record (batching.finished_record: text, ids, passes), in input order. A decoder with
    slots (Decoder.slots) decodes through `size` slots, each prompt's noise from fold_in(key, its index); the others (or
    continuous=False) `size` prompts at a time in one shape, each batch's from fold_in(key, its first)."""
    if continuous and chosen.slots is not None:
        slots = chosen.slots(models, ids, config, size)
        records, _ = generate_continuously(texts, [Request(p, i) for i, p in enumerate(ids)], slots, key, decode)
    else:
        run = lambda rows, first: chosen.generate(models, rows, config, jax.random.fold_in(key, first))  # noqa: E731
        records = generate_in_batches(texts, ids, run, decode, batch_size=size)
    return sorted(records, key=lambda r: r["index"])


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
    generations: list[list[int]]  # each item's generated ids (through its eos), in item order


def evaluate(
    drafter: Transformer | None, verifier: Transformer | None, tokenizer, items: list[dict], config: DecoderConfig,
    batch_size: int = DEFAULT_BATCH_SIZE, prompt: str = PROMPT, *, decoder: str = "apd", continuous: bool = True,
) -> EvalReport:
    """Exact match of the extracted answers, decoded by the registry's `decoder` (one of EVAL_DECODERS, on
    the models it uses; the other may be None) at greedy key 0: through batch_size slots when it has them (Decoder.slots)
    (continuous=False: in fixed batches), else batch_size items at a time in one shape. Generation stops
    at the checkpoint's eos ids and the tokenizer's chat turn end (Decoder.with_stop_ids)."""
    if decoder not in EVAL_DECODERS:
        raise ValueError(f"decoder {decoder!r} is not one eval runs; use one of {EVAL_DECODERS}")
    chosen = registry.decoder(decoder)
    models = Models(drafter, verifier)
    context = chosen.capacity(models, config)  # a model the decoder uses but not given is an error naming it
    if {"drafter", "verifier"} <= set(chosen.uses):
        models = Models(drafter, verifier, shared_vocab=shared_vocab_size(drafter.cfg, verifier.cfg))
    config = chosen.with_stop_ids(config, models, tokenizer)
    questions = [prompt.format(question=item["question"]) for item in items]
    ids = [tokenizer.encode(q) for q in questions]
    # Every item checked before the first is decoded.
    check_prompts(ids, chosen.vocab(models), fits=(config.max_new_tokens, context),
                  sources=[f"evaluation item {n} ({str(item['question'])[:40]!r})" for n, item in enumerate(items, 1)])
    start = time.perf_counter()
    records = decode_all(chosen, models, config, questions, ids, batch_size, jax.random.key(0), tokenizer.decode,
                         continuous=continuous)
    seconds = time.perf_counter() - start
    correct = sum(_matches(r["text"], item["answer"]) for r, item in zip(records, items))
    tokens, passes = sum(len(r["ids"]) for r in records), sum(r["passes"] for r in records)
    return EvalReport(correct / len(items), correct, len(items), tokens / max(seconds, 1e-9), tokens / max(passes, 1),
                      [r["ids"] for r in records])


def _matches(generation: str, answer: str | int | float) -> bool:
    predicted = extract_answer(generation)
    return predicted is not None and predicted == extract_answer(str(answer))


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
