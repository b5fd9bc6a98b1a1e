"""GSM8K-style evaluation: answer extraction on literals, the command on the embedded pair, bad files."""

import json

import pytest

from apd_jax.cli import main
from apd_jax.evaluation.evaluate import extract_answer, load_jsonl


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


def test_evaluation_is_the_same_in_any_batch_size():
    # The last batch is filled up to the batch's shape; its filler rows count for nothing.
    from apd_jax import ASSETS_DIR
    from apd_jax.decoding.apd import APDConfig
    from apd_jax.checkpoints import load_model, load_tokenizer
    from apd_jax.evaluation.evaluate import evaluate

    pair = [load_model(ASSETS_DIR / name, param_dtype="float32") for name in ("drafter", "verifier")]
    items = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(5)]
    config = APDConfig(W=4, M=8, max_new_tokens=8)
    reports = [evaluate(*pair, load_tokenizer(ASSETS_DIR / "drafter"), items, config, batch_size=n) for n in (2, 5)]
    assert reports[0].total == reports[1].total == 5
    assert (reports[0].correct, reports[0].tokens_per_pass) == (reports[1].correct, reports[1].tokens_per_pass)


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
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it, naming the flag
        main(["eval", str(data), "--limit", limit])
    assert exit_.value.code == 2
    assert f"argument --limit: invalid value '{limit}': expected an integer >= 1" in capsys.readouterr().err
