"""bench_load: the real configs it makes checkpoints of, and one run of its steps on tiny checkpoints."""

import json

import jax
import pytest

from apd_jax.bench.load import REAL_CONFIGS, main, make_random
from apd_jax.checkpoints import expected_shapes, load_hf
from apd_jax.models.config import ModelConfig, dream_7b_config, qwen25_05b_config


@pytest.mark.parametrize("name, preset", [("dream-7b", dream_7b_config), ("qwen2.5-0.5b", qwen25_05b_config)])
def test_real_configs_have_the_presets_shapes(name, preset):
    ours = expected_shapes(ModelConfig.from_hf_dict(REAL_CONFIGS[name]))
    want = expected_shapes(preset(param_dtype="bfloat16"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}


TINY = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "max_position_embeddings": 512, "rope_theta": 1e4, "rms_norm_eps": 1e-6}


def test_random_checkpoint_is_finite_sharded_and_loads(tmp_path):
    path = make_random(tmp_path / "r", TINY, max_shard_size=40_000)
    assert (path / "model.safetensors.index.json").is_file()
    leaves = jax.tree.leaves(jax.tree.map(lambda x: bool(jax.numpy.isfinite(x).all()), load_hf(path)))
    assert leaves and all(leaves)


def test_main_converts_and_loads_a_pair(tmp_path, capsys):
    dirs = [make_random(tmp_path / n, TINY | extra) for n, extra in (("a", {}), ("b", {"num_hidden_layers": 3}))]
    assert main([*map(str, dirs), "--work", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")]) == 0
    steps = json.loads((tmp_path / "out.json").read_text())
    assert [s["step"] for s in steps] == ["baseline", "convert", "convert", "load-hf", "load-orbax"]
    assert all(s["peak_rss"] >= s["baseline_rss"] > 0 and s["seconds"] >= 0 for s in steps)
    assert set(steps[-1]["each_s"]) == {str(tmp_path / "work" / f"{n}.apd_jax") for n in "ab"}
    assert "load-orbax" in capsys.readouterr().out
