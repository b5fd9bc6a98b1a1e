"""The embedded pair's tokenizer: byte-level BPE trained on the corpus, and its special tokens.

`<|endoftext|>` is id 0 (eos and pad) and `<|mask|>` id 1 (the drafter's mask token).
`save_tokenizer` writes the Hugging Face files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), so the directory loads with AutoTokenizer.from_pretrained;
`load_tokenizer_file` reads back the raw `tokenizers.Tokenizer` (fast batch encoding,
what the corpus stream and prompt lengths are measured with). The `tokenizers`
library is imported only by the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)  # ids 0 and 1
EOS_ID, MASK_ID = 0, 1


def train_tokenizer(texts: Sequence[str], vocab_size: int = 4096):
    """A byte-level BPE `tokenizers.Tokenizer` with the special tokens at ids 0 (eos) and 1 (mask)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    # Newline runs are pre-tokens of their own, then GPT-2's byte-level split: a token never
    # spans a line break, so a prompt ending in ":" or in ":\n" ends where training text can.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.token_to_id(MASK_TOKEN) == MASK_ID
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int) -> Path:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return out


def load_tokenizer_file(path: str | Path):
    """The raw `tokenizers.Tokenizer` of a directory (or tokenizer.json) written by save_tokenizer."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: train the tokenizer first (apd-jax train --which tokenizer)")
    tok = Tokenizer.from_file(str(file))
    if tok.token_to_id(EOS_TOKEN) != EOS_ID or tok.token_to_id(MASK_TOKEN) != MASK_ID:
        raise ValueError(f"{file} is not an apd_jax tokenizer: {EOS_TOKEN} must be id 0 and {MASK_TOKEN} id 1")
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def merge_ids(*declared: int | Sequence[int] | None) -> tuple[int, ...]:
    """Token ids (each an id, a list of ids or None) as one tuple, in order, each once."""
    flat = (i for ids in declared if ids is not None for i in (ids if isinstance(ids, (list, tuple)) else [ids]))
    return tuple(dict.fromkeys(int(i) for i in flat))
