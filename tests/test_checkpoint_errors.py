"""Bad checkpoints are CheckpointErrors naming the file and what is wrong; `~` paths, progress and
quiet loading."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from apd_jax import ASSETS_DIR
from apd_jax import checkpoints as checkpoint
from apd_jax.checkpoints import (
    CheckpointError, convert_hf_to_orbax, load_hf, load_model, load_tokenizer, model_params,
)
from apd_jax.bench.torch_reference.checkpoints import save_tiny_dream


@pytest.fixture
def sharded(tmp_path):
    return save_tiny_dream(tmp_path / "dream", seed=4, sharded=True)


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


def assert_fails_and_writes_nothing(path, tmp_path, message):
    with pytest.raises(CheckpointError, match=message):
        load_hf(path)
    with pytest.raises(CheckpointError, match=message):
        convert_hf_to_orbax(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_truncated_shard_names_the_file(sharded, tmp_path):
    shard = shards(sharded)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_fails_and_writes_nothing(sharded, tmp_path, f"{shard} is not a readable safetensors file.*truncated")


def test_garbage_shard_names_the_file(sharded, tmp_path):
    shard = shards(sharded)[0]
    shard.write_bytes(b"not a safetensors file" * 4)
    assert_fails_and_writes_nothing(sharded, tmp_path, f"{shard} is not a readable safetensors file")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_malformed_json_names_the_file(name, sharded, tmp_path):
    (sharded / name).write_text('{"vocab_size": 336,')
    assert_fails_and_writes_nothing(sharded, tmp_path, f"{sharded / name} is not valid JSON")


def test_json_that_is_not_an_object_names_the_file(sharded, tmp_path):
    (sharded / "config.json").write_text("[1, 2]")
    assert_fails_and_writes_nothing(sharded, tmp_path, "config.json holds a JSON list, expected an object")


def test_index_that_maps_a_tensor_to_the_wrong_shard(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first, last = shards(sharded)[0].name, shards(sharded)[-1].name
    name = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][name] = last
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails_and_writes_nothing(sharded, tmp_path, f"maps '{name}' to {last}, which does not hold it")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_non_finite_weights_are_named(bad, dtype, sharded, tmp_path):
    shard = shards(sharded)[0]
    tensors = {k: v.astype(dtype) for k, v in iter_hf_tensors_of(shard).items()}
    name = sorted(tensors)[-1]
    tensors[name].reshape(-1)[-1] = bad
    save_file(tensors, shard, metadata={"format": "pt"})
    for other in shards(sharded)[1:]:  # one dtype throughout, as config.json says
        save_file({k: v.astype(dtype) for k, v in iter_hf_tensors_of(other).items()}, other, metadata={"format": "pt"})
    assert_fails_and_writes_nothing(sharded, tmp_path, f"tensor '{name}' in {shard} holds NaN or Inf")


def iter_hf_tensors_of(file):
    from safetensors import safe_open

    with safe_open(file, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_home_paths_are_expanded(qwen_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(qwen_dir, tmp_path / "apd" / "qwen-hf")
    convert_hf_to_orbax("~/apd/qwen-hf", "~/apd/qwen")
    assert (tmp_path / "apd" / "qwen" / "params").is_dir()
    a, b = model_params(load_model("~/apd/qwen")), model_params(load_model("~/apd/qwen-hf"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    shutil.copytree(ASSETS_DIR / "drafter", tmp_path / "apd" / "drafter")
    assert load_tokenizer("~/apd/drafter").encode("def f") == load_tokenizer(ASSETS_DIR / "drafter").encode("def f")


def test_no_progress_bar_when_not_a_terminal_or_small(qwen_dir, capfd, monkeypatch):
    load_hf(qwen_dir)
    monkeypatch.setattr("apd_jax.checkpoints.streaming.PROGRESS_MIN_BYTES", 0)
    load_hf(qwen_dir)  # pytest's stderr is not a terminal
    assert capfd.readouterr().err == ""


def test_progress_bar_on_a_terminal(qwen_dir, capfd, monkeypatch):
    monkeypatch.setattr("apd_jax.checkpoints.streaming.PROGRESS_MIN_BYTES", 0)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then takes stderr for a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    monkeypatch.setattr("apd_jax.utils.progress._is_tty", lambda stream: True)  # and so does apd_jax.utils.progress
    load_hf(qwen_dir)
    assert f"loading {qwen_dir.name}" in capfd.readouterr().err


def test_loading_a_dream_tokenizer_prints_no_transformers_warning(capfd):
    tok = load_tokenizer(ASSETS_DIR / "drafter")
    assert tok.encode("def f(x):") and capfd.readouterr().err == ""


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_damaged_orbax_leaf_names_the_checkpoint_and_the_leaf(damage, qwen_dir, tmp_path):
    checkpoint.convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    data = sorted((tmp_path / "flax" / "params").glob("ocdbt.process_*/d/*"))
    assert data
    for f in data:
        if damage == "delete":
            f.unlink()
        else:
            f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))
    # a deleted file apd_jax wrote is named before orbax reads anything; a damaged one when it is read
    failure = "flax is damaged: files apd_jax wrote there are missing: params/" if damage == "delete" else (
        r"flax/params: reading '[a-z_.0-9]+' failed ")
    with pytest.raises(CheckpointError, match=failure + ".*convert the checkpoint again"):
        checkpoint.load_orbax(tmp_path / "flax")
