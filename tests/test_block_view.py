"""blocks.loop.canvas_pass shows a rule that reads positions only relative to the block each row's
block alone (view_size): refresh passes and passes without a cache run the head and the rule on
[B, block_length, V] logits and leave what the whole answer's logits leave; a row at its refresh
with a mask left before its block shows the rule the whole answer (its candidates reach back there)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apd_jax.bench.decoders import random_model
from apd_jax.decoding.blocks.cached import window_widths
from apd_jax.decoding.blocks.dream import DreamBlockConfig, DreamBlockRule
from apd_jax.decoding.blocks.llada import LLaDAConfig, LLaDARule
from apd_jax.decoding.blocks.loop import canvas_pass, view_size
from apd_jax.models.cache import KVCache
from apd_jax.models.config import tiny_config
from apd_jax.models.llada import LLADA

N, BLOCK, P = 16, 4, 6
SEEN: list[tuple[int, ...]] = []  # the shapes of the logits the rule ran on, in the branch that ran


@functools.partial(jax.jit, static_argnames=("graphs", "cache", "size"))
def _pass(graphs, params, prompts, prompt_lens, gen, block, step, kv, *, cache: str, size: int | None):
    model, rule = nnx.merge(graphs[0], params[0]), nnx.merge(graphs[1], params[1])

    def decide(logits, view):
        jax.debug.callback(functools.partial(SEEN.append, logits.shape))
        return rule(logits, jax.random.key(1), view), nnx.state(rule)

    b = gen.shape[0]
    passed, _ = canvas_pass(model, decide, prompts, prompt_lens, gen, block, step, jnp.full((b,), N, jnp.int32), kv,
                            jnp.ones((b,), bool), jnp.int32(0), jnp.asarray([-1], jnp.int32), jnp.int32(BLOCK), None,
                            mask_id=model.cfg.mask_token_id, pad_id=0,
                            widths=None if cache == "none" else window_widths(cache, BLOCK, N), size=size)
    return passed


def _run(model, rule, cache: str, size: int | None, gen: np.ndarray, block, step):
    """(the pass, the logits' shapes the rule ran on) for three ragged rows."""
    b = gen.shape[0]
    prompts = jnp.asarray(np.random.default_rng(2).integers(0, 100, (b, P)), jnp.int32)
    kv = None if cache == "none" else KVCache.zeros(model.cfg, b, P + N)
    graphs, params = zip(nnx.split(model), nnx.split(rule))
    SEEN.clear()
    passed = _pass(graphs, params, prompts, jnp.asarray([P, P - 2, P - 1], jnp.int32), jnp.asarray(gen, jnp.int32),
                   jnp.asarray(block, jnp.int32), jnp.asarray(step, jnp.int32), kv, cache=cache, size=size)
    jax.effects_barrier()
    return jax.device_get(passed), list(SEEN)


@pytest.fixture(scope="module")
def models():
    return {"llada": random_model(tiny_config(causal=False, family=LLADA, num_kv_heads=4), 4),
            "dream": random_model(tiny_config(causal=False), 4)}


def _rule(family: str):
    if family == "llada":
        return LLaDARule(LLaDAConfig(max_new_tokens=N, block_length=BLOCK, steps=8))
    return DreamBlockRule(DreamBlockConfig(max_new_tokens=N, block_length=BLOCK, steps=8))


def _canvas(mask_id: int, block: list[int], left: tuple[int, int] | None = None) -> np.ndarray:
    """Three rows' answers: decoded (token 7) before each row's block, masked from it; `left`: (row,
    position) masked again before its row's block."""
    gen = np.where(np.arange(N) < np.asarray(block)[:, None] * BLOCK, 7, mask_id)
    if left is not None:
        gen[left] = mask_id
    return gen


@pytest.mark.parametrize("family,cache", [("llada", "none"), ("llada", "dual"), ("dream", "dual"),
                                          ("dream", "prefix"), ("dream", "none")])
def test_a_refresh_runs_the_head_on_the_block_alone(models, family, cache):
    """Every row refreshing (or, with a cache, rows at different steps: a mixed pass): the rule runs on
    [B, block_length, V] logits, and the pass equals the one on the whole answer's logits."""
    model, rule = models[family], _rule(family)
    assert view_size(rule, BLOCK) == BLOCK
    block = [1, 2, 0]
    gen = _canvas(model.cfg.mask_token_id, block)
    steps = [[0, 0, 0]] + ([] if cache == "none" else [[0, 1, 0]])
    for step in steps:
        blocks, seen = _run(model, rule, cache, BLOCK, gen, block, step)
        assert seen == [(3, BLOCK, model.cfg.vocab_size)]
        whole, seen = _run(model, rule, cache, None, gen, block, step)
        assert seen == [(3, N, model.cfg.vocab_size)]
        for a, b in zip(jax.tree.leaves(blocks), jax.tree.leaves(whole)):
            np.testing.assert_array_equal(a, b)
        assert blocks.committed.sum() > 0


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_mask_left_before_the_block_shows_the_whole_answer(models, cache):
    """A position that predicted the mask stayed masked in block 0; row 0's refresh of block 1 counts it
    among its candidates (LLaDA's published generate does), so the pass runs on the whole answer."""
    model, rule = models["llada"], _rule("llada")
    block = [1, 2, 0]
    gen = _canvas(model.cfg.mask_token_id, block, left=(0, 2))
    blocks, seen = _run(model, rule, cache, BLOCK, gen, block, [0, 0, 0])
    assert seen == [(3, N, model.cfg.vocab_size)]
    whole, _ = _run(model, rule, cache, None, gen, block, [0, 0, 0])
    np.testing.assert_array_equal(blocks.gen, whole.gen)
