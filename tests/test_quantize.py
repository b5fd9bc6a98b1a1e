"""8-bit weights (apd_jax.models.quantize): the quantized model against its float self, the
decoders on it, saving and loading, the command-line options and their errors.

Tolerances. A weight-only model computes exactly what a float model holding the dequantized
weights computes (float32 rounding: 1e-5). Against the unquantized model the logits differ by
the rounding of the weights: int8 rounds each weight to within half a step, the step being its
output channel's largest |weight| / 127 (about 2.5 standard deviations over 64 Gaussian weights),
an rms error near 0.6% of a weight's size; e4m3 keeps 3 mantissa bits, a relative error of up to
6% (about 3.6% rms). Through a tiny model of Hugging Face's initialisation (normal(0.02)), its
seven projections in series and its head, these come to about 1% (int8) and 5% (fp8) of the
logits' norm: bounded at 3% and 10%. (The torch-made fixtures' weights, of standard deviation 0.3,
make attention sharp enough to amplify any error several times; they test exactness only.)
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MASK, PROMPTS, last_error_line, run_cli

from apd_jax.checkpoints import (
    CheckpointError, convert_hf_to_orbax, convert_orbax_to_hf, load_model, model_from_params, model_params, save_orbax,
)
from apd_jax.checkpoints.orbax import QUANTIZATION_FIELD
from apd_jax.decoding.apd import APDConfig, apd_generate
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.models.config import tiny_config
from apd_jax.models.model import forward_logits, init_model
from apd_jax.models.quantize import MODES, quantization, quantize

TOKENS = jnp.asarray([PROMPTS[2]])
LIMIT = {"int8": 0.03, "fp8": 0.10, "fp8-weights": 0.10}


def relative(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def dequantized(model):
    """The float model holding a weight-only quantized model's weights, dequantized."""
    params, quantized = {}, model_params(model)
    for path, value in quantized.items():
        if path.endswith(".scale"):
            continue
        if path.endswith(".qvalue"):
            scale = quantized[path.removesuffix("qvalue") + "scale"]
            path, value = path.removesuffix(".qvalue").removesuffix(".array"), value.astype(np.float32) * scale
        params[path] = value
    return model_from_params(model.cfg, params)


@pytest.fixture(scope="module")
def pair():
    """A Dream drafter (untied head) and a Qwen2 verifier (tied head: the embedding quantized with it)."""
    return init_model(tiny_config(causal=False), 1), init_model(tiny_config(causal=True), 2)


@pytest.fixture(scope="module")
def quantized(pair):
    """quantized(i, mode): pair[i] quantized with mode, made once."""
    return functools.cache(lambda index, mode: quantize(pair[index], mode))


@pytest.fixture(scope="module")
def int8_pair(quantized):
    return quantized(0, "int8"), quantized(1, "int8")


@pytest.mark.parametrize("mode", MODES)
def test_logits_close_to_the_float_models(pair, quantized, mode):
    for index, model in enumerate(pair):
        quantized_model = quantized(index, mode)
        assert quantization(quantized_model) == mode and quantization(model) is None
        error = relative(forward_logits(model, TOKENS), forward_logits(quantized_model, TOKENS))
        assert 1e-4 < error < LIMIT[mode], (model.cfg.model_type, error)


@pytest.mark.parametrize("mode", ["int8", "fp8-weights"])
def test_weight_only_is_the_float_model_of_the_dequantized_weights(pair, quantized, mode):
    for index, model in enumerate(pair):
        quantized_model = quantized(index, mode)
        params = model_params(quantized_model)
        kernel = "layers.0.mlp.down_proj.kernel.array."
        head = "embed_tokens.embedding." if model.cfg.tie_word_embeddings else "lm_head."
        assert params[kernel + "qvalue"].dtype == jnp.dtype(MODES[mode].weights) == params[head + "qvalue"].dtype
        assert params[kernel + "scale"].shape == (1, model.cfg.hidden_size)  # one scale per output channel
        if mode == "int8":  # each weight within half a step of its value
            step = params[kernel + "scale"]
            original = model_params(model)["layers.0.mlp.down_proj.kernel"]
            assert np.all(np.abs(params[kernel + "qvalue"] * step - original) <= step * (0.5 + 1e-5))
        float_self = dequantized(quantized_model)
        np.testing.assert_allclose(forward_logits(quantized_model, TOKENS), forward_logits(float_self, TOKENS),
                                   rtol=1e-5, atol=1e-5)


def test_decoders_run_unchanged(int8_pair):
    drafter, verifier = int8_pair
    apd = APDConfig(R=0.7, W=4, M=8, max_new_tokens=8, eos_token_ids=())
    # Greedy APD on the quantized pair decodes as on the float pair of the dequantized weights.
    ours = apd_generate(drafter, verifier, PROMPTS, apd)
    assert ours.sequences() == apd_generate(dequantized(drafter), dequantized(verifier), PROMPTS, apd).sequences()
    assert [len(s) for s in ar_generate(verifier, PROMPTS, ARConfig(max_new_tokens=4, eos_token_ids=())).sequences()] \
        == [4, 4, 4]
    blocks = DreamBlockConfig(max_new_tokens=8, block_length=4, threshold=0.9, cache="dual", eos_token_ids=())
    assert all(len(s) == 8 and MASK not in s for s in dream_block_generate(drafter, PROMPTS, blocks).sequences())


