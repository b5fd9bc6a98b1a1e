"""Safe writes: `apd-jax convert` never deletes its source or a folder that is not a checkpoint, and
cleans up after an interrupted run of its own."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from apd_jax.checkpoints import PARTIAL_MARKER
from apd_jax.checkpoints.safetensors import iter_hf_tensors
from apd_jax.cli import main


def snapshot(path):
    """Every file under `path` with its bytes: what must survive a refused conversion."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture
def src(qwen_dir, tmp_path):
    return shutil.copytree(qwen_dir, tmp_path / "models" / "qwen")


def refused(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.parametrize("direction", ["hf-to-flax", "flax-to-hf"])
def test_destination_equal_to_the_source_is_refused(direction, src, tmp_path, capsys):
    if direction == "flax-to-hf":
        assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
        src = tmp_path / "flax"
    before = snapshot(src)
    refused(["convert", direction, str(src), str(src), "--overwrite"], capsys, f"output directory {src} is the source")
    assert snapshot(src) == before


def test_destination_through_a_symlink_to_the_source_is_refused(src, tmp_path, capsys):
    (tmp_path / "link").symlink_to(src)
    before = snapshot(src)
    refused(["convert", "hf-to-flax", str(src), str(tmp_path / "link"), "--overwrite"], capsys, "is the source")
    assert snapshot(src) == before


def test_destination_above_the_source_is_refused(src, tmp_path, capsys):
    (tmp_path / "models" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "models")
    refused(["convert", "hf-to-flax", str(src), str(tmp_path / "models"), "--overwrite"], capsys,
            "contains the source")
    assert snapshot(tmp_path / "models") == before


def test_destination_inside_the_source_is_refused(src, capsys):
    before = snapshot(src)
    refused(["convert", "hf-to-flax", str(src), str(src / "flax")], capsys, "is inside the source")
    assert snapshot(src) == before


def test_overwrite_replaces_only_a_directory_apd_jax_wrote(src, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    refused(["convert", "hf-to-flax", str(src), str(other), "--overwrite"], capsys, "was not written by apd_jax")
    assert (other / "thesis.tex").read_text() == "years of work"
    # A previous conversion is apd_jax's: replaced, complete, with no marker left in it.
    out = tmp_path / "flax"
    assert main(["convert", "hf-to-flax", str(src), str(out)]) == 0
    assert main(["convert", "hf-to-flax", str(src), str(out), "--overwrite"]) == 0
    assert not (out / PARTIAL_MARKER).exists()
    assert (out / "params").is_dir() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flax", "models", "other"]
    # Once a file apd_jax did not write is added to it, it is no longer replaced.
    (out / "notes.txt").write_text("mine")
    refused(["convert", "hf-to-flax", str(src), str(out), "--overwrite"], capsys, "holds files apd_jax did not write")
    assert (out / "notes.txt").read_text() == "mine"


HOLD = """
import sys, time
from pathlib import Path
from apd_jax.checkpoints import atomic_dir
with atomic_dir(Path(sys.argv[1]), False) as tmp:
    (tmp / "half.bin").write_bytes(b"0" * 1000)
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_later_run_removes_what_a_killed_one_left(src, tmp_path):
    out = tmp_path / "flax"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (leftover,) = tmp_path.glob(".flax.*")
    assert json.loads((leftover / PARTIAL_MARKER).read_text())["pid"] == proc.pid
    assert not out.exists()  # the output appears only complete
    foreign = tmp_path / ".flax.backup"  # not apd_jax's: no marker, so never touched
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["convert", "hf-to-flax", str(src), str(out)]) == 0
    assert not leftover.exists() and (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".flax.backup", "flax", "models"]


def test_a_running_conversion_is_not_taken_for_a_leftover(src, tmp_path):
    out = tmp_path / "flax"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        (running,) = tmp_path.glob(".flax.*")
        assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
        assert (running / "half.bin").is_file()
    finally:
        proc.kill()
        proc.wait()


def test_round_trip_after_safe_overwrite_is_still_exact(src, tmp_path):
    assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf"), "--overwrite"]) == 0
    a, b = dict(iter_hf_tensors(src)), dict(iter_hf_tensors(tmp_path / "hf"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_flax_to_hf_writes_hub_style_shards_that_transformers_loads(src, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf"), "--max-shard-size", "5e-5"]) == 0
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    a, b = dict(iter_hf_tensors(src)), dict(iter_hf_tensors(tmp_path / "hf"))
    assert set(index["weight_map"]) == set(b) == set(a) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in b.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    ours, theirs = (Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict() for d in (src, tmp_path / "hf"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
