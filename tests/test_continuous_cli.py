"""`apd-jax generate` with a .jsonl request file through continuous batching: per-request settings, resume."""

import json

import pytest

from apd_jax.cli import main

REQUESTS = [{"prompt": "5 6 7", "max_new_tokens": 3}, {"prompt": "9 10", "temperature": 0.9, "seed": 4},
            {"prompt": "9 10", "temperature": 0.9, "seed": 4}, {"prompt": "11 12 13", "top_k": 1, "temperature": 1.0},
            {"prompt": "8"}]
RUN = ["--random-tiny", "--ids", "--max-new-tokens", "6", "--batch-size", "2"]


def write(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def by_index(out):
    return {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_a_request_file_runs_each_request_with_its_settings_and_resumes(tmp_path, capsys):
    prompts, out = write(tmp_path / "requests.jsonl", REQUESTS), tmp_path / "out.jsonl"
    argv = ["generate", "--prompts-file", str(prompts), *RUN, "--output", str(out)]
    assert main(argv) == 0
    assert "slot occupancy" in capsys.readouterr().out
    records = by_index(out)
    assert sorted(records) == list(range(5))
    assert [len(records[i]["ids"]) for i in range(5)] == [3, 6, 6, 6, 6]  # request 0's own budget
    assert records[1]["ids"] == records[2]["ids"]  # one seed, one sample, in whichever slot
    # Interrupted after two records: resume decodes the other three, and each comes out as before.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    assert main([*argv, "--resume"]) == 0
    assert by_index(out) == records
    # A request's settings are part of the run: changed, the file is not resumed.
    write(prompts, REQUESTS[:4] + [{"prompt": "8", "seed": 1}])
    assert main([*argv, "--resume"]) == 2
    assert "requests_sha256" in capsys.readouterr().err


@pytest.mark.parametrize("request_, decoder, message", [
    ({"prompt": "5 6", "max_new_tokens": 7}, "apd",
     "line 2: max_new_tokens=7 exceeds the run's capacity 6 (--max-new-tokens bounds every request's)"),
    ({"prompt": "5 6", "temperature": -1}, "ar", "line 2: temperature=-1 must be >= 0"),
    ({"prompt": "5 6", "top_p": 0}, "leftright", "line 2: top_p=0 must lie in (0, 1]"),
    ({"prompt": "5 6", "seed": 3}, "dream", "line 2 sets seed: a request's own settings need continuous batching"),
])
def test_a_bad_request_names_its_line(tmp_path, capsys, request_, decoder, message):
    prompts = write(tmp_path / "requests.jsonl", [{"prompt": "5"}, request_])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--prompts-file", str(prompts), *RUN, "--decoder", decoder, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
