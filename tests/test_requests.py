"""Request files (.jsonl prompts files with per-request settings): parsing and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apd_jax.text.prompts import SEED_MAX, Request, is_request_file, read_requests


def _write(tmp_path: Path, *lines: str, name: str = "requests.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_requests_carry_their_prompt_and_only_the_settings_they_set(tmp_path):
    path = _write(tmp_path, json.dumps({"prompt": "def f(x):\n", "max_new_tokens": 32, "seed": 7}), "",
                  json.dumps({"prompt": "print(", "temperature": 0.5, "top_p": 1, "top_k": 40}))
    assert read_requests(path) == [
        Request(1, "def f(x):\n", {"max_new_tokens": 32, "seed": 7}),
        Request(3, "print(", {"temperature": 0.5, "top_p": 1, "top_k": 40}),
    ]


def test_a_jsonl_name_makes_a_request_file(tmp_path):
    assert is_request_file(Path("a/requests.JSONL")) and not is_request_file(Path("prompts.txt"))


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", ', "line 2 is not JSON (Expecting property name enclosed in double quotes at column"),
    ('["x"]', 'line 2 must be an object with a text "prompt"'),
    ('{"text": "x"}', 'line 2 must be an object with a text "prompt"'),
    ('{"prompt": [1, 2]}', 'line 2 must be an object with a text "prompt"'),
    ('{"prompt": "x", "temprature": 0.5}', "line 2: unknown keys ['temprature']; a request takes \"prompt\" and "
                                          "max_new_tokens, temperature, top_p, top_k, seed"),
    ('{"prompt": "x", "max_new_tokens": 8.5}', "line 2: max_new_tokens 8.5 must be an integer"),
    ('{"prompt": "x", "top_k": true}', "line 2: top_k true must be an integer"),
    ('{"prompt": "x", "temperature": "hot"}', 'line 2: temperature "hot" must be a number'),
    ('{"prompt": "x", "seed": -1}', f"line 2: seed -1 must lie in [0, {SEED_MAX}]"),
])
def test_a_bad_line_is_named_with_its_fix(tmp_path, line, message):
    path = _write(tmp_path, '{"prompt": "fine"}', line)
    with pytest.raises(ValueError) as err:
        read_requests(path)
    assert str(err.value).startswith(f"prompts file {path} line 2") and message in str(err.value)


def test_an_empty_request_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no requests"):
        read_requests(_write(tmp_path, "", "  "))
