"""`apd-jax eval` and the lm-eval adapter beyond APD: continuous batching in eval (the same outputs as fixed
batches), the block decoders with Fast-dLLM's caches on a LLaDA or Dream drafter with no verifier, and the
adapter's stop ids (the checkpoint's eos and the chat template's turn end, on a tokenizer of LLaDA's shape)."""

import dataclasses
import json
import shutil

import jax
import pytest

from apd_jax import ASSETS_DIR
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.autoregressive import ARConfig
from apd_jax.decoding.blocks import LLaDAConfig
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.decoding.registry import Models, decoder
from apd_jax.evaluation.evaluate import PROMPT, evaluate
from apd_jax.evaluation.harness import APDLM
from conftest import last_error_line, run_cli
from lm_eval.api.instance import Instance
from test_llada_text import instruct_tokenizer

ITEMS = [{"question": q, "answer": f"#### {a}"} for q, a in [
    ("What is 2 + 3?", 5), ("Add 10 and 4, then subtract 6.", 8), ("7 * 1?", 7), ("How many legs have 3 cats?", 12),
    ("What is 9 - 2?", 7), ("Half of 30?", 15), ("A dozen eggs less 5 is how many eggs?", 7)]]


class CharTokenizer:
    """Characters as ids 3..258, inside the tiny models' vocabularies (2 is their eos), and back."""

    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % 256 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if 3 <= i < 259)


def alone(name: str, models: Models, config, tokenizer, items=ITEMS) -> list[list[int]]:
    """Each item's generated ids from the decoder called on all the items at once (each row as alone)."""
    ids = [tokenizer.encode(PROMPT.format(question=item["question"])) for item in items]
    return decoder(name).generate(models, ids, config, jax.random.key(0)).sequences()


@pytest.mark.parametrize("name, config", [("apd", APDConfig(R=0.7, W=3, M=6, max_new_tokens=12)),
                                          ("ar", ARConfig(max_new_tokens=12))])
def test_eval_through_the_slots_equals_fixed_batches(dream, qwen, name, config):
    """7 items through 3 slots (rows refilled as others end) give each item the output fixed batches of 3 give,
    and the same score and tokens per pass; some rows end at an eos, some at their budget."""
    tok = CharTokenizer()
    fixed = lambda c: evaluate(dream, qwen, tok, ITEMS, c, 3, decoder=name, continuous=False)  # noqa: E731
    first = fixed(config).generations[0]
    stop = first[min(5, len(first) - 2)]  # a token written mid-way: the eos (one eos id, as the tiny models')
    config = dataclasses.replace(config, eos_token_ids=(stop,))
    batched, slotted = fixed(config), evaluate(dream, qwen, tok, ITEMS, config, 3, decoder=name)
    assert slotted.generations == batched.generations
    assert (slotted.correct, slotted.tokens_per_pass) == (batched.correct, batched.tokens_per_pass)
    ends = [g[-1] == stop for g in slotted.generations]
    assert any(ends) and not all(ends)


@pytest.fixture(scope="module")
def llada():
    return load_model(ASSETS_DIR / "llada")  # as stored, as `apd-jax eval` loads it: its compiled programs serve both


@pytest.mark.parametrize("name, config, options", [
    ("llada", LLaDAConfig(max_new_tokens=8, block_length=4, cache="dual"), ["--cache", "dual"]),
    ("threshold", ThresholdConfig(max_new_tokens=8, block_length=4, cache="dual", threshold=0.5),
     ["--cache", "dual", "--threshold", "0.5"]),
])
def test_eval_runs_the_block_decoders_on_llada_alone(llada, tmp_path, capsys, name, config, options):
    """No verifier: each item's output through the slots is the fixed decoder's on that item; the command
    runs it too; a verifier given is refused."""
    tok = load_tokenizer(ASSETS_DIR / "llada")
    report = evaluate(llada, None, tok, ITEMS[:3], config, 3, decoder=name)
    assert report.total == 3 and report.generations == alone(name, Models(llada), config, tok, ITEMS[:3])
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in ITEMS[:3]))
    argv = ["eval", str(data), "--decoder", name, "--drafter", str(ASSETS_DIR / "llada"), "--max-new-tokens", "8",
            "--block-length", "4", *options, "--batch-size", "3"]
    assert run_cli(argv) == 0
    assert f"accuracy {report.accuracy:.3f} ({report.correct}/3)" in capsys.readouterr().out
    assert run_cli(argv + ["--verifier", str(ASSETS_DIR / "verifier")]) == 2
    assert last_error_line(capsys).endswith(f"--decoder {name} runs the diffusion model alone (--drafter DIR): drop "
                                            "--verifier")


