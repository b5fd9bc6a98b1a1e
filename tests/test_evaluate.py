"""GSM8K-style evaluation: answer extraction on literals, the command on the embedded pair, bad files."""

import json

import pytest

from apd_jax.cli import main
from apd_jax.evaluate import extract_answer, load_jsonl


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("so the total is 7.5 and then 42.", "42"),
        ("no number here", None),
        ("The answer is 18.0", "18"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_eval_runs_on_the_embedded_pair(tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in [
        ("What is 2 + 3?", "2 + 3 = 5\n#### 5"), ("What is 10 - 4?", "#### 6"), ("What is 7 * 1?", "#### 7"),
    ]))
    assert main(["eval", str(data), "--max-new-tokens", "8", "--batch-size", "2", "--W", "4", "--M", "8"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "/3)" in out and "tokens/pass" in out


def test_bad_evaluation_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="needs the keys 'question' and 'answer'"):
        load_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not JSON"):
        load_jsonl(bad)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_below_one_is_a_clear_error(tmp_path, limit, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    assert main(["eval", str(data), "--limit", limit]) == 2
    assert f"--limit {limit} must be >= 1" in capsys.readouterr().err
