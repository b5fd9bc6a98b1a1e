"""Continuous batching: rows refilled as others end decode exactly as alone; sampling is batch invariant."""

import dataclasses

import jax
import pytest

from apd_jax.decoding import continuous
from apd_jax.decoding.apd import APDConfig, LeftRightConfig, apd_generate, apd_slots, leftright_generate
from apd_jax.decoding.apd import leftright_slots
from apd_jax.decoding.autoregressive import ARConfig, ar_generate, ar_slots
from apd_jax.decoding.continuous import Request
from conftest import PROMPTS

# Ragged prompts (1 to 14 tokens) and mixed budgets (two, so that decoding each alone compiles twice).
IDS = PROMPTS + [[300, 12], [60, 61, 62, 63, 64], [90]]
BUDGETS = [20, 9, 9, 20, 20, 9]
FIXED = APDConfig(R=0.7, W=3, M=6, max_new_tokens=20)
ADAPTIVE = dataclasses.replace(FIXED, M=12, M_min=2, M_scale=1.0, M_margin=1)


def requests(budgets=BUDGETS, **kw):
    return [Request(ids, i, max_new_tokens=b, **kw) for i, (ids, b) in enumerate(zip(IDS, budgets))]


def with_stop(cfg, alone):
    """cfg stopping at a token that prompt 0 generates mid-way (so some rows end by eos, others by budget).
    One eos id either way: the eos ids are traced, so finding it compiles nothing more."""
    ran = alone(IDS[:1], dataclasses.replace(cfg, eos_token_ids=(0,))).sequences()[0]
    return dataclasses.replace(cfg, eos_token_ids=(ran[min(6, len(ran) - 2)],))


def assert_each_as_alone(slots_of, alone, cfg, size, group):
    result, usage = continuous.generate(slots_of(IDS, cfg, size, group), requests(), jax.random.key(0))
    for i, (ids, budget) in enumerate(zip(IDS, BUDGETS)):
        single = alone([ids], dataclasses.replace(cfg, max_new_tokens=budget))
        assert result.sequences()[i] == single.sequences()[0], i
        assert result.accepted_per_pass(i) == single.accepted_per_pass(0), i
        assert result.stopped_at_eos[i] == single.stopped_at_eos[0], i
    assert result.stopped_at_eos.any() and not result.stopped_at_eos.all()
    assert 0 < usage.occupancy <= 1 and usage.passes == result.passes
    return result, usage


def test_apd_under_refill_equals_each_prompt_decoded_alone(dream, qwen):
    alone = lambda prompts, c: apd_generate(dream, qwen, prompts, c)  # noqa: E731
    cfg = with_stop(FIXED, alone)
    assert_each_as_alone(lambda p, c, s, g: apd_slots(dream, qwen, p, c, s, g), alone, cfg, 3, 2)


def test_adaptive_apd_under_refill_equals_each_prompt_decoded_alone(dream, qwen):
    """A refilled row starts at lookahead M: its first pass runs the top level beside rows at the lower one."""
    alone = lambda prompts, c: apd_generate(dream, qwen, prompts, c)  # noqa: E731
    assert_each_as_alone(lambda p, c, s, g: apd_slots(dream, qwen, p, c, s, g), alone, with_stop(ADAPTIVE, alone),
                         3, 2)


def test_leftright_and_ar_under_refill_equal_each_prompt_decoded_alone(dream, qwen):
    lr = LeftRightConfig(W=3, M=6, K=2, max_new_tokens=20)
    alone = lambda prompts, c: leftright_generate(dream, prompts, c.K, c)  # noqa: E731
    assert_each_as_alone(lambda p, c, s, g: leftright_slots(dream, p, c, s, g), alone, with_stop(lr, alone), 3, 2)
    alone = lambda prompts, c: ar_generate(qwen, prompts, c)  # noqa: E731
    ar = with_stop(ARConfig(max_new_tokens=20), alone)
    assert_each_as_alone(lambda p, c, s, g: ar_slots(qwen, p, c, s, g), alone, ar, 4, 3)


