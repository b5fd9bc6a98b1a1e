"""Bad input to bench, compare, eval, train and train-filter (issue 24): one clear line naming the flag or
file before any work, no user's file replaced, and Ctrl-C leaving nothing half-written behind."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from apd_jax import ASSETS_DIR
from apd_jax.cli import main
from conftest import last_error_line, run_cli as run, work_started as fail


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A user's file, to stand where a directory is expected."""
    path = tmp_path / "notes.txt"
    path.write_text("a user's notes\n")
    return path


# ----------------------------------------------------------------------------- options: one rule per kind


@pytest.mark.parametrize("argv, message", [
    (["bench", "--settings", ""], "--settings '' names no setting: expected ';'-separated 'R,W,M' entries"),
    (["bench", "--settings", ";"], "--settings ';' names no setting"),
    (["bench", "--baselines", "foo"], "argument --baselines: invalid value 'foo': unknown baseline 'foo'; "
                                      "expected comma-separated ar, leftright, llada, dream-block, or none"),
    (["bench", "--baselines", "ar,lr"], "unknown baseline 'lr'"),
    (["bench", "--budgets", "512-32"], "argument --budgets: --budgets '512-32': need 1 <= LOW <= HIGH"),
    (["bench", "--budgets", "many"], "argument --budgets: --budgets 'many': expected LOW-HIGH, e.g. 32-512"),
    (["bench", "--batch", "0"], "argument --batch: invalid value '0': expected comma-separated integers >= 1"),
    (["bench", "--batch", "1,x"], "argument --batch: invalid value '1,x': expected comma-separated integers >= 1"),
    (["bench", "--batch", ""], "argument --batch: invalid value '': expected comma-separated integers >= 1"),
    (["bench", "--repeats", "0"], "argument --repeats: invalid value '0': expected an integer >= 1"),
    (["bench", "--prompt-len", "0"], "argument --prompt-len: invalid value '0': expected an integer >= 1"),
    (["bench", "--max-new-tokens", "-1"], "argument --max-new-tokens: invalid value '-1': expected an integer >= 1"),
    (["bench", "--temperature", "nan"], "argument --temperature: invalid value 'nan': expected a finite number"),
    (["bench", "--top-p", "inf"], "argument --top-p: invalid value 'inf': expected a finite number"),
    (["eval", "data.jsonl", "--limit", "0"], "argument --limit: invalid value '0': expected an integer >= 1"),
    (["eval", "data.jsonl", "--batch-size", "x"], "argument --batch-size: invalid value 'x': expected an integer >= 1"),
    (["compare", "--heldout-prompts", "0"], "argument --heldout-prompts: invalid value '0': expected an integer >= 1"),
    (["compare", "--heldout-prompts", "2", "--batch-size", "0"], "argument --batch-size: invalid value '0'"),
    (["compare", "--heldout-prompts", "2", "--threshold", "nan"], "threshold=nan must be a finite number"),
    (["compare", "--heldout-prompts", "2", "--lookahead", ";"], "--lookahead ';' names no setting"),
    (["train-filter", "--drafter", "d", "--train-prompts", "2", "--out", "o", "--train-batch", "0"],
     "argument --train-batch: invalid value '0': expected an integer >= 1"),
    (["train-filter", "--drafter", "d", "--train-prompts", "2", "--out", "o", "--seed", "-1"],
     "argument --seed: invalid value '-1': expected an integer >= 0"),
    (["train-filter", "--drafter", "d", "--train-prompts", "2", "--out", "o", "--learning-rate", "nan"],
     "argument --learning-rate: invalid value 'nan': expected a finite number"),
    (["train", "--out", "o", "--steps", "0"], "argument --steps: invalid value '0': expected an integer >= 1"),
    (["train", "--out", "o", "--weight-decay", "nan"], "argument --weight-decay: invalid value 'nan'"),
    (["train", "--out", "o", "--eval-prompts", "-1"], "argument --eval-prompts: invalid value '-1': expected an "
                                                     "integer >= 0"),
    (["train", "--out", "o", "--vocab-size", "100"], "--vocab-size 100 must be >= 258"),
    (["train", "--out", "o", "--verifier-lr", "0"], "lr=0.0 must be > 0 (of the verifier)"),  # not --lr instead
    (["bench", "--against", "notes.txt"], "--against notes.txt is not the JSON of an `apd-jax bench --json` run"),
])
def test_bad_options_are_one_line_before_any_work(argv, message, no_work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a user's notes\n")
    assert run(argv) == 2
    line = last_error_line(capsys)
    assert line.startswith(f"apd-jax {argv[0]}: error: ") and message in line
    assert not (tmp_path / "o").exists()  # nothing made either


# ----------------------------------------------------------------------------- outputs checked before work


def test_outputs_under_a_file_are_refused_before_any_work(no_work, a_file, capsys):
    below = a_file / "out"
    for argv in (["bench", "--json", str(below / "b.json")], ["train", "--out", str(below)],
                 ["train-filter", "--drafter", "d", "--train-prompts", "2", "--out", str(below)]):
        assert run(argv) == 2
        assert f"{a_file} is a file, not a directory" in last_error_line(capsys)
    assert a_file.read_text() == "a user's notes\n"


def test_bench_json_never_replaces_a_users_file(no_work, tmp_path, capsys):
    mine = tmp_path / "results.json"
    mine.write_text('{"my": "results"}')
    assert run(["bench", "--json", str(mine)]) == 2
    assert "exists and is not the JSON of an `apd-jax bench` run" in last_error_line(capsys)
    assert mine.read_text() == '{"my": "results"}'
    assert run(["bench", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory: give a file name" in last_error_line(capsys)


def test_train_out_onto_a_file_names_the_flag_and_keeps_the_file(no_work, a_file, capsys):
    assert run(["train", "--out", str(a_file)]) == 2
    assert last_error_line(capsys) == (f"apd-jax train: error: --out {a_file} is a file, not a directory: give a "
                                       "directory to write into")
    assert a_file.read_text() == "a user's notes\n"


@pytest.mark.parametrize("name", ["tokenizer", "drafter", "verifier"])
def test_train_never_replaces_a_directory_it_did_not_write(name, no_work, tmp_path, capsys):
    theirs = tmp_path / "run" / name
    theirs.mkdir(parents=True)
    (theirs / "README.md").write_text("their model\n")
    assert run(["train", "--out", str(tmp_path / "run")]) == 2
    assert f"{theirs} exists and was not written by `apd-jax train`" in last_error_line(capsys)
    assert (theirs / "README.md").read_text() == "their model\n"


def test_train_never_replaces_a_users_apd_eval_json(no_work, tmp_path, capsys):
    report = tmp_path / "run" / "apd_eval.json"
    report.parent.mkdir()
    report.write_text("my notes")
    assert run(["train", "--out", str(report.parent)]) == 2
    assert f"{report} exists and is not the APD check of `apd-jax train`" in last_error_line(capsys)
    assert report.read_text() == "my notes"


def test_train_replaces_its_own_output_whole_or_not_at_all(tmp_path):
    from apd_jax.training.outputs import RECORD, replacing

    own = tmp_path / "drafter"
    own.mkdir()
    (own / RECORD).write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with replacing(own) as stage:
            stage.mkdir()
            (stage / "half").write_text("x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"] and (own / RECORD).is_file()
    with replacing(own) as stage:
        stage.mkdir()
        (stage / RECORD).write_text('{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]
    assert json.loads((own / RECORD).read_text()) == {"new": 1}


# ----------------------------------------------------------------------------- eval's input file


def test_eval_names_a_binary_file_and_what_it_expects(no_work, tmp_path, capsys):
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)))
    assert run(["eval", str(data)]) == 2
    assert last_error_line(capsys) == (
        f"apd-jax eval: error: evaluation file {data} is not UTF-8 text (byte 0x80 at offset 128); expected JSONL: "
        "one JSON object with 'question' and 'answer' per line")


def test_eval_names_the_line_that_is_not_json(no_work, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n\n{"question": oops}\n')
    assert run(["eval", str(data)]) == 2
    line = last_error_line(capsys)
    assert f"{data}:3 is not JSON" in line and "expected JSONL" in line
    assert run(["eval", str(tmp_path)]) == 2
    assert f"evaluation file {tmp_path} is a directory" in last_error_line(capsys)


def test_eval_lines_end_at_newlines_only(tmp_path):
    from apd_jax.evaluation.evaluate import load_jsonl

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "a\u2028b\x0cc", "answer": "1"}, ensure_ascii=False) + "\r\n")
    assert load_jsonl(data) == [{"question": "a\u2028b\x0cc", "answer": "1"}]


