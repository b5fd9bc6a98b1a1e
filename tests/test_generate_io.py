"""`apd-jax generate` with instruct prompts (chat templates) and big inputs (batches, JSONL output, resume)."""

import json

from apd_jax import ASSETS_DIR
from apd_jax.checkpoints import load_tokenizer
from apd_jax.cli import main
from test_chat import with_chat_template


def test_chat_template_is_applied_by_default_when_the_tokenizer_has_one(tmp_path, capsys):
    drafter = with_chat_template(ASSETS_DIR / "drafter", tmp_path / "drafter")
    verifier = with_chat_template(ASSETS_DIR / "verifier", tmp_path / "verifier")
    pair = ["--drafter", str(drafter), "--verifier", str(verifier), "--max-new-tokens", "6"]
    out = tmp_path / "chat.jsonl"
    assert main(["generate", "Write fib.", *pair, "--system", "Be brief.", "--output", str(out)]) == 0
    plain = tmp_path / "plain.jsonl"
    assert main(["generate", "Write fib.", *pair, "--no-chat", "--output", str(plain)]) == 0
    capsys.readouterr()
    tok = load_tokenizer(drafter)
    chat, text = json.loads(out.read_text()), json.loads(plain.read_text())
    # the chat prompt was the template's rendering: decoding it again gives the same continuation
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite fib.<|im_end|>\n<|im_start|>assistant\n"
    again = tmp_path / "again.jsonl"
    assert main(["generate", rendered, *pair, "--no-chat", "--output", str(again)]) == 0
    assert json.loads(again.read_text())["ids"] == chat["ids"]
    assert tok.decode(chat["ids"]) == chat["text"] and tok.decode(text["ids"]) == text["text"]


def test_system_without_a_chat_template_is_an_error(capsys):
    assert main(["generate", "hi", "--system", "Be brief.", "--max-new-tokens", "4"]) == 2
    assert "--system needs a chat template" in capsys.readouterr().err


def test_ten_thousand_prompts_complete_through_the_slots_and_resume(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    lines = [f"def f{i}(x):" for i in range(10_000)]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--prompts-file", str(prompts), "--max-new-tokens", "2", "--batch-size", "256",
            "--output", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_index = sorted(records, key=lambda r: r["index"])  # records complete out of order, each carrying its index
    assert [r["index"] for r in by_index] == list(range(10_000))
    assert [r["prompt"] for r in by_index] == lines
    assert all(len(r["ids"]) == 2 and r["passes"] >= 1 for r in records)
    assert "20000 tokens" in capsys.readouterr().out
    # an existing output is never overwritten; --resume continues it (here: nothing left to do)
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # nothing left to do
    assert out.read_text().splitlines() == [json.dumps(r) for r in records]
    with out.open("a") as f:
        f.write('{"index": 10000')  # no record of this run (it has 10,000): refused, the file left as it is
    before = out.read_bytes()
    assert main([*argv, "--resume"]) == 2
    assert "line 10001 ('{\"index\": 10000') is not a record of this run" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_options_that_would_be_ignored_are_errors(tmp_path, capsys):
    assert main(["generate", "hi", "--resume", "--max-new-tokens", "2"]) == 2
    assert "--resume continues an --output" in capsys.readouterr().err
    assert main(["generate", "--random-tiny", "--ids", "5 6", "--chat", "--max-new-tokens", "2"]) == 2
    assert "with --ids the prompt is ids already" in capsys.readouterr().err
    assert main(["compare", "--heldout-prompts", "1", "--completions", str(tmp_path / "c.jsonl")]) == 2
    assert "give --lookahead too" in capsys.readouterr().err
