"""`apd-jax generate` under bad input (issue 24): --output and --resume never lose or mix a file, outputs are
checked before any work, Ctrl-C says what was kept, and a prompts file's problems name their line."""

import json
import os
import shutil

import pytest

import apd_jax.cli.generate as generate_command
from apd_jax.decoding.batching import RUN_SUFFIX
from apd_jax.cli import main
from apd_jax.decoding import continuous
from apd_jax.text.prompts import read_prompt_lines

PROMPTS = ["def add(a, b):", "class Stack:", "import os", "for i in range(3):", "x = [1, 2, 3]"]
RUN = ["--max-new-tokens", "8", "--batch-size", "2"]  # 5 prompts: batches of 2, 2 and 1


def record_of(output):
    return output.with_name(output.name + RUN_SUFFIX)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of PROMPTS, its paths given as a quoted "~/..." (user_path expands it)."""
    home = tmp_path_factory.mktemp("home")
    (home / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        assert main(["generate", "--prompts-file", "~/p.txt", *RUN, "--output", "~/out.jsonl"]) == 0
    return home / "p.txt", home / "out.jsonl"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command loads a model: these errors must come before any work."""
    def load_model(*args, **kw):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(generate_command, "load_model", load_model)


def copy_run(reference, tmp_path, keep: bytes | None = None):
    """A copy of the reference run's output (its first `keep` bytes) and its run record."""
    _, out = reference
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(out.read_bytes() if keep is None else keep)
    shutil.copy(record_of(out), record_of(copy))
    return copy


def test_quoted_home_paths_and_the_run_record(reference):
    prompts, out = reference
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["prompt"]) for r in records] == list(enumerate(PROMPTS))
    run = json.loads(record_of(out).read_text())
    assert run["prompts"] == 5 and run["max_new_tokens"] == 8 and run["batch_size"] == 2 and run["decoder"] == "apd"
    assert {"run", "apd_jax", "prompts_sha256", "seed", "drafter", "verifier", "dtype", "max_len"} <= run.keys()


def test_resume_leaves_a_file_it_did_not_write_byte_for_byte(reference, tmp_path, capsys, no_model_load):
    prompts, _ = reference
    dumped = tmp_path / "result.json"
    dumped.write_text(json.dumps({"accuracy": 0.9}))  # json.dump's output: one line, no newline
    before = dumped.read_bytes()
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(dumped), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{dumped} was not written by apd-jax generate (no result.json{RUN_SUFFIX} beside it)" in err
    assert "choose another --output" in err
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(dumped)]) == 2
    assert "it was not written by apd-jax generate" in capsys.readouterr().err
    assert dumped.read_bytes() == before and not record_of(dumped).exists()


@pytest.mark.parametrize("records", [2, 5])
def test_resume_leaves_a_users_note_after_the_records(reference, tmp_path, capsys, no_model_load, records):
    prompts, out = reference
    lines = out.read_bytes().splitlines(keepends=True)
    copy = copy_run(reference, tmp_path, b"".join(lines[:records]) + b"my note: looks good")
    before = copy.read_bytes()
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(copy), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{copy}: line {records + 1} ('my note: looks good') is not" in err
    assert "remove that line to resume, or choose another --output" in err
    assert copy.read_bytes() == before


@pytest.mark.parametrize("cut", [3, 60, -1])  # bytes of record 2 that were written: a prefix of its start,
def test_resume_writes_a_cut_record_again(reference, tmp_path, capsys, cut):  # past its start, all but "\n"
    prompts, out = reference
    lines = out.read_bytes().splitlines(keepends=True)
    copy = copy_run(reference, tmp_path, b"".join(lines[:2]) + lines[2][:cut])
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(copy), "--resume"]) == 0
    assert copy.read_bytes() == out.read_bytes()


