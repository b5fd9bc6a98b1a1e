"""Chat templates: a ChatML-style template on the embedded pair's tokenizer, rendered by transformers."""

import json
import shutil

import pytest

from apd_jax import ASSETS_DIR
from apd_jax.text.chat import chat_prompt_ids, has_chat_template, messages, stop_token_ids
from apd_jax.checkpoints import load_tokenizer

# Qwen2.5-Instruct's template, reduced to its ChatML frame.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_chat_template(src, dst):
    """A copy of checkpoint directory `src` whose tokenizer carries the ChatML template."""
    shutil.copytree(src, dst)
    cfg_file = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"chat_template": CHATML}))
    return dst


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return load_tokenizer(with_chat_template(ASSETS_DIR / "drafter", tmp_path_factory.mktemp("chat") / "drafter"))


def test_chat_prompt_is_the_rendered_template(chat_tokenizer):
    assert has_chat_template(chat_tokenizer)
    ids = chat_prompt_ids(chat_tokenizer, messages("Write fib.", system="Be brief."))
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite fib.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == chat_tokenizer.encode(text, add_special_tokens=False)
    assert chat_tokenizer.decode(ids) == text


def test_no_template_is_a_clear_error():
    tok = load_tokenizer(ASSETS_DIR / "drafter")
    assert not has_chat_template(tok)
    with pytest.raises(ValueError, match="no chat template.*--no-chat"):
        chat_prompt_ids(tok, messages("hi"))


def test_stop_ids_are_the_declared_ones_then_the_tokenizers(chat_tokenizer):
    assert stop_token_ids((151643, 151645), chat_tokenizer) == (151643, 151645, chat_tokenizer.eos_token_id)
    assert stop_token_ids((chat_tokenizer.eos_token_id,), chat_tokenizer) == (chat_tokenizer.eos_token_id,)
