"""LLaDA through its family description: float32 logits against the published modeling code
(apd_jax.bench.llada_published), conversions and export bit-exact, config.json read and written,
sharded loading, and clear errors for configs apd_jax does not run."""

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from apd_jax.bench.torch_llada import load_torch_llada, save_tiny_llada  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from apd_jax.checkpoints import (  # noqa: E402
    CheckpointError, convert_hf_to_orbax, convert_orbax_to_hf, expected_shapes, export_hf, load_hf, load_model, model_params,
    read_config,
)
from apd_jax.checkpoints.safetensors import iter_hf_tensors  # noqa: E402
from apd_jax.models.config import ModelConfig, config_problems, llada_8b_config  # noqa: E402
from apd_jax.models.llada import LLADA  # noqa: E402
from apd_jax.models.model import forward_logits, token_logprobs  # noqa: E402

TOKENS = np.random.default_rng(1).integers(0, 300, size=(1, 200))

SHAPES = {
    "gqa": dict(n_kv_heads=2),  # 4 query heads share 2 KV heads
    "mha, tied head": dict(n_kv_heads=4, weight_tying=True),
}


@pytest.fixture(scope="module")
def llada_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llada")
    return {name: save_tiny_llada(root / name.replace(", ", "-"), seed=3, **kw) for name, kw in SHAPES.items()}