def test_save_load_and_convert_round_trip(tmp_path, int8_pair, qwen_dir, qwen):
    for quantized in int8_pair:
        saved = save_orbax(quantized, tmp_path / quantized.cfg.model_type, quantized.cfg.to_hf_dict()[0])
        assert json.loads((saved / "config.json").read_text())[QUANTIZATION_FIELD] == "int8"
        loaded = load_model(saved)
        want, got = model_params(quantized), model_params(loaded)
        assert sorted(want) == sorted(got) and all(
            got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]) for p in want)
        assert np.array_equal(forward_logits(loaded, TOKENS), forward_logits(quantized, TOKENS))
        assert quantization(load_model(saved, quantize="int8")) == "int8"  # naming the stored mode is no error
    # A Hugging Face checkpoint converted one parameter at a time, or quantized at load: the same weights.
    want = model_params(quantize(qwen, "fp8"))
    converted = load_model(convert_hf_to_orbax(qwen_dir, tmp_path / "converted", quantize="fp8"))
    for model in (converted, load_model(qwen_dir, quantize="fp8")):
        got = model_params(model)
        assert quantization(model) == "fp8" and sorted(got) == sorted(want)
        assert all(got[p].dtype == want[p].dtype and np.array_equal(got[p], want[p]) for p in want)


def test_errors(tmp_path, qwen_dir, qwen, int8_pair):
    verifier = int8_pair[1]
    with pytest.raises(ValueError, match=r"quantize='int4': use one of int8, fp8, fp8-weights"):
        quantize(qwen, "int4")
    with pytest.raises(ValueError, match=r"quantize='int4'"):
        load_model(qwen_dir, quantize="int4")
    with pytest.raises(ValueError, match=r"quantized already \(int8\)"):
        quantize(verifier, "int8")
    saved = save_orbax(verifier, tmp_path / "saved", verifier.cfg.to_hf_dict()[0])
    with pytest.raises(ValueError, match=r"holds int8 weights .* load it without quantize"):
        load_model(saved, quantize="fp8")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"holds int8 weights, which load onto one device"):
        load_model(saved, mesh=mesh)
    with pytest.raises(ValueError, match=r"a quantized model runs on one device"):
        load_model(qwen_dir, quantize="int8", mesh=mesh)
    with pytest.raises(CheckpointError, match=r"holds int8 weights .* export the checkpoint it was converted from"):
        convert_orbax_to_hf(saved, tmp_path / "hf")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {QUANTIZATION_FIELD: "int4"}))
    with pytest.raises(CheckpointError, match=rf"{QUANTIZATION_FIELD} 'int4' is none of int8, fp8, fp8-weights"):
        load_model(saved)


def test_command_line(tmp_path, qwen_dir, capsys):
    dst = tmp_path / "q"
    assert run_cli(["convert", "hf-to-flax", str(qwen_dir), str(dst), "--quantize", "fp8"]) == 0
    assert quantization(load_model(dst)) == "fp8"
    assert run_cli(["convert", "hf-to-flax", str(qwen_dir), str(tmp_path / "x"), "--quantize", "int4"]) == 2
    assert "argument --quantize: invalid choice: 'int4'" in last_error_line(capsys)
    assert run_cli(["convert", "flax-to-hf", str(dst), str(tmp_path / "hf"), "--quantize", "int8"]) == 2
    assert "--quantize quantizes an hf-to-flax conversion" in last_error_line(capsys)
    assert run_cli(["convert", "flax-to-hf", str(dst), str(tmp_path / "hf")]) == 2
    assert "holds fp8 weights" in last_error_line(capsys)
    assert run_cli(["generate", "--random-tiny", "--ids", "1 2 3", "--quantize", "int8", "--mesh", "data=1"]) == 2
    assert "--quantize runs the models on one device" in last_error_line(capsys)
    assert run_cli(["bench", "--torch", "--quantize", "int8"]) == 2
    assert "drop --quantize" in last_error_line(capsys)
    assert run_cli(["bench", "--quality", "2", "--workload", "4"]) == 2
    assert "--quality decodes held-out prompts instead of timing" in last_error_line(capsys)


def test_generate_and_bench_quantize_their_models(monkeypatch, capsys, pair):
    import argparse

    from apd_jax.bench import decoders
    from apd_jax.cli import bench, generate

    asked = []

    def loading(path, **options):
        asked.append(options["quantize"])
        raise ValueError("stopped after the first load")

    monkeypatch.setattr(generate, "load_model", loading)
    assert run_cli(["generate", "--ids", "1 2 3", "--quantize", "fp8-weights"]) == 2
    assert asked == ["fp8-weights"] and "stopped after the first load" in last_error_line(capsys)
    differences = {}
    model = bench._quantized(pair[1], "verifier", argparse.Namespace(quantize="int8", prompt_len=8), differences)
    assert quantization(model) == "int8"
    assert differences["verifier"] == pytest.approx(decoders.logits_difference(pair[1], model, 8))
    assert f"verifier (qwen2) logits, int8 vs unquantized weights: relative difference {differences['verifier']:.2e}" \
        in capsys.readouterr().out
