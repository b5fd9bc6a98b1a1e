"""APD's core over arrays inside a user's own jax.jit: the models' params are arguments, not constants."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from apd_jax.decoding.apd import APDConfig, apd_core, apd_generate
from apd_jax.decoding.generation import pad_prompts
from conftest import PROMPTS

CFG = APDConfig(R=0.7, W=3, M=6, max_new_tokens=12, eos_token_ids=())


def test_the_core_runs_inside_a_users_jit_and_new_params_reuse_its_program(dream, qwen):
    core, params = apd_core(dream, qwen, CFG, prompt_len=16)
    ids, lengths = pad_prompts(PROMPTS, 16)

    @jax.jit
    def rollout(params, ids, lengths, key):  # a user's step: generation with the current params
        tokens, n, accepted, _ = core(params, ids, lengths, key, budgets=np.asarray([12, 5, 12]))
        return tokens, n, accepted

    def check(params, verifier):
        tokens, n, accepted = rollout(params, ids, lengths, jax.random.key(0))
        for row, prompt in enumerate(PROMPTS):
            budget = 5 if row == 1 else 12
            alone = apd_generate(dream, verifier, [prompt], dataclasses.replace(CFG, max_new_tokens=budget))
            assert tokens[row, : n[row]].tolist() == alone.sequences()[0]
            assert [k for k in accepted[row].tolist() if k] == alone.accepted_per_pass(0)
        return tokens

    before = check(params, qwen)
    trained = (params[0], jax.tree.map(lambda x: x * 1.5, params[1]))  # other verifier weights, same shapes
    after = check(trained, nnx.merge(core.graphs[1], trained[1]))
    assert rollout._cache_size() == 1  # one compiled program for both params
    assert (before != after).any()


def test_the_core_checks_its_shapes_outside_jit(dream, qwen):
    with pytest.raises(ValueError, match=r"prompt_len=600 must be an int >= 1 with prompt_len \+ max_new_tokens"):
        apd_core(dream, qwen, CFG, prompt_len=600)


def test_a_call_of_more_prompts_than_max_rows_runs_through_the_slots(dream, qwen, monkeypatch):
    from apd_jax.decoding import continuous

    cfg = dataclasses.replace(CFG, temperature=0.8)  # each row keyed by its index: the same samples either way
    whole = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(2))
    monkeypatch.setattr(continuous, "MAX_ROWS", 2)
    slotted = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(2))
    assert slotted.sequences() == whole.sequences()
    assert all(slotted.accepted_per_pass(i) == whole.accepted_per_pass(i) for i in range(len(PROMPTS)))


def test_the_core_gives_each_generated_tokens_log_probability_under_the_verifier(dream, qwen):
    core, params = apd_core(dream, qwen, CFG, prompt_len=16, logprobs=True)
    ids, lengths = pad_prompts(PROMPTS, 16)
    tokens, n, _, _, logprob = jax.jit(core)(params, ids, lengths, jax.random.key(0))
    for row, prompt in enumerate(PROMPTS):
        generated = tokens[row, : n[row]].tolist()
        seq = jax.numpy.asarray([prompt + generated])
        hidden, _ = qwen(seq)  # the verifier over the whole sequence at once
        lsm = jax.nn.log_softmax(qwen.logits(hidden[:, len(prompt) - 1 : -1], vocab=320), axis=-1)[0]
        expected = lsm[np.arange(len(generated)), generated]
        np.testing.assert_allclose(logprob[row, : n[row]], expected, rtol=0, atol=2e-5)
