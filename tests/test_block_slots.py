"""The block decoder in continuous batching (apd_jax.decoding.blocks.slots): at temperature 0 every
request's output through a few slots, refilled as rows end, equals the fixed decoder's on that
request alone with its row settings (tokens, and tokens committed per pass), for ragged prompts and
mixed budgets, LLaDA's rule, the threshold and Fast-dLLM's Dream, each cache mode; refreshes run
together without changing a token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apd_jax.decoding import continuous
from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate
from apd_jax.decoding.blocks.llada import LLaDAConfig, llada_generate
from apd_jax.decoding.blocks.slots import block_slots, pass_counts, row_config, row_problems
from apd_jax.decoding.continuous import Request
from apd_jax.decoding.diffusion import ThresholdConfig, threshold_generate
from apd_jax.models.config import ModelConfig
from apd_jax.models.llada import LLADA
from apd_jax.models.model import abstract_model

N, BLOCK = 16, 8
EOS = 7


@pytest.fixture(scope="module")
def llada():
    """A tiny random LLaDA-shaped model (vocabulary 300, mask 290) whose rows sometimes end at eos 7."""
    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, family=LLADA,
                      mask_token_id=290, eos_token_ids=(EOS,), max_position_embeddings=512)
    graph, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32) if len(s.shape) > 1
                         else jnp.ones(s.shape, jnp.float32), state)
    return nnx.merge(graph, state)


def requests(vocab: int, budgets=(16, 8, 16, 8, 16)) -> list[Request]:
    """Ragged prompts (one past the 16-token bucket, so slots pad it) with mixed budgets."""
    rng = np.random.default_rng(3)
    return [Request(rng.integers(0, vocab, n).tolist(), i, max_new_tokens=m)
            for i, (n, m) in enumerate(zip((3, 9, 17, 5, 11), budgets))]


ALONE = {LLaDAConfig: llada_generate, ThresholdConfig: threshold_generate, DreamBlockConfig: dream_block_generate}


def assert_each_equals_alone(model, config, reqs, got):
    """Each request's tokens, tokens per pass and eos flag equal the fixed decoder's with its row
    settings (rows of one budget in one ragged batch: each row of it decodes as alone)."""
    for budget in sorted({r.max_new_tokens for r in reqs}):
        which = [i for i, r in enumerate(reqs) if r.max_new_tokens == budget]
        own = row_config(config, budget, config.temperature, config.top_p, config.top_k)
        alone = ALONE[type(config)](model, [reqs[i].ids for i in which], own)
        for b, i in enumerate(which):
            assert got.sequences()[i] == alone.sequences()[b], i
            assert got.accepted_per_pass(i) == alone.accepted_per_pass(b), i
            assert got.stopped_at_eos[i] == alone.stopped_at_eos[b], i


DUAL = ThresholdConfig(max_new_tokens=N, threshold=0.3, block_length=BLOCK, cache="dual")
CASES = [
    ("llada", LLaDAConfig(max_new_tokens=N, steps=8, block_length=BLOCK, cache="none")),
    # One block: a row's steps (its budget) and so its rule's schedule differ by budget.
    ("llada", LLaDAConfig(max_new_tokens=N, cache="prefix")),
    ("llada", DUAL),
    ("dream", DreamBlockConfig(max_new_tokens=N, steps=8, block_length=BLOCK, cache="dual", eos_token_ids=())),
]


@pytest.mark.parametrize("family, config", CASES, ids=[f"{f}-{type(c).__name__}-{c.cache}" for f, c in CASES])
def test_each_request_decodes_as_alone_through_refilled_slots(request, llada, family, config):
    model = llada if family == "llada" else request.getfixturevalue("dream")
    reqs = requests(min(model.cfg.vocab_size, model.cfg.mask_token_id))
    # refresh_group=2: with a cache a row at its refresh waits while fewer than 2 do and another runs a window
    slots = block_slots(model, [r.ids for r in reqs], config, size=3, group=1, refresh_group=2)
    got, usage = continuous.generate(slots, reqs, jax.random.key(0))
    assert_each_equals_alone(model, config, reqs, got)
    assert usage.passes < sum(got.row_passes())  # the slots decoded rows side by side


def counted(slots):
    """`slots` whose run keeps its last state in `.last` (for pass_counts)."""
    run = slots.run

    def keep(state, until):
        keep.last = run(state, until)
        return keep.last

    return dataclasses.replace(slots, run=keep), keep


def test_grouped_refreshes_run_fewer_full_passes_and_the_same_tokens(llada):
    """With the dual cache rows reach block boundaries at different passes (refilled at different
    passes, the threshold's blocks taking different passes): rows that wait for each other's refresh
    run fewer full-canvas passes, and the same tokens per pass."""
    reqs = requests(280) + [Request(r.ids[::-1], 5 + r.index, max_new_tokens=N) for r in requests(280)]
    seen = []
    for wait in (1, 3):
        slots, keep = counted(block_slots(llada, [r.ids for r in reqs], DUAL, size=3, group=1, refresh_group=wait))
        got, _ = continuous.generate(slots, reqs, jax.random.key(0))
        seen.append((pass_counts(keep.last), got.sequences(), [got.accepted_per_pass(i) for i in range(len(reqs))]))
    (one, *outputs_one), (three, *outputs_three) = seen
    assert outputs_one == outputs_three
    assert three["refresh"] < one["refresh"]


def test_sampled_request_is_the_same_at_any_slot_count(llada):
    """Each row samples from its own key (the request's), so a sampled output does not depend on the
    slot count; another run key gives other outputs."""
    config = dataclasses.replace(DUAL, temperature=1.0)
    reqs = requests(280)
    runs = {}
    for size, seed in ((1, 4), (3, 4), (3, 5)):
        slots = block_slots(llada, [r.ids for r in reqs], config, size=size, group=1)
        runs[size, seed] = continuous.generate(slots, reqs, jax.random.key(seed))[0].sequences()
    assert runs[1, 4] == runs[3, 4]
    assert runs[3, 4] != runs[3, 5]


def test_row_settings_follow_the_runs_steps_per_token():
    config = LLaDAConfig(max_new_tokens=32, steps=16, block_length=8)
    assert row_config(config, 16, 0.0, 1.0, 0).steps == 8 and row_problems(config, 16, 0.5, 1.0, 0) == []
    assert row_config(LLaDAConfig(max_new_tokens=32), 8, 0.0, 1.0, 0).steps is None
    with pytest.raises(ValueError, match="block_length=8 must divide max_new_tokens=12"):
        row_config(config, 12, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="not whole"):
        row_config(LLaDAConfig(max_new_tokens=32, steps=4), 12, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="top_k=5: LLaDA's generate samples from the whole"):
        row_config(config, 16, 0.0, 1.0, 5)


def test_other_settings_are_refused(llada):
    from apd_jax.decoding.diffusion import DiffusionConfig

    with pytest.raises(ValueError, match="block_slots runs LLaDAConfig, ThresholdConfig or DreamBlockConfig"):
        block_slots(llada, [[1, 2]], DiffusionConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="refresh_group=0 must be >= 1"):
        block_slots(llada, [[1, 2]], ThresholdConfig(max_new_tokens=8, cache="dual"), refresh_group=0)


def test_generate_decodes_a_llada_request_file_through_the_slots(tmp_path, capsys):
    """`apd-jax generate --decoder llada` with a .jsonl of requests: each request's own budget, through one
    slot (every request refilled), each record what the decoder gives that request alone; a budget that is
    not whole blocks is refused before anything decodes."""
    import json

    from apd_jax import ASSETS_DIR
    from apd_jax.checkpoints import load_model, load_tokenizer
    from apd_jax.cli.app import main
    from apd_jax.decoding.registry import DECODERS, Models

    llada = ASSETS_DIR / "llada"
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "def add(a, b):", "max_new_tokens": 8}\n{"prompt": "import os"}\n')
    out = tmp_path / "o.jsonl"
    common = ["generate", "--drafter", str(llada), "--decoder", "llada", "--max-new-tokens", "16", "--block-length",
              "8", "--no-chat", "--batch-size", "1", "--prompts-file", str(requests)]
    assert main([*common, "--output", str(out)]) == 0
    assert "slot occupancy" in capsys.readouterr().out
    records = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    model, tok = load_model(llada), load_tokenizer(llada)
    for index, (prompt, budget) in enumerate([("def add(a, b):", 8), ("import os", 16)]):
        cfg = DECODERS["llada"].with_stop_ids(LLaDAConfig(max_new_tokens=budget, block_length=8), Models(model), tok)
        alone = llada_generate(model, [tok.encode(prompt)], cfg, jax.random.key(0)).sequences()[0]
        assert records[index]["ids"] == alone
    requests.write_text('{"prompt": "import os", "max_new_tokens": 12}\n')
    assert main([*common, "--output", str(tmp_path / "bad.jsonl")]) == 2
    assert "max_new_tokens=12" in capsys.readouterr().err
