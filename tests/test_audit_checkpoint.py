"""Bad-input audit (issue 24), checkpoint side: `convert --overwrite` deletes nothing apd_jax did not
write, Ctrl-C and bad checkpoints end in one line and leave nothing behind, config.json problems name
the file and the field."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from apd_jax.checkpoints import orbax as checkpoint
from apd_jax.checkpoints import WRITTEN_MANIFEST, load_model
from apd_jax.cli import main


def snapshot(path):
    """Every entry under `path` with its bytes (files) or None (folders): what must survive."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def flax_dir(qwen_dir, tmp_path_factory):
    return checkpoint.convert_hf_to_orbax(qwen_dir, tmp_path_factory.mktemp("audit") / "flax")


@pytest.fixture
def src(qwen_dir, tmp_path):
    return shutil.copytree(qwen_dir, tmp_path / "src" / "qwen")


def one_error_line(capfd, code, argv):
    """Run the CLI; its stderr (absl's logging from threads included: capfd) is one line, returned."""
    assert main(argv) == code
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_keeps_a_hugging_face_folder_with_files_of_its_own(qwen_dir, flax_dir, tmp_path, capfd):
    dst = shutil.copytree(qwen_dir, tmp_path / "hf")
    (dst / "README.md").write_text("# my model card")
    (dst / ".git").mkdir()
    (dst / ".git" / "config").write_text("[core]")
    (dst / "runs").mkdir()
    (dst / "runs" / "events.out").write_bytes(b"\x00\x01 log")
    before = snapshot(dst)
    line = one_error_line(capfd, 2, ["convert", "flax-to-hf", str(flax_dir), str(dst), "--overwrite"])
    assert f"{dst} was not written by apd_jax" in line and "remove it yourself or choose another" in line
    assert snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_overwrite_replaces_what_apd_jax_wrote_and_nothing_else(flax_dir, tmp_path, capfd):
    dst = tmp_path / "hf"
    assert main(["convert", "flax-to-hf", str(flax_dir), str(dst)]) == 0
    manifest = json.loads((dst / WRITTEN_MANIFEST).read_text())
    assert manifest["writer"] == "apd_jax" and "model.safetensors" in manifest["files"]
    (dst / "model.safetensors").write_bytes(b"stale")  # apd_jax's own file: replaced
    assert main(["convert", "flax-to-hf", str(flax_dir), str(dst), "--overwrite"]) == 0
    assert (dst / "model.safetensors").stat().st_size > 5
    (dst / "runs").mkdir()
    (dst / "runs" / "log.txt").write_text("mine")
    (dst / "notes.md").write_text("mine too")
    capfd.readouterr()
    line = one_error_line(capfd, 2, ["convert", "flax-to-hf", str(flax_dir), str(dst), "--overwrite"])
    assert "holds files apd_jax did not write (notes.md, runs)" in line
    assert (dst / "runs" / "log.txt").read_text() == "mine" and (dst / "notes.md").read_text() == "mine too"


def test_an_existing_output_names_the_cli_flag(flax_dir, tmp_path, capfd):
    (tmp_path / "hf").mkdir()
    line = one_error_line(capfd, 2, ["convert", "flax-to-hf", str(flax_dir), str(tmp_path / "hf")])
    assert "already exists; choose another output directory, or pass --overwrite" in line


