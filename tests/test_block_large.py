"""A block decoder's call of more than continuous.MAX_ROWS prompts runs through that many slots
(blocks.slots), with the outputs of one fixed batch at temperature 0: LLaDA's generate, threshold
decoding, Learn2PD (threshold decoding's path with its filter as the keep rule, whose features read
each row's own answer width) and Fast-dLLM's Dream, with and without a KV cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.diffusion import ThresholdConfig, threshold_generate
from apd_jax.decoding.learn2pd import Filter, Learn2PDConfig, learn2pd_generate
from test_block_slots import llada  # noqa: F401 (a fixture: the tiny random LLaDA)
from test_slots_more import slot_sizes

# Nine ragged prompts (one past the 16-token bucket): more than MAX_ROWS = 4, refilled in three rounds.
LENGTHS = (3, 9, 17, 5, 11, 2, 14, 7, 12)

def learn2pd(model, prompts, config):
    return learn2pd_generate(model, Filter(rngs=nnx.Rngs(0)), prompts, config)


CASES = [
    ("llada", llada_generate, LLaDAConfig(max_new_tokens=16, steps=8, block_length=8)),
    ("llada", threshold_generate, ThresholdConfig(max_new_tokens=16, threshold=0.3, block_length=8, cache="dual")),
    ("dream", dream_block_generate, DreamBlockConfig(max_new_tokens=16, steps=8, block_length=8, cache="dual")),
    ("llada", learn2pd, Learn2PDConfig(max_new_tokens=16, keep_threshold=0.52, block_length=8, cache="dual")),
]


@pytest.mark.parametrize("family, decode, config", CASES,
                         ids=[f"{f}-{type(c).__name__}-{c.cache}" for f, _, c in CASES])
def test_a_call_of_more_prompts_than_max_rows_runs_through_the_slots(request, monkeypatch, family, decode, config):
    """The call through 4 slots gives the fixed batch's tokens, tokens per pass and eos flags, with
    an eos (a token some rows commit) that ends some rows early, so slots free at different passes."""
    model = request.getfixturevalue(family)
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, min(model.cfg.vocab_size, model.cfg.mask_token_id), n).tolist() for n in LENGTHS]
    ran = decode(model, ids, dataclasses.replace(config, eos_token_ids=())).sequences()
    config = dataclasses.replace(config, eos_token_ids=(ran[0][5],))
    sizes = slot_sizes(monkeypatch, len(ids))
    fixed = decode(model, ids, config)
    assert sizes == []  # as many prompts as MAX_ROWS: one fixed batch
    assert fixed.stopped_at_eos.any() and not fixed.stopped_at_eos.all()
    monkeypatch.setattr("apd_jax.decoding.continuous.MAX_ROWS", 4)
    slotted = decode(model, ids, config)
    assert sizes == [4]
    assert slotted.sequences() == fixed.sequences()
    assert [slotted.accepted_per_pass(i) for i in range(len(ids))] == [fixed.accepted_per_pass(i)
                                                                        for i in range(len(ids))]
    assert slotted.stopped_at_eos.tolist() == fixed.stopped_at_eos.tolist()
    assert (slotted.tokens == fixed.tokens).all()  # the same padding after each row's end


def test_dreams_own_sampler_decodes_a_large_call_in_batches_of_max_rows(dream, monkeypatch):
    """Dream's sampler has no slots: more than MAX_ROWS prompts decode in fixed batches of that many,
    greedy outputs the one batch's; a bad prompt is named by its own index before anything decodes."""
    from apd_jax.decoding.diffusion import DiffusionConfig, diffusion_generate

    rng = np.random.default_rng(2)
    ids = [rng.integers(0, dream.cfg.mask_token_id, n).tolist() for n in LENGTHS]
    config = DiffusionConfig(max_new_tokens=16, steps=8, eos_token_ids=())
    whole = diffusion_generate(dream, ids, config)
    monkeypatch.setattr("apd_jax.decoding.continuous.MAX_ROWS", 4)
    parts = diffusion_generate(dream, ids, config)
    assert parts.sequences() == whole.sequences()
    assert (parts.accepted == whole.accepted).all() and parts.passes == 3 * whole.passes  # batches of 4, 4, 1
    with pytest.raises(ValueError, match="prompt 6 "):
        diffusion_generate(dream, ids[:6] + [[dream.cfg.mask_token_id]] + ids[7:], config)