def test_resume_with_other_settings_is_refused(reference, tmp_path, capsys, no_model_load):
    prompts, _ = reference
    copy = copy_run(reference, tmp_path, b"")
    resume = ["generate", "--prompts-file", str(prompts), "--output", str(copy), "--resume"]
    assert main([*resume, "--max-new-tokens", "4", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {copy} was written with other settings: max_new_tokens 8 (now 4);" in err
    assert main([*resume, *RUN, "--decoder", "ar", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert 'decoder "apd" (now "ar")' in err and "seed 0 (now 3)" in err and "R 0.7 (now unset)" in err
    other = tmp_path / "other.txt"
    other.write_text("\n".join(PROMPTS[:4]) + "\n")
    assert main(["generate", "--prompts-file", str(other), *RUN, "--output", str(copy), "--resume"]) == 2
    assert "prompts 5 (now 4)" in capsys.readouterr().err
    assert copy.read_bytes() == b""


def test_a_new_run_refuses_an_existing_output_or_run_record(reference, tmp_path, capsys, no_model_load):
    prompts, _ = reference
    out = tmp_path / "out.jsonl"
    record_of(out).write_text("{}")
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 2
    assert f"{record_of(out)} exists" in capsys.readouterr().err
    assert not out.exists() and record_of(out).read_text() == "{}"
    copy = copy_run(reference, tmp_path)
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(copy)]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_an_unwritable_output_fails_before_any_model_loads(reference, tmp_path, capsys, no_model_load):
    prompts, _ = reference
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    out = blocker / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 2
    assert f"--output {out}: {blocker} is a file, not a directory" in capsys.readouterr().err


def test_a_read_only_directory_fails_before_any_model_loads(reference, tmp_path, capsys, no_model_load):
    prompts, _ = reference
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("this user writes into a read-only directory (root): the blocked-parent test covers it")
    out = locked / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 2
    assert f"{out}: Permission denied" in capsys.readouterr().err


def test_a_run_that_fails_before_its_first_record_leaves_nothing(reference, tmp_path, capsys, monkeypatch):
    prompts, _ = reference
    def load_model(path, **kw):
        raise OSError(f"{path}: damaged")
    monkeypatch.setattr(generate_command, "load_model", load_model)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 2
    assert "damaged" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def interrupt_at(monkeypatch, call: int):
    """Ctrl-C at round number `call` (from 1) of continuous batching, as it hands over its finished rows."""
    original = continuous.decode

    def decode(slots, requests, key, on_finished):
        calls = []

        def finished(ended):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            on_finished(ended)
        return original(slots, requests, key, finished)
    monkeypatch.setattr(continuous, "decode", decode)


def test_ctrl_c_keeps_the_finished_records_and_resume_completes_them(reference, tmp_path, capsys, monkeypatch):
    prompts, out = reference
    part = tmp_path / "part.jsonl"
    argv = ["generate", "--prompts-file", str(prompts), *RUN, "--output", str(part)]
    interrupt_at(monkeypatch, 2)
    assert main(argv) == 130
    err = capsys.readouterr().err.splitlines()
    kept = part.read_bytes().splitlines()
    assert err == [f"apd-jax generate: interrupted; kept {len(kept)} of 5 records in {part}; run the same command "
                   "with --resume to continue"]
    assert 1 <= len(kept) < 5 and set(kept) <= set(out.read_bytes().splitlines())
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    # Records complete out of order: the same records, each once.
    assert sorted(part.read_bytes().splitlines()) == sorted(out.read_bytes().splitlines())


def test_ctrl_c_before_the_first_record_leaves_nothing(reference, tmp_path, capsys, monkeypatch):
    prompts, _ = reference
    interrupt_at(monkeypatch, 1)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 130
    assert capsys.readouterr().err == f"apd-jax generate: interrupted; nothing was written to {out}\n"
    assert list(tmp_path.iterdir()) == []
    interrupt_at(monkeypatch, 1)
    assert main(["generate", "def f():", *RUN]) == 130
    assert "interrupted; the texts printed above are what was kept (no --output)" in capsys.readouterr().err


def test_a_prompt_and_a_prompts_file_together_are_an_error(reference, capsys, no_model_load):
    prompts, _ = reference
    assert main(["generate", "hello", "--prompts-file", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "give a prompt or --prompts-file, not both" in err and "'hello'" in err and str(prompts) in err


def test_prompts_file_lines_end_at_newlines_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a\fb\x0bc\n\nd\x1ce\x85f\r\ng\u2028h\ri\n".encode())
    assert read_prompt_lines(path) == [(1, "a\fb\x0bc"), (3, "d\x1ce\x85f"), (4, "g\u2028h\ri")]


def test_a_too_long_prompt_names_its_line_before_any_decoding(tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 1)  # a decoding call would end the run with 130, not 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("a = 1\nb = 2\n\nc = 3\nd = 4\n" + "x " * 600 + "\ne = 5\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"prompts file {prompts} line 6: prompt of " in err
    assert "+ max_new_tokens 8 exceeds the cache capacity 512" in err
    assert sorted(tmp_path.iterdir()) == [prompts]


def test_max_len_sets_the_capacity(capsys, monkeypatch):
    interrupt_at(monkeypatch, 1)
    assert main(["generate", "def f():", "--max-len", "8", "--max-new-tokens", "8"]) == 2
    assert "the prompt: prompt of 3 tokens + max_new_tokens 8 exceeds the cache capacity 8" in capsys.readouterr().err


def test_an_empty_prompt_is_an_error(capsys, monkeypatch):
    interrupt_at(monkeypatch, 1)
    assert main(["generate", "", "--no-chat", "--max-new-tokens", "8"]) == 2
    assert "the prompt is empty: generation needs at least one prompt token" in capsys.readouterr().err


def test_ids_outside_the_vocabulary_name_their_line_before_any_decoding(tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 1)
    prompts = tmp_path / "ids.txt"
    prompts.write_text("5 6 7\n8 99999 9\n")
    assert main(["generate", "--ids", "--prompts-file", str(prompts), "--max-new-tokens", "8"]) == 2
    assert f"prompts file {prompts} line 2 holds ids [99999] outside the vocabulary [0, " in capsys.readouterr().err
