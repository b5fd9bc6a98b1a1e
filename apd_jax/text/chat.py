"""Chat prompts for instruct checkpoints (Dream-v0-Instruct, Qwen2.5-*-Instruct, LLaDA-8B-Instruct).

Instruct models expect their chat template around a request, as the published APD demo
applies it (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`): a
bare question fed to them reads as text to continue. The template is the tokenizer's
own (transformers renders it); apd_jax adds nothing to it. A reply ends at the special token
that closes a turn in that template (ChatML's <|im_end|>, LLaDA's and Llama 3's <|eot_id|>),
which is not always the tokenizer's eos (LLaDA-8B-Instruct's is <|endoftext|>).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apd_jax.text.tokenizer import merge_ids

Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages(prompt: str, system: str | None = None) -> list[Message]:
    """One user turn, after a system turn when `system` is given."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    return turns + [{"role": "user", "content": prompt}]


def chat_prompt_ids(tokenizer: Any, conversation: Sequence[Message]) -> list[int]:
    """The ids of `conversation` in the tokenizer's chat template, ending where the assistant's reply starts."""
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template (no chat_template in its "
            "tokenizer_config.json / chat_template.jinja): pass the prompt as plain text (--no-chat)"
        )
    return list(tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def turn_end_id(tokenizer: Any) -> int | None:
    """The special token that closes the assistant's turn in the tokenizer's chat template, or None
    (no template, or a turn that ends in plain text).

    Read from the template itself: an exchange rendered as text, and the first token after the
    assistant's words, when it is a special token (ChatML's <|im_end|>, LLaDA's <|eot_id|>).
    """
    from jinja2.exceptions import TemplateError

    if not has_chat_template(tokenizer):
        return None
    reply = "apd_jax reply"
    try:
        exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(exchange, tokenize=False)
    except TemplateError:  # a template that cannot render a plain exchange names no turn end
        return None
    end = text.rfind(reply)
    after = tokenizer.encode(text[end + len(reply):], add_special_tokens=False) if end >= 0 else []
    special = getattr(tokenizer, "added_tokens_decoder", {})
    return after[0] if after and after[0] in special and special[after[0]].special else None


def stop_token_ids(declared: Sequence[int], tokenizer: Any) -> tuple[int, ...]:
    """Every id a generation stops at: those the checkpoint declares, the tokenizer's eos, then the
    token that ends an assistant turn in its chat template (turn_end_id).

    An instruct model closes its reply with that token: Qwen2.5-Instruct's eos is it already
    (<|im_end|>); LLaDA-8B-Instruct declares <|endoftext|> (126081) in config.json and as its
    tokenizer's eos, and ends a turn with <|eot_id|> (126348).
    """
    return merge_ids(tuple(declared), getattr(tokenizer, "eos_token_id", None), turn_end_id(tokenizer))