def test_compare_completions_name_the_file_and_line(no_work, tmp_path, capsys):
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"prompt": "p", "completion": "c"}\n5\n')
    assert run(["compare", "--heldout-prompts", "2", "--lookahead", "8", "--completions", str(completions)]) == 2
    assert f"--completions {completions}:2 needs the keys 'prompt' and 'completion'" in last_error_line(capsys)


# ----------------------------------------------------------------------------- progress bars: terminals only


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_bars_are_drawn_on_a_terminal_only(terminal, monkeypatch):
    import sys

    from rich.progress import BarColumn

    from apd_jax.utils.progress import terminal_progress

    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich alone would draw into any stream with it set
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    with terminal_progress(("items", BarColumn()), "evaluate", 4) as advance:
        advance(2)
    assert bool(stderr.getvalue()) == terminal


def test_eval_into_a_file_holds_no_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    assert main(["eval", str(data), "--max-new-tokens", "8", "--W", "4", "--M", "8", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("accuracy ") and captured.out.count("\n") == 1
    assert "\x1b" not in captured.out + captured.err and "━" not in captured.out + captured.err


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_train_filter_interrupted_leaves_nothing(tmp_path, monkeypatch, capsys):
    from apd_jax.cli import train_filter

    monkeypatch.setattr(train_filter, "collect_traces", interrupt)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n")
    out = tmp_path / "filter"
    assert main(["train-filter", "--drafter", str(ASSETS_DIR / "drafter"), "--prompts-file", str(prompts),
                 "--out", str(out)]) == 130
    assert capsys.readouterr().err == (f"apd-jax train-filter: interrupted; --out {out} was not written, with "
                                       "nothing half-written behind; run the same command again to train it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_eval_interrupted_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    from apd_jax.cli import eval as eval_command

    monkeypatch.setattr(eval_command, "evaluate", interrupt)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
    assert main(["eval", str(data)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("apd-jax eval: interrupted; nothing was written") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_bench_interrupted_before_its_first_row_writes_no_json(tmp_path, monkeypatch, capsys):
    import apd_jax.bench.decoders

    monkeypatch.setattr(apd_jax.bench.decoders, "device_ceilings", lambda n: {"bandwidth": 1e9, "matmul_flops": 1e12})
    monkeypatch.setattr(apd_jax.bench.decoders, "bench_apd", interrupt)
    out = tmp_path / "b.json"
    assert main(["bench", "--shapes", "tiny", "--batch", "1", "--json", str(out)]) == 130
    assert capsys.readouterr().err == (f"apd-jax bench: interrupted; --json {out} was not written (nothing "
                                       "half-written was left behind)\n")
    assert list(tmp_path.iterdir()) == []


def test_bench_json_is_written_whole(tmp_path):
    from apd_jax.cli.bench import _write_json, interrupted

    args = SimpleNamespace(json=tmp_path / "b.json")
    _write_json(args, '{"rows": [1, 2]}', 2)
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"]
    assert interrupted(args) == f"--json {args.json} holds the 2 rows measured before the interrupt, each written whole"


@pytest.fixture
def tiny_stdlib(tmp_path) -> Path:
    root = tmp_path / "stdlib"
    root.mkdir()
    for i in range(8):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    pass\n" * 20)
    return root


def test_train_interrupted_says_what_is_complete_and_leaves_no_partial(tiny_stdlib, tmp_path, monkeypatch, capsys):
    import apd_jax.training.pipeline

    monkeypatch.setattr(apd_jax.training.pipeline, "train_model", interrupt)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--stdlib", str(tiny_stdlib), "--vocab-size", "300"]) == 130
    assert capsys.readouterr().err == (f"apd-jax train: interrupted; complete: {out / 'tokenizer'}; no half-written "
                                       "output was left behind; to continue, run the same command again\n")
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer"]


def test_train_interrupted_after_the_drafter_continues_with_the_verifier(tmp_path):
    from apd_jax.cli.train import interrupted

    for name, file in (("tokenizer", "tokenizer.json"), ("drafter", "training.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("{}")
    note = interrupted(SimpleNamespace(out=tmp_path, which="both"))
    assert note.endswith("to continue, run the same command with --which verifier (an existing OUT/tokenizer is "
                         "reused)")
    assert f"complete: {tmp_path / 'tokenizer'}, {tmp_path / 'drafter'};" in note


# ----------------------------------------------------------------------------- prompts too long, named first


def test_eval_names_an_item_too_long_before_decoding_any(tmp_path, monkeypatch, capsys):
    import apd_jax.evaluation.evaluate

    monkeypatch.setattr(apd_jax.evaluation.evaluate, "apd_generate", fail)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"question": "x " * 600, "answer": "1"}) + "\n")
    assert main(["eval", str(data), "--max-new-tokens", "8"]) == 2
    line = last_error_line(capsys)
    assert line.startswith("apd-jax eval: error: evaluation item 2 ('x x x") and "tokens + max_new_tokens 8" in line


def test_train_filter_names_the_line_too_long_before_any_trace(tmp_path, monkeypatch, capsys):
    from apd_jax.cli import train_filter

    monkeypatch.setattr(train_filter, "collect_traces", fail)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\n\n" + "x " * 600 + "\n")
    assert main(["train-filter", "--drafter", str(ASSETS_DIR / "drafter"), "--prompts-file", str(prompts),
                 "--out", str(tmp_path / "filter")]) == 2
    assert last_error_line(capsys).startswith(f"apd-jax train-filter: error: prompts file {prompts} line 3: prompt "
                                              "of ")
    assert not (tmp_path / "filter").exists()


def test_train_makes_no_output_directory_when_the_corpus_is_empty(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out", str(tmp_path / "run"), "--stdlib", str(tmp_path / "empty")]) == 2
    assert last_error_line(capsys) == f"apd-jax train: error: no usable .py files under {tmp_path / 'empty'}"
    assert not (tmp_path / "run").exists()
