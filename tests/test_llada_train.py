"""Training on the LLaDA family: the masked-diffusion loss read without Dream's shift, and `apd-jax train
--which llada` writing a LLaDA checkpoint that the published PyTorch code runs as apd_jax does."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import apd_jax.training as T
from apd_jax import ASSETS_DIR
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.cli.app import main
from apd_jax.models.config import tiny_config
from apd_jax.models.llada import LLADA
from apd_jax.models.model import forward_logits, init_model, shift_right
from apd_jax.training.objectives import AR_OBJECTIVE, completion_metrics, objective_for

TINY_LLADA = tiny_config(causal=False, family=LLADA)


def test_llada_diffusion_loss_reads_each_prediction_at_its_own_position():
    model = init_model(TINY_LLADA, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 300, size=(4, 24)), jnp.int32)
    key = jax.random.key(5)
    loss, aux = T.diffusion_loss(model, tokens, key, suffix_prob=0.5)
    noisy, masked, t = T.diffusion_mask(key, tokens, model.cfg.mask_token_id, suffix_prob=0.5)
    hidden, _ = model(noisy)
    weighted = lambda logits: jnp.sum(  # noqa: E731
        optax.softmax_cross_entropy_with_integer_labels(logits, tokens) * masked / t[:, None]) / tokens.size
    np.testing.assert_allclose(loss, weighted(model.logits(hidden)), rtol=1e-5)  # LLaDA: output i predicts i
    assert abs(float(loss) - float(weighted(model.logits(shift_right(hidden))))) > 1e-3  # Dream's reading differs
    np.testing.assert_allclose(forward_logits(model, noisy), model.logits(hidden), atol=1e-6)
    # The completion metrics read the same way: the first masked position's prediction at that position.
    cut = 10
    prompted = jnp.where(jnp.arange(24) >= cut, model.cfg.mask_token_id, tokens)
    first = optax.softmax_cross_entropy_with_integer_labels(forward_logits(model, prompted)[:, cut], tokens[:, cut])
    np.testing.assert_allclose(completion_metrics(model, tokens, cut)["ce@1"], jnp.mean(first), rtol=1e-5)
    assert np.isfinite(float(aux["masked_ce"]))


def test_each_diffusion_family_trains_on_the_diffusion_objective():
    settings = T.TrainSettings()
    assert objective_for(tiny_config(causal=True), settings) is AR_OBJECTIVE
    for cfg in (tiny_config(causal=False), TINY_LLADA):
        assert objective_for(cfg, settings) is not AR_OBJECTIVE
        assert set(objective_for(cfg, settings).noise(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))) == {
            "tokens", "noisy", "masked", "t"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """OUT of `apd-jax train --which llada` on a tiny corpus, two steps of a tiny model."""
    root = tmp_path_factory.mktemp("stdlib")
    for i in range(8):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nclass C{i}:\n    pass\n" * 20)
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--which", "llada", "--out", str(out), "--stdlib", str(root), "--vocab-size", "300",
                 "--llada-hidden", "32", "--llada-layers", "2", "--llada-heads", "4", "--llada-kv-heads", "2",
                 "--llada-intermediate", "64", "--llada-steps", "2", "--batch-size", "4", "--seq-len", "32",
                 "--warmup", "1", "--log-every", "1", "--storage-dtype", "float32", "--seed", "2"]) == 0
    return out


def test_train_llada_writes_a_llada_checkpoint_the_published_code_runs(trained):
    from apd_jax.bench.torch_llada import load_torch_llada

    import torch

    assert sorted(p.name for p in trained.iterdir()) == ["llada", "tokenizer"]  # no pair, no APD check
    config = json.loads((trained / "llada" / "config.json").read_text())
    assert config["model_type"] == "llada" and config["block_type"] == "llama" and config["weight_tying"] is False
    assert (config["d_model"], config["n_layers"], config["n_heads"], config["n_kv_heads"]) == (32, 2, 4, 2)
    assert (config["mask_token_id"], config["eos_token_id"], config["max_sequence_length"]) == (1, 0, 32)
    record = json.loads((trained / "llada" / "training.json").read_text())
    assert record["settings"]["steps"] == 2 and record["settings"]["seed"] == 2
    model = load_model(trained / "llada")
    assert model.cfg.family == LLADA and load_tokenizer(trained / "llada").mask_token == "<|mask|>"
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(2, 20))
    with torch.no_grad():
        theirs = load_torch_llada(trained / "llada")(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward_logits(model, jnp.asarray(tokens, jnp.int32))), theirs, atol=1e-4)


def test_train_filter_trains_in_blocks_on_a_llada_model_and_refuses_a_causal_one(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f1(x):\nclass C2:\ndef f3(x):\n    return\n")
    args = ["train-filter", "--prompts-file", str(prompts), "--max-new-tokens", "8", "--block-length", "4",
            "--batch-size", "2", "--steps", "3", "--holdout", "0.25"]
    assert main([*args, "--drafter", str(trained / "llada"), "--out", str(tmp_path / "filter")]) == 0
    assert "oracle traces:" in capsys.readouterr().out and (tmp_path / "filter" / "filter.json").is_file()
    assert main([*args, "--drafter", str(ASSETS_DIR / "verifier"), "--out", str(tmp_path / "f2")]) == 2
    assert "is a causal qwen2 model: the filter is trained for a diffusion model (Dream or LLaDA)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "f2").exists()
    bad = ["--block-length", "3", "--drafter", str(trained / "llada"), "--out", str(tmp_path / "f3")]
    assert main([*args, *bad]) == 2  # the last --block-length counts; refused before the model loads
    assert "--block-length and --max-new-tokens: block_length=3 must divide max_new_tokens=8" in capsys.readouterr().err


def test_train_llada_interrupted_says_how_to_continue(tmp_path):
    from apd_jax.cli.train import interrupted

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    note = interrupted(SimpleNamespace(out=tmp_path, which="llada"))
    assert note == (f"complete: {tmp_path / 'tokenizer'}; no half-written output was left behind; to continue, run "
                    "the same command with --which llada (an existing OUT/tokenizer is reused)")
