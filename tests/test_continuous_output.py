"""An output file written out of order (continuous batching): resume from the set of indices it holds."""

import json

import pytest

from apd_jax.decoding.batching import open_output, record_start

TEXTS = ["a", "b", "c", "d", "e"]


def line(index: int) -> str:
    return json.dumps({"index": index, "prompt": TEXTS[index], "text": "x"}) + "\n"


@pytest.fixture
def started(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_output(out, TEXTS, {"seed": 0}, resume=False):
        pass
    return out


def test_resume_holds_the_set_of_finished_records_in_any_order(started):
    started.write_text(line(3) + line(0) + line(4))
    assert open_output(started, TEXTS, {"seed": 0}, resume=True).done == {0, 3, 4}


@pytest.mark.parametrize("cut", [2, 12, -1])  # a prefix of its start, past its start, all but its newline
def test_a_cut_record_of_any_prompt_still_to_come_is_written_again(started, cut):
    started.write_text(line(3) + line(1)[:cut])
    assert open_output(started, TEXTS, {"seed": 0}, resume=True).done == {3}
    assert started.read_text() == line(3)


def test_a_cut_record_of_a_finished_prompt_or_of_none_is_refused(started):
    for tail in (record_start(3, "d").decode(), '{"index": 9', "my note"):
        started.write_text(line(3) + tail)
        before = started.read_bytes()
        with pytest.raises(ValueError, match=r"line 2 \(.*\) is not a record of this run"):
            open_output(started, TEXTS, {"seed": 0}, resume=True)
        assert started.read_bytes() == before


def test_a_repeated_or_foreign_record_is_refused(started):
    started.write_text(line(2) + line(2))
    with pytest.raises(ValueError, match="line 2 repeats record 2"):
        open_output(started, TEXTS, {"seed": 0}, resume=True)
    started.write_text(line(2) + json.dumps({"index": 1, "prompt": "z"}) + "\n")
    with pytest.raises(ValueError, match="line 2: record 1 does not match prompt 1"):
        open_output(started, TEXTS, {"seed": 0}, resume=True)
    started.write_text(json.dumps({"index": "1", "prompt": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a record of this input"):
        open_output(started, TEXTS, {"seed": 0}, resume=True)