def test_eval_refuses_a_block_option_with_apd(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps(ITEMS[0]))
    assert run_cli(["eval", str(data), "--block-length", "4"]) == 2
    assert "--decoder apd does not take --block-length" in last_error_line(capsys)


# ----------------------------------------------------------------------------- the lm-eval adapter

EOS, MASK, BOS, START_HEADER, END_HEADER = 0, 1, 2, 3, 4  # the shipped LLaDA model's eos and mask ids first
BYTES = 5  # byte characters from this id on


def llada_instruct(src, dst, eot: int):
    """A copy of LLaDA checkpoint `src` with a tokenizer of LLaDA-8B-Instruct's shape fitted into its 4096 ids:
    LLaDA's special tokens and chat template (its turn ends in <|eot_id|>, at id `eot`), byte-level characters,
    the other ids unused placeholders."""
    dst.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    specials = {EOS: "<|endoftext|>", MASK: "<|mdm_mask|>", BOS: "<|startoftext|>", START_HEADER: "<|start_header_id|>",
                END_HEADER: "<|end_header_id|>", eot: "<|eot_id|>"}
    instruct_tokenizer(specials, 4096, first_byte=BYTES).save_pretrained(dst)
    return dst


CONTEXT = "def fib(n):\n    "
BLOCKS = dict(max_new_tokens=16, block_length=8, cache="dual")


def test_adapter_stops_at_the_chat_templates_turn_end(llada, tmp_path):
    """The adapter's stop ids are the checkpoint's eos and <|eot_id|>, the turn end of its LLaDA-shaped chat
    template: a generation that predicts <|eot_id|> ends there (its text is the filled answer's up to it)."""
    byte_tok = llada_instruct(ASSETS_DIR / "llada", tmp_path / "probe", eot=4095)
    prompt = load_tokenizer(byte_tok).encode(CONTEXT)
    # Two eos ids, as the adapter's (one compiled program); neither is written before <|eot_id|>'s place below.
    filled = alone_ids(llada, prompt, LLaDAConfig(**BLOCKS, eos_token_ids=(EOS, 4095)))
    # <|eot_id|> placed at an id the model writes mid-answer (a placeholder, first seen there, before any eos).
    at = next(k for k in range(3, 12) if filled[k] >= BYTES + 256 and filled[k] not in filled[:k] + [EOS])
    assert EOS not in filled[:at]
    path = llada_instruct(ASSETS_DIR / "llada", tmp_path / "llada", eot=filled[at])
    lm = APDLM(decoder="llada", drafter=str(path), block_length=8, cache="dual")
    assert lm.settings.eos_token_ids == (EOS, filled[at]) and lm.verifier is None
    [text] = lm.generate_until([Instance("generate_until", {}, (CONTEXT, {"until": [], "max_gen_toks": 16}), 0)])
    assert text == lm.tokenizer.decode(filled[: at + 1], skip_special_tokens=True)
    assert text != lm.tokenizer.decode(filled, skip_special_tokens=True)
    with pytest.raises(ValueError, match="decoder=llada runs the diffusion model alone, which scores no loglikelihood"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("def f", "(x)"), 0)])


def alone_ids(model, prompt: list[int], config) -> list[int]:
    return decoder("llada").generate(Models(model), [prompt], config).tokens[0].tolist()


@pytest.mark.parametrize("model_args, message", [
    ("decoder=llada,verifier=/v", r"decoder=llada runs the diffusion model alone \(drafter=DIR\): drop verifier=/v"),
    ("decoder=apd,block_length=8", r"decoder=apd does not take block_length \(threshold decoding's knobs\): leave it "
                                   "out, or use decoder=threshold"),
    ("decoder=llada,R=0.5,cache=dual", r"decoder=llada does not take R \(APD's knobs\)"),
    ("decoder=dream-block,cache=paged", "cache='paged': use one of"),
])
def test_adapter_refuses_what_its_decoder_does_not_take(model_args, message):
    with pytest.raises(ValueError, match=message):
        APDLM.create_from_arg_string(model_args)


def test_adapter_runs_fast_dllm_dream_on_the_drafter_alone():
    lm = APDLM(decoder="dream-block", dtype="float32", batch_size=3, block_length=4, threshold=0.9)
    contexts = ["import os\nimport", "def f(x):\n    return", "class A:\n"]
    texts = lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 8}), i)
                               for i, c in enumerate(contexts)])
    config = dataclasses.replace(lm.settings, max_new_tokens=8)
    ids = [lm.tokenizer.encode(c) for c in contexts]
    want = decoder("dream-block").generate(Models(lm.drafter), ids, config).sequences()
    assert texts == [lm.tokenizer.decode(s, skip_special_tokens=True) for s in want]
    assert lm.get_model_info()["block_length"] == 4 and lm.get_model_info()["verifier"] is None
