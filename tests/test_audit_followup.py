"""Issue 24's re-audit: inputs of the audited kinds that the issue did not list. Each ends in one line
naming the flag or file (exit 2) before any model loads, or the right result; no user's file is touched."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from apd_jax import ASSETS_DIR
from apd_jax import checkpoints as checkpoint
from apd_jax.cli import main
from apd_jax.cli.common import SEED_MAX
from conftest import last_error_line as error_line, run_cli as run


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("hello\nworld\n")
    return path


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--seed", str(10**23), "hi"], f"expected an integer from 0 to {SEED_MAX}"),
    (["generate", "--seed", "-1", "hi"], "expected an integer >= 0"),  # as train's and train-filter's
    (["train", "--out", "o", "--seed", str(2**63 - 1)], f"expected an integer from 0 to {SEED_MAX}"),
    (["train-filter", "--drafter", "d", "--train-prompts", "2", "--out", "o", "--seed", str(2**64)],
     f"expected an integer from 0 to {SEED_MAX}"),
])
def test_a_seed_a_jax_key_cannot_take_is_an_option_error(argv, expected, no_work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(argv) == 2
    line = error_line(capsys)
    assert line.startswith(f"apd-jax {argv[0]}: error: argument --seed: invalid value") and expected in line


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-len", "abc", "an integer or 'none'"), ("--M-min", "4.5", "an integer or 'none'"),
    ("--eot-threshold", "x", "a number or 'none'"),
])
def test_an_option_that_may_be_none_names_what_it_takes(flag, value, expected, no_work, capsys):
    assert run(["generate", flag, value, "hi"]) == 2
    assert error_line(capsys) == f"apd-jax generate: error: argument {flag}: invalid value {value!r}: expected {expected}"


# ----------------------------------------------------------------------------- options that would be ignored


def test_generate_refuses_a_filter_its_decoder_does_not_take(no_work, prompts, capsys):
    assert run(["generate", "--filter", str(ASSETS_DIR / "filter"), "--prompts-file", str(prompts)]) == 2
    assert error_line(capsys) == ("apd-jax generate: error: --decoder apd does not take --filter (a Learn2PD filter: "
                                  "--decoder learn2pd)")


def test_generate_refuses_verbose_with_an_output_file(no_work, prompts, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert run(["generate", "--verbose", "--prompts-file", str(prompts), "--output", str(out)]) == 2
    assert error_line(capsys).startswith("apd-jax generate: error: --verbose prints each prompt's tokens accepted per "
                                         "pass beside its text; with --output each record holds them")
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["generate", "--random-tiny", "--ids", "1 2 3"],
    ["compare", "--random-tiny", "--prompts-file", "ids.txt"],
])
def test_random_tiny_refuses_checkpoints_it_would_not_load(argv, no_work, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    pair = ["--drafter", str(ASSETS_DIR / "drafter"), "--verifier", str(ASSETS_DIR / "verifier")]
    assert run([*argv, *pair]) == 2
    assert error_line(capsys) == (f"apd-jax {argv[0]}: error: --random-tiny makes a tiny random pair instead of "
                                  "loading one: drop --drafter and --verifier, or --random-tiny")


@pytest.mark.parametrize("argv, needs", [
    (["compare", "--prompts-file", "p.txt"], "--stdlib is the corpus of --heldout-prompts: give --heldout-prompts N"),
    (["train-filter", "--drafter", "d", "--prompts-file", "p.txt", "--out", "o"],
     "--stdlib is the corpus of --train-prompts: give --train-prompts N"),
])
def test_stdlib_without_the_corpus_prompts_is_refused(argv, needs, no_work, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run([*argv, "--stdlib", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"apd-jax {argv[0]}: error: {needs}") and line.endswith("or drop --stdlib")
    assert not (tmp_path / "o").exists()


def test_bench_refuses_against_without_torch(no_work, tmp_path, capsys):
    earlier = tmp_path / "run.json"
    earlier.write_text(json.dumps({"rows": []}))
    assert run(["bench", "--shapes", "tiny", "--against", str(earlier)]) == 2
    assert error_line(capsys) == ("apd-jax bench: error: --against gives the PyTorch/apd_jax ratios of a --torch run: "
                                  "add --torch, or drop --against")


# ----------------------------------------------------------------------------- generate's output and prompts


def test_output_of_another_program_is_named_and_kept(no_work, prompts, tmp_path, capsys):
    theirs = tmp_path / "results.jsonl"
    theirs.write_text('{"a": 1}\n')
    assert run(["generate", "--prompts-file", str(prompts), "--output", str(theirs)]) == 2
    assert error_line(capsys) == (f"apd-jax generate: error: --output {theirs} exists, and it was not written by "
                                  "apd-jax generate: choose another file")
    assert theirs.read_text() == '{"a": 1}\n'


def test_output_that_cannot_be_created_names_the_flag(no_work, prompts, tmp_path, monkeypatch, capsys):
    import apd_jax.decoding.batching

    def refused(path, text):  # as an immutable directory (chattr +i) refuses even root
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(apd_jax.decoding.batching, "_create", refused)
    out = tmp_path / "o.jsonl"
    assert run(["generate", "--prompts-file", str(prompts), "--output", str(out)]) == 2
    assert error_line(capsys) == (f"apd-jax generate: error: --output {out} cannot be created (Operation not "
                                  "permitted); choose another place")


def test_a_prompts_file_may_be_a_pipe_or_a_device(tmp_path, no_work, capsys):
    from apd_jax.text.prompts import read_prompt_lines

    fifo = tmp_path / "fifo"  # as `--prompts-file <(cmd)` gives
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("a\nb\n",))
    writer.start()
    assert read_prompt_lines(fifo) == [(1, "a"), (2, "b")]
    writer.join()
    assert run(["generate", "--prompts-file", os.devnull]) == 2
    assert error_line(capsys) == f"apd-jax generate: error: prompts file {os.devnull} holds no prompts"


def test_tokenizer_leaves_a_long_prompt_to_apd_jax(capfd):
    # apd_jax names a prompt longer than the caches (and its line); transformers' own warning is not printed.
    tok = checkpoint.load_tokenizer(ASSETS_DIR / "drafter")
    assert len(tok.encode("x " * 600)) > tok.model_max_length
    assert capfd.readouterr().err == ""


def test_load_tokenizer_names_a_path_that_is_not_one():
    with pytest.raises(TypeError, match=r"^load_tokenizer\(path=None\): expected a checkpoint directory as a str or "
                                        "Path, not NoneType$"):
        checkpoint.load_tokenizer(None)


# ----------------------------------------------------------------------------- eval's items


@pytest.mark.parametrize("item, problem", [
    ({"question": 5, "answer": "#### 2"}, "'question' must be non-empty text, got 5"),
    ({"question": None, "answer": "#### 2"}, "'question' must be non-empty text, got null"),
    ({"question": "1 + 1?", "answer": "two"}, "'answer' \"two\" holds no number to match (GSM8K style: '... #### 42')"),
    ({"question": "1 + 1?", "answer": None}, "'answer' null holds no number to match"),
])
def test_eval_refuses_an_item_it_cannot_score(item, problem, no_work, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "fine?", "answer": 2}) + "\n" + json.dumps(item) + "\n")
    assert run(["eval", str(data)]) == 2
    assert error_line(capsys).startswith(f"apd-jax eval: error: {data}:2: {problem}")


def test_eval_reads_a_device_as_a_file(no_work, capsys):
    assert run(["eval", os.devnull]) == 2
    assert error_line(capsys).startswith(f"apd-jax eval: error: {os.devnull} holds no items; expected JSONL")


# ----------------------------------------------------------------------------- damaged orbax folders


def test_an_orbax_folder_missing_its_array_list_is_one_line(qwen_dir, tmp_path, capfd):
    flax = checkpoint.convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    shutil.rmtree(flax / "params" / "d")  # orbax's tree metadata: without it, orbax's threads printed tracebacks
    capfd.readouterr()
    assert main(["convert", "flax-to-hf", str(flax), str(tmp_path / "hf")]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert lines == [f"apd-jax convert: error: {flax} is damaged: files apd_jax wrote there are missing: params/d; "
                     "convert the checkpoint again from its Hugging Face directory (apd-jax convert hf-to-flax)"]
    assert not (tmp_path / "hf").exists()
