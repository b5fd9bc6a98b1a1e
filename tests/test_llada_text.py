"""LLaDA-8B-Instruct's tokenizer and chat: a tokenizer of its shape (its special tokens at its ids, its
tokenizer_config fields and chat template) beside its config.json, read through transformers; the
rendered prompt's ids and the stop ids (<|endoftext|> 126081 from the configs, <|eot_id|> 126348 from
the template)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from apd_jax.checkpoints import load_tokenizer
from apd_jax.models.config import ModelConfig, llada_8b_config
from apd_jax.text.chat import chat_prompt_ids, messages, stop_token_ids, turn_end_id

# LLaDA-8B-Instruct's tokenizer_config.json chat_template, verbatim.
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
BOS, EOS, MASK, START_HEADER, END_HEADER, EOT = 126080, 126081, 126336, 126346, 126347, 126348
SPECIALS = {BOS: "<|startoftext|>", EOS: "<|endoftext|>", MASK: "<|mdm_mask|>", START_HEADER: "<|start_header_id|>",
            END_HEADER: "<|end_header_id|>", EOT: "<|eot_id|>"}


def instruct_tokenizer(specials: dict[int, str], size: int, first_byte: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer of LLaDA-8B-Instruct's shape: its special tokens (`specials`, id -> token, with
    <|startoftext|>, <|endoftext|>, <|mdm_mask|>, the header tokens and <|eot_id|>) at the given ids, the byte
    characters from `first_byte` on, every other id below `size` an unused placeholder, LLaDA's chat template."""
    role = {token: i for i, token in specials.items()}
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: first_byte + i for i, c in enumerate(chars)}
    vocab |= {f"<|unused_{i}|>": i for i in range(first_byte + len(chars), size) if i not in specials}
    vocab |= role
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", chat_template=LLADA_TEMPLATE)
    tok.add_tokens(["<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    """A checkpoint directory's text side as LLaDA-8B-Instruct ships it: config.json and
    generation_config.json (LLaDA-8B's, as the family writes them) and a byte-level tokenizer with
    LLaDA's special tokens at LLaDA's ids (the ids between are unused placeholders)."""
    path = tmp_path_factory.mktemp("llada_instruct")
    instruct_tokenizer(SPECIALS, EOT + 1).save_pretrained(path)
    config, generation = llada_8b_config().to_hf_dict("bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def llada_tokenizer(llada_dir):
    return load_tokenizer(llada_dir)


def byte_ids(text: str) -> list[int]:
    """The fixture's ids of `text` (no merges): each UTF-8 byte's printable character, by its place in
    the sorted byte-level alphabet."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    return [chars.index(c) for piece, _ in pieces for c in piece]


def test_llada_tokenizer_loads_beside_its_config(llada_tokenizer):
    assert llada_tokenizer.bos_token_id == BOS and llada_tokenizer.eos_token_id == EOS
    assert llada_tokenizer.convert_tokens_to_ids("<|eot_id|>") == EOT
    assert llada_tokenizer.encode("def f", add_special_tokens=False) == byte_ids("def f")


def test_llada_chat_prompt_is_its_template_rendered(llada_tokenizer):
    ids = chat_prompt_ids(llada_tokenizer, messages("  Write fib.\n", system="Be brief."))
    header = lambda role: [START_HEADER, *byte_ids(role), END_HEADER, *byte_ids("\n\n")]  # noqa: E731
    want = ([BOS, *header("system"), *byte_ids("Be brief."), EOT, *header("user"), *byte_ids("Write fib."), EOT]
            + header("assistant"))  # bos once, each turn's content trimmed, then the assistant's header
    assert ids == want
    assert llada_tokenizer.decode(ids).startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nBe")


def test_llada_instruct_stops_at_eos_and_eot(llada_dir, llada_tokenizer):
    cfg = ModelConfig.from_dir(llada_dir)
    assert cfg.eos_token_ids == (EOS,)  # config.json and generation_config.json declare <|endoftext|> only
    assert turn_end_id(llada_tokenizer) == EOT
    assert stop_token_ids(cfg.eos_token_ids, llada_tokenizer) == (EOS, EOT)


def test_no_turn_end_without_a_template_or_a_special_closing_token(llada_dir):
    plain = load_tokenizer(llada_dir)
    plain.chat_template = None
    assert turn_end_id(plain) is None and stop_token_ids((EOS,), plain) == (EOS,)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert turn_end_id(plain) is None  # a turn that ends in a newline names no stop token