def published_logits(path, tokens=TOKENS):
    with torch.no_grad():
        return load_torch_llada(path)(torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_the_published_model_in_float32(shape, llada_dirs, capsys):
    model = load_model(llada_dirs[shape])
    assert model.cfg.family is LLADA and model.cfg.vocab_size == 384  # the padded embedding's rows
    ours = np.asarray(forward_logits(model, jnp.asarray(TOKENS)))
    want = published_logits(llada_dirs[shape])
    with capsys.disabled():
        print(f"\n[fp32 llada {shape}] |ours - published| {np.abs(ours - want).max():.2e} "
              f"(logit scale {np.abs(want).max():.1f})")
    assert ours.shape == want.shape == (1, 200, 384)
    assert np.abs(ours - want).max() < 1e-4
    # LLaDA reads its prediction for position i at output i: no Dream-style shift anywhere.
    logp, _ = token_logprobs(model, jnp.asarray(TOKENS), jnp.asarray(TOKENS))
    want_logp = np.take_along_axis(torch.log_softmax(torch.as_tensor(want), -1).numpy(), TOKENS[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-4)


def test_config_is_read_from_llada_fields(llada_dirs):
    cfg = read_config(llada_dirs["gqa"])
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (64, 2, 4, 2, 16)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (128, 384, 500000.0, 1e-5)
    assert (cfg.mask_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (290, (2,), 2)
    assert not cfg.causal and cfg.model_type == "llada" and not cfg.tie_word_embeddings
    assert read_config(llada_dirs["mha, tied head"]).tie_word_embeddings


@pytest.mark.parametrize("cfg", [llada_8b_config(), llada_8b_config(num_kv_heads=8, tie_word_embeddings=True)])
def test_to_hf_dict_is_the_inverse_of_from_hf_dict(cfg):
    config, generation = (json.loads(json.dumps(d)) for d in cfg.to_hf_dict())
    assert config["model_type"] == "llada" and config["block_type"] == "llama"
    assert ModelConfig.from_hf_dict(config, generation) == cfg
    # param_count (no q/k/v biases in LLaDA) counts what the module holds.
    assert cfg.param_count() == sum(math.prod(s.shape) for s in expected_shapes(cfg).values())


def test_a_written_config_runs_in_the_published_code(llada_dirs, tmp_path):
    # config.json from ModelConfig.to_hf_dict beside the exported weights: the published code builds
    # the same model from it.
    src = llada_dirs["gqa"]
    (tmp_path / "cfg").mkdir()
    config, generation = read_config(src).to_hf_dict()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    (tmp_path / "cfg" / "generation_config.json").write_text(json.dumps(generation))
    export_hf(model_params(load_hf(src)), tmp_path / "cfg", tmp_path / "hf")
    np.testing.assert_array_equal(published_logits(tmp_path / "hf"), published_logits(src))


def tensors(path):
    return dict(iter_hf_tensors(path))


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_orbax_hf_round_trip_is_bit_exact_in_bf16(sharded, tmp_path):
    src = save_tiny_llada(tmp_path / "src", seed=4, dtype=torch.bfloat16, sharded=sharded)
    assert (src / "model.safetensors.index.json").is_file() == sharded
    convert_hf_to_orbax(src, tmp_path / "flax")
    restored = load_model(tmp_path / "flax")
    assert restored.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert "layers.0.self_attn.qkv_proj.bias" not in model_params(restored)  # LLaDA has no q/k/v bias
    for back, write in (("back", lambda out: convert_orbax_to_hf(tmp_path / "flax", out)),
                        ("exported", lambda out: export_hf(model_params(restored), src, out))):
        write(tmp_path / back)
        a, b = tensors(src), tensors(tmp_path / back)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint16), b[name].view(np.uint16))
        assert json.loads((tmp_path / back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # The round-tripped checkpoint computes exactly what the original does, here and in the published code.
    np.testing.assert_array_equal(forward_logits(load_hf(src), jnp.asarray(TOKENS)),
                                  forward_logits(load_hf(tmp_path / "back"), jnp.asarray(TOKENS)))
    np.testing.assert_array_equal(published_logits(src), published_logits(tmp_path / "back"))


@pytest.mark.parametrize("edit, error", [
    (lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"),
     r"is missing tensors \['model.transformer.blocks.1.up_proj.weight'\]"),
    (lambda t: t.update({"model.transformer.ln_f.weight": np.ones(63, np.float32)}),
     r"tensor 'model.transformer.ln_f.weight' in .* has shape \(63,\), but config.json implies \(64,\)"),
])
def test_a_damaged_checkpoint_names_the_tensor(edit, error, llada_dirs, tmp_path):
    # The same checks and errors as every family's: the converter reads LLaDA's names from its table.
    bad = tmp_path / "bad"
    shutil.copytree(llada_dirs["gqa"], bad)
    state = tensors(bad)
    edit(state)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=error):
        load_model(bad)
    with pytest.raises(CheckpointError, match=error):
        convert_hf_to_orbax(bad, tmp_path / "flax")
    assert not (tmp_path / "flax").exists()


def test_bfloat16_load_runs_in_bfloat16(llada_dirs):
    fp32 = np.asarray(forward_logits(load_model(llada_dirs["gqa"]), jnp.asarray(TOKENS)))
    model = load_model(llada_dirs["gqa"], param_dtype="bfloat16")
    assert model.layers[0].mlp.gate_up_proj.kernel[...].dtype == jnp.bfloat16
    bf16 = np.asarray(forward_logits(model, jnp.asarray(TOKENS)))
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.9


_SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from apd_jax.checkpoints import convert_hf_to_orbax, load_model
    from apd_jax.models.model import forward_logits
    from apd_jax.models.sharding import make_mesh
    src, tmp = sys.argv[1], sys.argv[2]
    tokens = np.random.default_rng(1).integers(0, 300, size=(2, 64))
    want = np.asarray(forward_logits(load_model(src), tokens))
    convert_hf_to_orbax(src, tmp)
    mesh = make_mesh(2, 2)
    for path in (src, tmp):
        model = load_model(path, mesh=mesh)
        for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name = ".".join(map(str, key))
            value, spec = var.get_value(), model.cfg.family.param(name).spec
            assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), (name, spec)
        got = np.asarray(forward_logits(model, tokens))
        assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
    print("ok")
""")


def test_loads_into_the_shards_of_a_mesh(llada_dirs, tmp_path):
    """HF and orbax LLaDA checkpoints read straight into a (data=2, model=2) mesh of virtual CPU
    devices (a fresh process: the device count is fixed when jax starts), placed by LLaDA's table."""
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(llada_dirs["gqa"]), str(tmp_path / "flax")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("fields, problem", [
    ({"block_type": "sequential"}, "block_type 'sequential': apd_jax runs LLaDA's block_type 'llama' only"),
    ({"block_type": None}, "block_type is missing (the published code then uses 'sequential')"),
    ({"layer_norm_type": "default"}, "layer_norm_type 'default': apd_jax runs LLaDA's layer_norm_type 'rms' only"),
    ({"include_qkv_bias": True}, "include_qkv_bias True: apd_jax runs LLaDA without these biases"),
    ({"alibi": True}, "alibi True: apd_jax runs LLaDA's alibi False only"),
    ({"rope": False}, "rope False: apd_jax runs LLaDA's rope True only"),
    ({"activation_type": "swiglu"}, "activation_type 'swiglu': apd_jax runs LLaDA's activation_type 'silu' only"),
    ({"weight_tying": "no"}, "weight_tying 'no' must be true or false"),
    ({"d_model": None}, "required field 'd_model' is missing"),
    ({"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ({"embedding_size": 256}, "embedding_size 256 is smaller than vocab_size 300"),
    ({"multi_query_attention": True}, "n_kv_heads 2 contradicts multi_query_attention True"),
])
def test_config_problems_name_the_file_and_the_field(fields, problem, llada_dirs, tmp_path):
    src = llada_dirs["gqa"]
    cfg = json.loads((src / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    assert any(p.startswith(problem) for p in config_problems(cfg)), config_problems(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: .*{re.escape(problem)}"):
        read_config(tmp_path)
