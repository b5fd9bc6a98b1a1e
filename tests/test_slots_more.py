"""A decoding call of more than continuous.MAX_ROWS prompts runs through that many slots, with the
outputs of one fixed batch, for every decoder that has slots (AR, left-to-right, APD)."""

import dataclasses

import jax

from apd_jax.decoding import continuous
from apd_jax.decoding.apd import APDConfig, apd_generate, leftright_generate
from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from conftest import PROMPTS

# Ragged prompts (1 to 14 tokens): rows of one fixed batch at different positions.
IDS = PROMPTS + [[300, 12], [60, 61, 62, 63, 64], [90]]
APD = APDConfig(R=0.7, W=3, M=6, max_new_tokens=16)


def slot_sizes(monkeypatch, max_rows: int) -> list[int]:
    """MAX_ROWS set to `max_rows`; the list fills with the slot count of each run through the slots."""
    sizes = []
    original = continuous.generate

    def generate(slots, requests, key):
        sizes.append(slots.size)
        return original(slots, requests, key)

    monkeypatch.setattr(continuous, "generate", generate)
    monkeypatch.setattr(continuous, "MAX_ROWS", max_rows)
    return sizes


def assert_slotted_as_fixed(decode, cfg, monkeypatch):
    """decode(prompts, cfg) through 2 slots gives the fixed batch's tokens, passes per row and eos flags,
    with an eos that ends some rows early (prompt 0's 7th token) so slots free at different passes."""
    ran = decode(IDS[:1], dataclasses.replace(cfg, eos_token_ids=())).sequences()[0]
    cfg = dataclasses.replace(cfg, eos_token_ids=(ran[6],))
    sizes = slot_sizes(monkeypatch, len(IDS))
    fixed = decode(IDS, cfg)
    assert sizes == []  # as many prompts as MAX_ROWS: one fixed batch
    assert fixed.stopped_at_eos.any() and not fixed.stopped_at_eos.all()
    monkeypatch.setattr(continuous, "MAX_ROWS", 2)
    slotted = decode(IDS, cfg)
    assert sizes == [2]
    assert slotted.sequences() == fixed.sequences()
    assert [slotted.accepted_per_pass(i) for i in range(len(IDS))] == [fixed.accepted_per_pass(i)
                                                                        for i in range(len(IDS))]
    assert slotted.stopped_at_eos.tolist() == fixed.stopped_at_eos.tolist()
    assert (slotted.tokens == fixed.tokens).all()  # the same padding after each row's end


def test_an_ar_call_of_more_prompts_than_max_rows_runs_through_the_slots(qwen, monkeypatch):
    assert_slotted_as_fixed(lambda p, c: ar_generate(qwen, p, c), ARConfig(max_new_tokens=16), monkeypatch)


def test_a_leftright_call_of_more_prompts_than_max_rows_runs_through_the_slots(dream, monkeypatch):
    assert_slotted_as_fixed(lambda p, c: leftright_generate(dream, p, 2, c), APD, monkeypatch)


def test_a_greedy_apd_call_of_more_prompts_than_max_rows_runs_through_the_slots(dream, qwen, monkeypatch):
    assert_slotted_as_fixed(lambda p, c: apd_generate(dream, qwen, p, c), APD, monkeypatch)


def test_a_sampled_ar_call_through_the_slots_keys_each_row_by_its_index(qwen, monkeypatch):
    cfg = ARConfig(max_new_tokens=12, temperature=0.9, top_k=50, eos_token_ids=())
    fixed = ar_generate(qwen, IDS, cfg, jax.random.key(3))
    sizes = slot_sizes(monkeypatch, 2)
    slotted = ar_generate(qwen, IDS, cfg, jax.random.key(3))
    assert sizes == [2] and slotted.sequences() == fixed.sequences()
    assert slotted.sequences() != ar_generate(qwen, IDS, cfg, jax.random.key(4)).sequences()
