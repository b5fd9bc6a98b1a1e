"""HF <-> Flax <-> orbax conversion: exact round trips and loud, clean failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from apd_jax.checkpoints import streaming as checkpoint
from apd_jax.checkpoints import (
    CheckpointError, convert_hf_to_orbax, convert_orbax_to_hf, load_hf, load_orbax, model_params,
)
from apd_jax.checkpoints.safetensors import iter_hf_tensors
from apd_jax.models.model import forward_logits
from apd_jax.bench.torch_reference.checkpoints import save_tiny_dream, save_tiny_qwen2

TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 320, size=(1, 50)))


def tensors(path):
    return dict(iter_hf_tensors(path))


@pytest.mark.parametrize("kind", ["qwen", "dream"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_orbax_hf_round_trip_is_bit_exact_in_bf16(kind, sharded, tmp_path):
    import torch

    save = save_tiny_qwen2 if kind == "qwen" else save_tiny_dream
    src = save(tmp_path / "src", seed=3, dtype=torch.bfloat16, sharded=sharded)
    convert_hf_to_orbax(src, tmp_path / "flax")
    restored = load_orbax(tmp_path / "flax")
    assert restored.embed_tokens.embedding[...].dtype == jnp.bfloat16
    convert_orbax_to_hf(tmp_path / "flax", tmp_path / "back")
    a, b = tensors(src), tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint16), b[name].view(np.uint16)), name
    # The round-tripped checkpoint computes exactly what the original does.
    np.testing.assert_array_equal(forward_logits(load_hf(src), TOKENS), forward_logits(load_hf(tmp_path / "back"), TOKENS))


def test_orbax_restore_with_other_dtypes(qwen_dir, tmp_path):
    convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    model = load_orbax(tmp_path / "flax", param_dtype="bfloat16")
    assert model.norm.weight[...].dtype == jnp.bfloat16
    fp32 = forward_logits(load_orbax(tmp_path / "flax"), TOKENS)
    assert np.abs(np.asarray(fp32) - np.asarray(forward_logits(load_hf(qwen_dir), TOKENS))).max() == 0


def test_tensors_read_in_many_blocks_load_exactly(qwen_dir, tmp_path, monkeypatch):
    # Blocks of a few rows, orbax chunks as small: every tensor is read, moved and joined in pieces,
    # as the real models' large ones are.
    want = model_params(load_hf(qwen_dir))
    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 3000)
    convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    for model in (load_hf(qwen_dir), load_orbax(tmp_path / "flax")):
        got = model_params(model)
        assert all(np.array_equal(got[p], want[p]) for p in want)


def test_conversion_is_host_only(qwen_dir, tmp_path, monkeypatch):
    # hf -> orbax only changes the layouts of host tensors: a device array or a compiled program there
    # would start an accelerator's runtime (pinned staging buffers, compilers) for nothing.
    from jax import monitoring

    def refuse(*args, **kwargs):
        raise AssertionError("a conversion used the device")

    for name in ("_device_arrays", "_converter", "_put_block", "_shard_from_block"):
        monkeypatch.setattr(checkpoint, name, refuse)
    monkeypatch.setattr(checkpoint.jax, "device_put", refuse)
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":  # tracing (eval_shape) is fine
            compiled.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert not compiled
    monkeypatch.undo()
    want = model_params(load_hf(qwen_dir))
    got = model_params(load_orbax(tmp_path / "flax"))
    assert all(np.array_equal(got[p], want[p]) for p in want)


@pytest.mark.parametrize("lo, hi, step", [(0, 10, 3), (0, 9, 3), (4, 21, 5), (0, 2, 5), (3, 3, 2), (0, 7, 1)])
def test_even_blocks_cover_the_rows_in_one_shape(lo, hi, step):
    blocks = checkpoint._even_blocks((slice(lo, hi), slice(None)), (hi + 2, 3), step)
    rows = [range(*b[0].indices(hi + 2)) for b in blocks]
    assert sorted(set().union(*rows)) == list(range(lo, hi))
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) <= max(step, hi - lo) and all(b[1] == slice(None) for b in blocks)
    assert len(blocks) == max(1, -(-(hi - lo) // step))
    assert sum(map(len, rows)) - (hi - lo) < len(blocks)  # the last block overlaps by fewer rows than there are blocks


def test_tensors_read_in_many_blocks_load_into_shards():
    # The same on a mesh of 8 virtual devices (a fresh process: jax has started here with one device).
    tests = Path(__file__).parent
    code = (f"import sys; sys.path.insert(0, {str(tests)!r}); import sharded_checks; "
            "from apd_jax.checkpoints import streaming as checkpoint; "
            "checkpoint.READ_CHUNK_BYTES = 3000; sharded_checks.hf_loads_into_shards(); "
            "sharded_checks.orbax_restores_into_shards()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(path, edit):
    from safetensors.numpy import save_file

    t = tensors(path)
    edit(t)
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_config_names_the_file(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(d)


def test_wrong_model_type(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text()) | {"model_type": "llama"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        load_hf(d)


def test_missing_weights(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf(d)


def test_missing_tensor_is_named(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf(d)


def test_misshaped_tensor_is_named(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    rewrite_tensors(d, edit)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight'.*shape \(8, 64\).*\(32, 64\)"):
        load_hf(d)


def test_unknown_tensor_is_named(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    rewrite_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": np.zeros(4, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.rotary.inv_freq'"):
        load_hf(d)


def test_config_that_does_not_match_the_weights(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text()) | {"num_hidden_layers": 3}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors.*model.layers.2"):
        load_hf(d)


def test_failed_conversion_leaves_no_output(qwen_dir, tmp_path):
    d = copy(qwen_dir, tmp_path / "c")
    rewrite_tensors(d, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError):
        convert_hf_to_orbax(d, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [d]


def test_existing_output_is_not_overwritten_silently(qwen_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_hf_to_orbax(qwen_dir, tmp_path / "out")


def test_orbax_checkpoint_of_another_layout_is_named(qwen_dir, tmp_path):
    # An orbax checkpoint from before the fused projections: separate gate and up kernels.
    import orbax.checkpoint as ocp

    convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore((tmp_path / "flax" / "params").absolute())
        mlp = params["layers"]["0"]["mlp"]
        gate_up = np.asarray(mlp.pop("gate_up_proj")["kernel"])
        mlp["gate_proj"], mlp["up_proj"] = {"kernel": gate_up[:, 0]}, {"kernel": gate_up[:, 1]}
        (tmp_path / "old").mkdir()
        shutil.copy(tmp_path / "flax" / "config.json", tmp_path / "old" / "config.json")
        ckptr.save((tmp_path / "old" / "params").absolute(), params)
    message = r"unexpected \['layers.0.mlp.gate_proj.kernel'.*missing \['layers.0.mlp.gate_up_proj.kernel'\].*converted again"
    with pytest.raises(CheckpointError, match=message):
        load_orbax(tmp_path / "old")


def test_orbax_config_that_does_not_match_the_weights(qwen_dir, tmp_path):
    # The saved leaves keep their shapes: a config.json edited after conversion must not load them as another model.
    convert_hf_to_orbax(qwen_dir, tmp_path / "flax")
    cfg = json.loads((tmp_path / "flax" / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (tmp_path / "flax" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_orbax(tmp_path / "flax")
    message = str(err.value)
    assert str(tmp_path / "flax") in message and "mlp" in message and "config.json does not match" in message
    assert "convert" in message
    assert str(cfg["intermediate_size"]) in message and str(cfg["intermediate_size"] - 8) in message