def test_overwrite_replaces_an_empty_folder(flax_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    assert main(["convert", "flax-to-hf", str(flax_dir), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- Ctrl-C


def interrupt_after(monkeypatch, count):
    """Ctrl-C, as the terminal sends it (SIGINT to the process), once `count` parameters were read
    by hf-to-flax's writer thread; the reader pauses so the main thread handles it mid-write."""
    real, calls = checkpoint._host_param, []

    def read(*args):
        calls.append(1)
        if len(calls) == count:
            os.kill(os.getpid(), signal.SIGINT)  # to the process: the main thread takes it
            import time

            time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(checkpoint, "_host_param", read)
    return calls


@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_during_hf_to_flax_leaves_nothing_behind(overwrite, src, tmp_path, capfd, monkeypatch):
    dst = tmp_path / "out" / "flax"
    if overwrite:
        assert main(["convert", "hf-to-flax", str(src), str(dst)]) == 0
    else:
        dst.parent.mkdir()
    before, kept = sorted(os.listdir(dst.parent)), snapshot(dst) if overwrite else None
    calls = interrupt_after(monkeypatch, 3)
    capfd.readouterr()
    line = one_error_line(capfd, 130, ["convert", "hf-to-flax", str(src), str(dst)] + ["--overwrite"] * overwrite)
    said = "was left as it was" if overwrite else "was not written"
    assert line == f"apd-jax convert: interrupted; {dst} {said} and nothing was left behind; run the same command " \
                   "again to convert"
    assert 3 <= len(calls) <= 4  # the writer stopped at the next parameter
    assert sorted(os.listdir(dst.parent)) == before
    if overwrite:
        assert snapshot(dst) == kept


def test_ctrl_c_during_flax_to_hf_leaves_nothing_behind(flax_dir, tmp_path, capfd, monkeypatch):
    real, calls = checkpoint._open_orbax_leaf, []

    def open_leaf(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(checkpoint, "_open_orbax_leaf", open_leaf)
    (tmp_path / "out").mkdir()
    line = one_error_line(capfd, 130, ["convert", "flax-to-hf", str(flax_dir), str(tmp_path / "out" / "hf")])
    assert "hf was not written and nothing was left behind" in line
    assert os.listdir(tmp_path / "out") == []


SLOW_CONVERT = """
import sys, time
from apd_jax.checkpoints import orbax as checkpoint
from apd_jax.cli import main
real = checkpoint._host_param
def slow(*args):
    print("reading", flush=True)
    time.sleep(0.5)
    return real(*args)
checkpoint._host_param = slow
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_from_a_terminal_ends_with_one_line(src, tmp_path):
    """A real process and a real SIGINT while orbax writes (its reads slowed by the test only)."""
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "flax"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "--no-compile-cache", "convert", "hf-to-flax",
                             str(src), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "reading"
        proc.stdout.readline()  # the second parameter: orbax is writing the first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.splitlines() == [f"apd-jax convert: interrupted; {dst} was not written and nothing was left behind; "
                                "run the same command again to convert"]
    assert os.listdir(tmp_path / "out") == []


# ----------------------------------------------------------------------------- bad checkpoints


def test_nan_weights_are_one_line(src, tmp_path, capfd):
    tensors = load_file(src / "model.safetensors")
    name = sorted(tensors)[-1]
    tensors[name].reshape(-1)[-1] = np.nan
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "out").mkdir()
    line = one_error_line(capfd, 2, ["convert", "hf-to-flax", str(src), str(tmp_path / "out" / "flax")])
    assert f"tensor '{name}' in {src / 'model.safetensors'} holds NaN or Inf" in line
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("damage", ["delete", "truncate", "metadata"])
def test_damaged_orbax_folder_says_what_is_wrong(damage, flax_dir, tmp_path, capfd):
    broken = shutil.copytree(flax_dir, tmp_path / "broken")
    data = max((broken / "params").glob("ocdbt.process_0/d/*"), key=lambda f: f.stat().st_size)  # surely read
    if damage == "delete":
        data.unlink()
        what = f"files apd_jax wrote there are missing: {data.relative_to(broken)}"
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:10])
        what = "a data file is damaged (truncated or overwritten)"
    else:
        (broken / "params" / "_METADATA").unlink()
        what = f"{broken} is damaged: {broken / 'params' / '_METADATA'} (orbax's list of its arrays) is missing"
    line = one_error_line(capfd, 2, ["convert", "flax-to-hf", str(broken), str(tmp_path / "hf")])
    assert what in line and str(broken) in line, line
    assert line.endswith("convert the checkpoint again from its Hugging Face directory (apd-jax convert hf-to-flax)")
    assert "fused q/k/v" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_each_direction_names_a_checkpoint_of_the_other_kind(qwen_dir, flax_dir, tmp_path, capfd):
    line = one_error_line(capfd, 2, ["convert", "hf-to-flax", str(flax_dir), str(tmp_path / "x")])
    assert f"{flax_dir} is already an apd_jax checkpoint" in line and "no weights" not in line
    line = one_error_line(capfd, 2, ["convert", "flax-to-hf", str(qwen_dir), str(tmp_path / "x")])
    assert f"{qwen_dir} is a Hugging Face checkpoint (safetensors), not an apd_jax one" in line
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- outputs


def test_an_output_under_a_file_is_refused_before_reading(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{not json")  # never read: the output is checked first
    (tmp_path / "file.txt").write_text("mine")
    line = one_error_line(capfd, 2, ["convert", "hf-to-flax", str(src), str(tmp_path / "file.txt" / "out")])
    assert line == (f"apd-jax convert: error: cannot write {tmp_path / 'file.txt' / 'out'}: {tmp_path / 'file.txt'} "
                    "is a file, not a directory; choose another output directory")
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_an_unwritable_output_folder_is_refused_before_reading(tmp_path, capfd):
    src, locked = tmp_path / "src", tmp_path / "locked"
    src.mkdir()
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) may write a 0555 folder")
        line = one_error_line(capfd, 2, ["convert", "hf-to-flax", str(src), str(locked / "out")])
        assert f"cannot write {locked / 'out'}: {locked} is not writable" in line
        assert "choose a writable output directory" in line
    finally:
        locked.chmod(0o755)


def test_converted_folders_take_the_users_umask(src, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["convert", "hf-to-flax", str(src), str(tmp_path / "flax")]) == 0
        assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    for out in ("flax", "hf"):
        assert stat.S_IMODE((tmp_path / out).stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o640


def test_quoted_home_paths_work_on_the_command_line(qwen_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(qwen_dir, tmp_path / "qwen-hf")
    assert main(["convert", "hf-to-flax", "~/qwen-hf", "~/models/qwen"]) == 0
    assert (tmp_path / "models" / "qwen" / "params").is_dir()
    assert main(["convert", "flax-to-hf", "~/models/qwen", "~/models/qwen-hf"]) == 0
    assert (tmp_path / "models" / "qwen-hf" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- config.json


def edited_config(src, **fields):
    cfg = json.loads((src / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    return src / "config.json"


@pytest.mark.parametrize("fields, problem", [
    ({"hidden_size": "64"}, "hidden_size '64' must be an integer >= 1"),
    ({"hidden_size": None}, "required field 'hidden_size' is missing"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3}, "hidden_size 64 is not a multiple of num_attention_heads 3"),
    ({"num_hidden_layers": True}, "num_hidden_layers True must be an integer >= 1"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps '1e-6' must be a number > 0"),
    ({"eos_token_id": [2, "x"]}, "eos_token_id [2, 'x'] must be a token id"),
])
def test_config_problems_name_the_file_and_the_field(fields, problem, src, tmp_path, capfd):
    file = edited_config(src, **fields)
    line = one_error_line(capfd, 2, ["convert", "hf-to-flax", str(src), str(tmp_path / "flax")])
    assert line.startswith(f"apd-jax convert: error: {file}: {problem}"), line
    assert not (tmp_path / "flax").exists()


# ----------------------------------------------------------------------------- load_model


def test_load_model_on_a_file_or_none(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"model.safetensors is a file; expected a checkpoint directory"):
        load_model(tmp_path / "model.safetensors")
    with pytest.raises(TypeError, match=r"load_model\(path=None\): expected a checkpoint directory as a str or Path"):
        load_model(None)
