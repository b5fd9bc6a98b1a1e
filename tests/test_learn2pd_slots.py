"""Learn2PD in continuous batching (apd_jax.decoding.learn2pd.learn2pd_slots): at temperature 0 each
request's output through a few slots, refilled as rows end, equals `learn2pd_generate` on that request
alone with its own budget (tokens, tokens committed per pass, eos flag), for ragged prompts and mixed
budgets; the filter reads each row's positions over its own budget, not the run's capacity."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from apd_jax.decoding import continuous
from apd_jax.decoding.blocks.slots import row_config
from apd_jax.decoding.continuous import Request
from apd_jax.decoding.diffusion import parallel_decode
from apd_jax.decoding.learn2pd import Filter, FilterRule, Learn2PDConfig, learn2pd_generate, learn2pd_slots
from apd_jax.decoding.registry import DECODERS, Models
from test_block_slots import llada  # noqa: F401 (a fixture: the tiny random LLaDA)

# An untrained filter keeps about half its predictions near 0.52: several positions a pass.
FILTER = Filter(rngs=nnx.Rngs(0))
CONFIG = Learn2PDConfig(max_new_tokens=16, keep_threshold=0.52, block_length=8, eot_threshold=None)
CASES = [("dream", CONFIG), ("llada", dataclasses.replace(CONFIG, cache="dual"))]


def requests(vocab: int) -> list[Request]:
    """Ragged prompts (one past the 16-token bucket) with budgets of one and two blocks."""
    rng = np.random.default_rng(3)
    return [Request(rng.integers(0, vocab, n).tolist(), i, max_new_tokens=m)
            for i, (n, m) in enumerate(zip((3, 9, 17, 5, 11, 6), (16, 8, 16, 8, 8, 16)))]


def alone(model, reqs: list[Request], config: Learn2PDConfig, budget: int):
    """learn2pd_generate on the requests of one budget, with the settings a request of it runs alone with."""
    which = [i for i, r in enumerate(reqs) if r.max_new_tokens == budget]
    own = row_config(config, budget, config.temperature, config.top_p, config.top_k)
    return which, learn2pd_generate(model, FILTER, [reqs[i].ids for i in which], own)


@pytest.mark.parametrize("family, config", CASES, ids=[f"{f}-{c.cache}" for f, c in CASES])
def test_each_request_decodes_as_alone_through_refilled_slots(request, family, config):
    """Through the registry's slots (what generate --prompts-file and eval run)."""
    model = request.getfixturevalue(family)
    reqs = requests(min(model.cfg.vocab_size, model.cfg.mask_token_id))
    slots = DECODERS["learn2pd"].slots(Models(drafter=model, filter=FILTER), [r.ids for r in reqs], config, 3)
    got, usage = continuous.generate(slots, reqs, jax.random.key(0))
    for budget in (8, 16):
        which, want = alone(model, reqs, config, budget)
        for b, i in enumerate(which):
            assert got.sequences()[i] == want.sequences()[b], i
            assert got.accepted_per_pass(i) == want.accepted_per_pass(b), i
            assert got.stopped_at_eos[i] == want.stopped_at_eos[b], i
        assert any(max(want.accepted_per_pass(b)) > 1 for b in range(len(which)))  # several positions a pass
    assert usage.passes < sum(got.row_passes())  # the slots decoded rows side by side


def test_the_filter_reads_positions_over_the_rows_own_budget(dream):
    """The check above can fail: a budget-8 request decoded with the features of the run's 16
    positions (what a canvas of the capacity would show the filter) gives other commits."""
    reqs = requests(320)
    which, want = alone(dream, reqs, CONFIG, 8)
    own = row_config(CONFIG, 8, 0.0, 1.0, 0)
    wide = parallel_decode(dream, FilterRule(FILTER, CONFIG.keep_threshold, dream.cfg.vocab_size, 16),
                           [reqs[i].ids for i in which], own)
    assert [wide.accepted_per_pass(b) for b in range(len(which))] != [want.accepted_per_pass(b)
                                                                       for b in range(len(which))]


def test_a_request_whose_budget_is_not_whole_blocks_is_refused_before_the_run(dream):
    slots = learn2pd_slots(dream, FILTER, [r.ids for r in requests(320)], CONFIG, size=2)
    with pytest.raises(ValueError, match="line 1: block_length=8 must divide max_new_tokens=12"):
        continuous.check_request(Request([5, 6], 0, max_new_tokens=12), slots, "line 1")