SAMPLED = APDConfig(R=0.5, W=3, M=6, max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, eos_token_ids=())


def test_sampled_output_is_the_same_at_any_slot_count_in_any_slot_and_after_a_resume(dream, qwen):
    key = jax.random.key(7)
    batch = apd_generate(dream, qwen, IDS, SAMPLED, key)  # row i's noise: fold_in(key, i), as request i's
    reqs = requests([16] * len(IDS))
    usages = []
    for size, group in [(1, 1), (3, 2)]:
        result, usage = continuous.generate(apd_slots(dream, qwen, IDS, SAMPLED, size, group), reqs, key)
        assert result.sequences() == batch.sequences(), size
        assert (result.accepted == batch.accepted[:, : result.accepted.shape[1]]).all(), size
        usages.append(usage)
    assert usages[0].occupancy == 1.0 and usages[0].passes > usages[1].passes  # one slot: always busy
    # A resumed run decodes only the prompts left, in other slots: the same output for each.
    resumed, _ = continuous.generate(apd_slots(dream, qwen, IDS, SAMPLED, 3, 2), reqs[4:], key)
    assert resumed.sequences() == batch.sequences()[4:]
    # Each sample depends on its key: another run key, another output.
    other, _ = continuous.generate(apd_slots(dream, qwen, IDS, SAMPLED, 3, 2), reqs, jax.random.key(8))
    assert other.sequences() != batch.sequences()


def test_each_request_samples_with_its_own_settings_and_seed(dream, qwen):
    slots = apd_slots(dream, qwen, IDS, SAMPLED, 3, 2)
    reqs = [Request(IDS[0], 0, seed=11), Request(IDS[1], 1, temperature=0.0), Request(IDS[0], 2, seed=11),
            Request(IDS[0], 3), Request(IDS[2], 4, max_new_tokens=5, top_k=1)]
    result, _ = continuous.generate(slots, reqs, jax.random.key(0))
    seqs = result.sequences()
    assert seqs[0] == seqs[2] != seqs[3]  # a seed, not the index, keys the request
    greedy = dataclasses.replace(SAMPLED, temperature=0.0)
    assert seqs[1] == apd_generate(dream, qwen, [IDS[1]], greedy).sequences()[0]  # greedy among sampled rows
    top1 = dataclasses.replace(greedy, max_new_tokens=5)  # top_k 1 keeps only the argmax: greedy
    assert seqs[4] == apd_generate(dream, qwen, [IDS[2]], top1).sequences()[0]


def test_a_request_outside_the_runs_limits_is_named(dream, qwen):
    slots = apd_slots(dream, qwen, IDS, SAMPLED, 3, 2)
    continuous.check_request(Request(IDS[0], 0, max_new_tokens=16, top_p=0.5), slots, "line 1")
    for request, message in [(Request(IDS[0], 0, max_new_tokens=17), "line 1: max_new_tokens=17 exceeds the run's"),
                             (Request(IDS[0], 0, temperature=-1.0), "line 1: temperature=-1.0 must be >= 0"),
                             (Request(IDS[0], 0, top_p=0.0), r"line 1: top_p=0.0 must lie in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            continuous.check_request(request, slots, "line 1")


def test_slots_take_the_largest_budgets_first_ties_in_file_order(qwen):
    reqs = requests([9, 20, None, 20, 9, 12])  # None: the run's default budget
    assert continuous.refill_order(reqs, 16) == [1, 3, 2, 5, 0, 4]
    # One slot: rows end in the order they entered, by default the largest budget first, else as given.
    slots = ar_slots(qwen, IDS, ARConfig(max_new_tokens=16, eos_token_ids=()), 1, 1)
    for order, expected in [(None, [1, 3, 2, 5, 0, 4]), (range(6), list(range(6)))]:
        ended = []
        continuous.decode(slots, reqs, jax.random.key(0), lambda rows: ended.extend(r.index for r in rows), order)
        assert ended == expected
    with pytest.raises(ValueError, match="each index of the 6 requests exactly once"):
        continuous.decode(slots, reqs, jax.random.key(0), lambda rows: None, [0, 0, 1, 2, 3, 4])
