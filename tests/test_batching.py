"""Prompts decoded in fixed-size batches: the same rows as one batch, streamed output, resume."""

import json

import pytest

from apd_jax.decoding.apd import APDConfig, apd_generate
from apd_jax.decoding.batching import generate_in_batches, open_output

CFG = APDConfig(R=0.7, W=4, M=8, max_new_tokens=12, eos_token_ids=(2,))
IDS = [[5, 17, 33], [44, 3], [200, 11, 19, 300], [7, 7], [150, 40, 41], [9], [60, 61, 62, 63, 64]]
TEXTS = [" ".join(map(str, p)) for p in IDS]


def decode(ids):
    return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def one_batch(dream, qwen):
    """The reference: every prompt in one batch."""
    return apd_generate(dream, qwen, IDS, CFG)


def test_batches_equal_one_batch_in_input_order(dream, qwen, one_batch, tmp_path):
    out = tmp_path / "out.jsonl"
    shapes = []

    def generate(rows, first):
        shapes.append(len(rows))
        return apd_generate(dream, qwen, rows, CFG)

    with open_output(out, TEXTS, {}, resume=False) as output:
        records = generate_in_batches(TEXTS, IDS, generate, decode, batch_size=3, output=output, progress=False)
    assert shapes == [3, 3, 3]  # the last batch (1 prompt) is filled up to the same shape
    assert [r["index"] for r in records] == list(range(len(IDS)))
    assert [r["ids"] for r in records] == one_batch.sequences()
    assert [r["accepted_per_pass"] for r in records] == [one_batch.accepted_per_pass(i) for i in range(len(IDS))]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_interrupted_run_resumes_where_it_stopped(dream, qwen, one_batch, tmp_path):
    out = tmp_path / "out.jsonl"
    calls = []

    def failing(rows, first):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rows)
        return apd_generate(dream, qwen, rows, CFG)

    with pytest.raises(KeyboardInterrupt), open_output(out, TEXTS, {}, resume=False) as output:
        generate_in_batches(TEXTS, IDS, failing, decode, batch_size=2, output=output, progress=False)
    assert len(out.read_text().splitlines()) == 4  # two finished batches were kept
    whole = json.dumps({"index": 4, "prompt": TEXTS[4]})
    with out.open("a") as f:
        f.write(whole)  # a complete record whose newline kill -9 cut off: written again, not glued to
    with pytest.raises(FileExistsError, match="--resume"):
        open_output(out, TEXTS, {}, resume=False)
    seen = []

    def generate(rows, first):
        seen.append(rows)
        return apd_generate(dream, qwen, rows, CFG)

    resumed = open_output(out, TEXTS, {}, resume=True)
    rest = generate_in_batches(TEXTS, IDS, generate, decode, batch_size=2, output=resumed, progress=False)
    assert [r["index"] for r in rest] == [4, 5, 6]
    assert seen[0][:2] == IDS[4:6]  # nothing before prompt 4 was decoded again
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["ids"] for r in lines] == one_batch.sequences()


def test_resume_refuses_an_output_of_other_prompts(tmp_path):
    out = tmp_path / "out.jsonl"
    open_output(out, TEXTS, {}, resume=False)
    out.write_text(json.dumps({"index": 0, "prompt": "something else"}) + "\n")
    before = out.read_text()
    with pytest.raises(ValueError, match="does not match prompt 0"):
        open_output(out, TEXTS, {}, resume=True)
    assert out.read_text() == before
    out.write_text("my notes\nmore\n")
    with pytest.raises(ValueError, match="not JSON"):
        open_output(out, TEXTS, {}, resume=True)
    assert out.read_text() == "my notes\nmore\n"
    (tmp_path / "notes.jsonl").write_text("my notes\nmore\n")
    with pytest.raises(ValueError, match="not written by apd-jax generate"):
        open_output(tmp_path / "notes.jsonl", TEXTS, {}, resume=True)
    assert (tmp_path / "notes.jsonl").read_text() == "my notes\nmore\n"


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_must_be_positive(size):
    with pytest.raises(ValueError, match="--batch-size"):
        generate_in_batches(TEXTS, IDS, lambda rows, first: None, decode, batch_size=size, progress=False)


@pytest.mark.parametrize("name", ["apd", "threshold"])
def test_generate_batched_equals_one_batch(name, dream, qwen):
    from apd_jax.decoding.batching import generate_batched
    from apd_jax.decoding.registry import Models, decoder

    chosen = decoder(name)
    apd_only = {"W": 4, "M": 8} if name == "apd" else {}  # a decoder refuses options it does not take
    settings = chosen.settings_from({"max_new_tokens": 12, "eos_token_ids": (2,), **apd_only})
    run = lambda rows: chosen.generate(Models(dream, qwen), rows, settings)  # noqa: E731
    whole, parts = run(IDS), generate_batched(run, IDS, 3)
    assert parts.sequences() == whole.sequences()
    assert [parts.accepted_per_pass(i) for i in range(len(IDS))] == [whole.accepted_per_pass(i) for i in range(len(IDS))]
    assert (parts.stopped_at_eos == whole.stopped_at_eos).all()
