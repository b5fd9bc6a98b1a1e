"""Chat prompts for instruct checkpoints (Dream-v0-Instruct, Qwen2.5-*-Instruct).

Instruct models expect their chat template around a request, as the published APD demo
applies it (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`): a
bare question fed to them reads as text to continue. The template is the tokenizer's
own (transformers renders it); apd_jax adds nothing to it.
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


def stop_token_ids(declared: Sequence[int], tokenizer: Any) -> tuple[int, ...]:
    """Every id a generation stops at: those the checkpoint declares, then the tokenizer's eos.

    An instruct tokenizer's eos (Qwen2.5-Instruct's <|im_end|>) closes the assistant's turn,
    and a checkpoint's configs may list several (<|endoftext|> and <|im_end|>).
    """
    return merge_ids(tuple(declared), getattr(tokenizer, "eos_token_id", None))
