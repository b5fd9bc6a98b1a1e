"""ModelConfig <-> Hugging Face config.json / generation_config.json."""

import json

import jax
import jax.numpy as jnp
import pytest

from apd_jax.models.config import (
    DRAFTER_SIZE,
    VERIFIER_SIZE,
    ModelConfig,
    dream_7b_config,
    qwen25_05b_config,
    tiny_config,
)

CONFIGS = {
    "embedded drafter": DRAFTER_SIZE.config(causal=False, vocab_size=4096, max_len=512, param_dtype=jnp.float32,
                                            dtype=jnp.float32),
    "embedded verifier": VERIFIER_SIZE.config(causal=True, vocab_size=4096, max_len=512, param_dtype=jnp.bfloat16,
                                              dtype=jnp.bfloat16),
    "dream 7b": dream_7b_config(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16),
    "qwen2.5 0.5b": qwen25_05b_config(),
    "tiny drafter": tiny_config(causal=False),
    "two eos ids, no pad": tiny_config(causal=True, eos_token_ids=(2, 5), pad_token_id=None),
    "no eos": tiny_config(causal=True, eos_token_ids=(), pad_token_id=None),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_to_hf_dict_is_the_inverse_of_from_hf_dict(name):
    cfg = CONFIGS[name]
    config, generation = cfg.to_hf_dict()
    # What is written is plain JSON, read back as a checkpoint directory's files are.
    config, generation = json.loads(json.dumps(config)), json.loads(json.dumps(generation))
    assert ModelConfig.from_hf_dict(config, generation) == cfg
    assert config["model_type"] == ("qwen2" if cfg.causal else "Dream")


def test_storage_dtype_is_what_the_weights_are_read_as():
    cfg = CONFIGS["embedded drafter"]
    config, generation = cfg.to_hf_dict("bfloat16")
    assert config["torch_dtype"] == "bfloat16"
    assert ModelConfig.from_hf_dict(config, generation).param_dtype == jnp.bfloat16
    assert ModelConfig.from_hf_dict(config, generation, param_dtype="float32") == cfg


def test_param_count_matches_the_initialised_model():
    from flax import nnx

    from apd_jax.models.model import init_model

    for causal in (False, True):
        cfg = tiny_config(causal=causal)
        state = nnx.state(init_model(cfg, 0), nnx.Param)
        assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(state))


def test_eos_ids_are_every_one_both_files_declare():
    cfg, _ = qwen25_05b_config().to_hf_dict()
    both = ModelConfig.from_hf_dict(cfg | {"eos_token_id": 151643}, {"eos_token_id": [151645, 151643]})
    assert both.eos_token_ids == (151645, 151643)
    assert ModelConfig.from_hf_dict(cfg | {"eos_token_id": 151643}, {"eos_token_id": 151645}).eos_token_ids == (
        151645, 151643)
    assert ModelConfig.from_hf_dict(cfg | {"eos_token_id": None}, {}).eos_token_ids == ()
