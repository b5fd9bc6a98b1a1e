"""The block decoder (apd_jax.decoding.blocks) against the published LLaDA `generate`
(apd_jax.bench.llada_generate_published, verbatim), token for token at temperature 0.

The published code only reads `model(x, attention_mask).logits`, so its model here is a torch
stand-in whose logits are apd_jax's own model's on the same canvas: the comparison isolates the
decoding algorithm. torch.topk orders tied confidences as it likes (its CPU order is neither
index order nor stable), so the published code runs with ties broken by the lower position, as
apd_jax breaks them; ties arise where confidence_eos_eot_inf sets confidences to 0.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apd_jax.decoding.blocks.llada import (
    LLaDAConfig,
    exponential64,
    exponential_from_bits,
    gumbel_max,
    llada_generate,
    transfer_counts,
)
from apd_jax.decoding.diffusion import ThresholdConfig, threshold_generate
from apd_jax.models.config import ModelConfig
from apd_jax.models.llada import LLADA
from apd_jax.models.model import abstract_model, forward_logits

torch = pytest.importorskip("torch")
published = pytest.importorskip("apd_jax.bench.llada_generate_published")

EOS, EOT, MASK = 126081, 126348, 126336  # the ids the published generate hard-codes
VOCAB = 126464  # LLaDA-8B's embedding rows


@pytest.fixture(scope="module")
def model():
    return tiny_llada()


def tiny_llada():
    """A tiny LLaDA-shaped model with large random weights, so predictions differ by position with
    confidences spread over (0, 1); eos and <|eot_id|> copy the two tokens it predicts most often
    (half as strong again), so both are predicted often."""
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5, family=LLADA,
                      mask_token_id=MASK, eos_token_ids=(EOS,), max_position_embeddings=512)
    graph, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32) if len(s.shape) > 1
                         else jnp.ones(s.shape, jnp.float32), state)
    m = nnx.merge(graph, state)
    head = m.lm_head[...] * 10
    canvas = np.full((1, 48), MASK)
    canvas[0, :16] = prompts([16], seed=1)[0]
    m.lm_head[...] = head
    predicted = np.asarray(forward_logits(m, jnp.asarray(canvas))).argmax(-1)[0, 16:]
    ids, counts = np.unique(predicted, return_counts=True)
    first, second = ids[np.argsort(-counts, kind="stable")[:2]]
    m.lm_head[...] = head.at[:, EOS].set(head[:, first] * 1.5).at[:, EOT].set(head[:, second] * 1.5)
    return m


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 120000, n).tolist() for n in lengths]


class JaxLogits(torch.nn.Module):
    """What the published generate calls: `.logits` of apd_jax's model on the whole canvas."""

    device = torch.device("cpu")

    def __init__(self, model):
        super().__init__()
        self.jax_model = model

    def forward(self, x, attention_mask=None):
        assert attention_mask is None or bool(attention_mask.all()), "rows are compared one at a time, unpadded"
        logits = forward_logits(self.jax_model, jnp.asarray(x.numpy(), jnp.int32))
        return types.SimpleNamespace(logits=torch.from_numpy(np.array(logits)))


def _stable_topk(x, k):
    order = torch.sort(x, descending=True, stable=True).indices[: int(k)]
    return x[order], order


def published_answer(model, prompt, config: LLaDAConfig, monkeypatch) -> list[int]:
    """The published generate's answer to one prompt alone (tied confidences to the lower position)."""
    monkeypatch.setattr(torch, "topk", _stable_topk)
    x = torch.tensor([prompt])
    # The published guidance reads attention_mask (its unguided path does not need one).
    mask = torch.ones_like(x) if config.cfg_scale > 0 else None
    out = published.generate(
        JaxLogits(model), x, mask, steps=config.step_count, gen_length=config.max_new_tokens,
        block_length=config.block_size, temperature=0.0, cfg_scale=config.cfg_scale, remasking=config.remasking,
        mask_id=MASK, logits_eos_inf=config.logits_eos_inf, confidence_eos_eot_inf=config.confidence_eos_eot_inf,
    )
    return out[0, len(prompt):].tolist()


# max_new_tokens 12 and steps 8 throughout (one compiled program): 2, 2, 2, 2, 1, 1, ... per step.
CASES = {
    "one block": dict(block_length=12),
    "two blocks": dict(block_length=6),
    "four blocks": dict(block_length=3),
    "cfg": dict(block_length=6, cfg_scale=1.5),
    "logits_eos_inf": dict(block_length=6, logits_eos_inf=True),
    "confidence_eos_eot_inf": dict(block_length=3, confidence_eos_eot_inf=True),
    "both eos options": dict(block_length=12, logits_eos_inf=True, confidence_eos_eot_inf=True),
}


@pytest.mark.parametrize("case", CASES)
def test_batch_of_one_equals_published(model, case, monkeypatch):
    config = LLaDAConfig(max_new_tokens=12, steps=8, **CASES[case], eos_token_ids=())
    (prompt,) = prompts([9], seed=1)
    got = llada_generate(model, [prompt], config)
    want = published_answer(model, prompt, config, monkeypatch)
    assert got.tokens[0].tolist() == want
    assert got.passes == 8 and got.lengths.tolist() == [12]
    if "eos" in case:  # the option decided something: an eos or eot would have been kept otherwise
        plain = LLaDAConfig(max_new_tokens=12, steps=8, block_length=config.block_length)
        plain = published_answer(model, prompt, plain, monkeypatch)
        assert plain != want


def test_model_predicts_eos_and_eot(model, monkeypatch):
    """The fixture's model makes the eos options matter: its plain answers hold eos and eot."""
    answer = published_answer(model, prompts([9], seed=1)[0], LLaDAConfig(max_new_tokens=12, steps=8), monkeypatch)
    assert EOS in answer and EOT in answer


def test_ragged_rows_equal_published_rows_alone(model, monkeypatch):
    """Right-padded rows of three prompt lengths, each equal to the published code on that row alone
    (guided, eos and eot last; the end-to-end test below runs ragged rows unguided); steps >
    max_new_tokens: the last steps of each block commit nothing."""
    config = LLaDAConfig(max_new_tokens=12, steps=16, block_length=6, cfg_scale=0.5, confidence_eos_eot_inf=True,
                         eos_token_ids=())
    assert transfer_counts(6, 8).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    rows = prompts([5, 11, 16], seed=2)
    got = llada_generate(model, rows, config)
    for row, prompt in zip(got.tokens, rows):
        assert row.tolist() == published_answer(model, prompt, config, monkeypatch)
    assert got.accepted.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0] * 2] * 3


def test_stops_at_eos_with_the_published_answer_up_to_it(model, monkeypatch):
    """With eos as a stop id, a row returns the filled answer through its first eos, once every
    position before it is committed, in fewer passes than the steps."""
    config = LLaDAConfig(max_new_tokens=12, steps=8, block_length=3)
    rows = prompts([11, 7], seed=1)
    got = llada_generate(model, rows, config)
    for b, prompt in enumerate(rows):
        want = published_answer(model, prompt, config, monkeypatch)
        assert EOS in want
        end = want.index(EOS) + 1
        assert got.sequences()[b] == want[:end] and got.stopped_at_eos[b]
        assert got.tokens[b, end:].tolist() == [model.cfg.eos_token_ids[0]] * (12 - end)  # padding
    assert got.passes < 8 or got.row_passes().min() < 8


def test_sampling_and_random_remasking_follow_the_schedule(model):
    """Sampled tokens and random remasking cannot match torch's random numbers; what can be checked:
    each step commits the scheduled count, every position ends unmasked, a key decides the result."""
    rows = prompts([13], seed=4)
    greedy = llada_generate(model, rows, LLaDAConfig(max_new_tokens=12, steps=8, block_length=6, eos_token_ids=()))
    for options in (dict(temperature=2.0), dict(remasking="random")):
        config = LLaDAConfig(max_new_tokens=12, steps=8, block_length=6, **options, eos_token_ids=())
        one = llada_generate(model, rows, config, jax.random.key(1))
        assert one.accepted.tolist() == [[2, 2, 1, 1] * 2]
        assert not (one.tokens == MASK).any() and (one.tokens != greedy.tokens).any()
        again = llada_generate(model, rows, config, jax.random.key(1))
        other = llada_generate(model, rows, config, jax.random.key(2))
        assert (again.tokens == one.tokens).all() and (other.tokens != one.tokens).any()


def test_exponential_noise_has_float64_tails():
    """-log(u) from 64 random bits: both extremes reach past float64's [1e-16, 36.7] (a float32
    uniform stops at [1.2e-7, 15.9]), and the draws are Exp(1)."""
    zero, ones = jnp.uint32(0), jnp.uint32(0xFFFFFFFF)
    assert float(exponential_from_bits(zero, zero)) < 1e-19  # u = 1 - 2^-65
    assert float(exponential_from_bits(ones, ones)) > 44.0  # u = 2^-65
    assert float(exponential_from_bits(jnp.uint32(2**31), zero)) == pytest.approx(np.log(2), rel=1e-6)
    draws = np.asarray(exponential64(jax.random.key(0), (200_000,)))
    for t in (0.01, 0.5, 1.0, 3.0):
        assert np.mean(draws < t) == pytest.approx(1 - np.exp(-t), abs=4e-3)


def test_gumbel_max_samples_the_tempered_softmax():
    logits = jnp.asarray([1.0, 0.0, -1.0, -jnp.inf])
    for t in (0.5, 2.0):
        samples = np.asarray(gumbel_max(jnp.broadcast_to(logits, (50_000, 4)), jnp.float32(t), jax.random.key(3)))
        want = np.asarray(jax.nn.softmax(logits / t))
        assert np.bincount(samples, minlength=4) / len(samples) == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=12, block_length=5), "block_length=5 must divide max_new_tokens=12"),
    (dict(max_new_tokens=12, steps=8, block_length=4), "steps=8 must be a multiple of the number of blocks 3"),
    (dict(steps=0), "steps=0"),
    (dict(remasking="lowest"), "remasking='lowest'"),
    (dict(cfg_scale=-1.0), "cfg_scale=-1.0 must be >= 0"),
    (dict(top_k=5), "LLaDA's generate samples from the whole vocabulary"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLaDAConfig(**settings).validate()


def test_eos_id_outside_the_vocabulary_is_refused(model):
    with pytest.raises(ValueError, match="eos_id=200000 or eot_id=126348 lies outside the model's vocabulary"):
        llada_generate(model, [[1, 2]], LLaDAConfig(max_new_tokens=4, eos_id=200000, logits_eos_inf=True))


@pytest.mark.parametrize("settings", [dict(max_new_tokens=12, steps=8, block_length=6),
                                      dict(max_new_tokens=16, steps=16, block_length=8, cfg_scale=1.0)])
def test_llada_checkpoint_decodes_as_the_published_model(tmp_path, settings, monkeypatch):
    """End to end: a tiny random LLaDA checkpoint written by the published modeling code, loaded by
    apd_jax and by the published code; ragged rows, each equal to the published generate alone."""
    torch_llada = pytest.importorskip("apd_jax.bench.torch_llada")
    from apd_jax.checkpoints import load_model

    path = torch_llada.save_tiny_llada(tmp_path / "llada", seed=0)
    reference, ours = torch_llada.load_torch_llada(path), load_model(path)
    config = LLaDAConfig(**settings, eos_token_ids=())
    rows = [np.random.default_rng(5).integers(0, 280, n).tolist() for n in (7, 13, 20)]
    got = llada_generate(ours, rows, config)
    monkeypatch.setattr(torch, "topk", _stable_topk)
    for row, prompt in zip(got.tokens, rows):
        x = torch.tensor([prompt])
        out = published.generate(reference, x, torch.ones_like(x), steps=config.step_count,
                                 gen_length=config.max_new_tokens, block_length=config.block_size,
                                 cfg_scale=config.cfg_scale, mask_id=ours.cfg.mask_token_id)
        assert row.tolist() == out[0, len(prompt):].tolist()


def eager_threshold(model, prompt, config: ThresholdConfig) -> tuple[list[int], int]:
    """Threshold decoding in blocks as a plain Python loop over one row (the answer through its first
    eos, and the passes it took): each pass commits the current block's masked positions above the
    threshold and the most confident one; End-of-Text commits the first confident eos and drops
    the positions after it."""
    n, size = config.max_new_tokens, config.block_length
    eos = model.cfg.eos_token_ids if config.eos_token_ids is None else config.eos_token_ids
    gen, limit, passes = [MASK] * n, n, 0
    for block_end in range(size, n + 1, size):
        while True:
            first_eos = next((j for j, t in enumerate(gen) if t in eos), n)
            cand = [j for j in range(min(block_end, limit)) if gen[j] == MASK]
            if not cand or MASK not in gen[:first_eos]:
                break
            logits = np.array(forward_logits(model, jnp.asarray([prompt + gen[:limit]])))[0, len(prompt):]
            logits[:, MASK] = -np.inf
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            tokens, confidence = probs.argmax(-1), probs.max(-1)
            most = max(cand, key=lambda j: (confidence[j], -j))  # ties to the lower position
            keep = {j for j in cand if confidence[j] > config.threshold} | {most}
            if config.eot_threshold is not None:
                eot = [j for j in cand if tokens[j] in eos and confidence[j] > config.eot_threshold]
                if eot:
                    keep.add(eot[0])
                    limit = eot[0] + 1
            gen = [int(tokens[j]) if j in keep else t for j, t in enumerate(gen)][:limit] + [EOS] * (n - limit)
            passes += 1
    first_eos = next((j for j, t in enumerate(gen) if t in eos), n - 1)
    return gen[: first_eos + 1], passes


@pytest.mark.parametrize("seed, settings", [(1, dict(threshold=0.5, block_length=4, eos_token_ids=())),
                                            (3, dict(threshold=0.9, block_length=6, eot_threshold=0.7))])
def test_threshold_in_blocks_equals_a_python_loop(model, seed, settings):
    """Threshold decoding (Fast-dLLM's rule without its cache) on LLaDA in blocks, with and without
    End-of-Text: each row of a ragged batch equals a plain Python loop over that row."""
    config = ThresholdConfig(max_new_tokens=12, **settings)
    rows = prompts([5, 11], seed=seed)
    got = threshold_generate(model, rows, config)
    for b, prompt in enumerate(rows):
        want, passes = eager_threshold(model, prompt, config)
        assert got.sequences()[b] == want and got.row_passes()[b] == passes
    assert got.row_passes().max() > 12 // settings["block_length"]  # more than one pass per block
    assert got.stopped_at_eos.any() == ("eot_threshold" in settings)  # End-of-Text cut a row


def test_learn2pd_oracle_in_blocks_reaches_the_answer_block_by_block(model):
    """The oracle as a block-decoder rule: it ends at the answers, each pass records (and commits)
    masks of the row's current block only, blocks in order, and oracle_traces keeps those records."""
    from apd_jax.decoding.blocks.loop import decode_blocks
    from apd_jax.decoding.generation import DecoderConfig
    from apd_jax.training.learn2pd_oracle import OracleRule, final_answers, oracle_traces

    rows = prompts([5, 11], seed=1)
    answers = final_answers(model, rows, 12, block_length=4)
    config = DecoderConfig(max_new_tokens=12, eos_token_ids=())
    result, rule = decode_blocks(model, OracleRule(jnp.asarray(answers), MASK, VOCAB), rows, config, None,
                                 block_length=4, bound=12)
    assert (result.tokens == answers).all()
    recorded, labels = np.asarray(rule.recorded[...]), np.asarray(rule.labels[...])  # [passes, B, N]
    assert not (labels & ~recorded).any()
    for b in range(len(rows)):
        blocks = [set(np.nonzero(recorded[i, b])[0] // 4) for i in range(result.passes) if recorded[i, b].any()]
        assert all(len(seen) == 1 for seen in blocks)
        order = [min(seen) for seen in blocks]
        assert order == sorted(order) and set(order) == {0, 1, 2}
    traces = oracle_traces(model, rows, answers, block_length=4)
    assert len(traces) == recorded.sum() and traces.labels.sum() == labels.sum()
    with pytest.raises(ValueError, match="block_length=5 must divide max_new_tokens=12"):
        oracle_traces(model, rows, answers, block_length=5)


def test_the_registry_runs_llada_on_the_drafter_slot(model):
    """`--decoder llada`: the bidirectional model in the drafter slot, settings by field name."""
    from apd_jax.decoding.registry import Models, decoder

    llada = decoder("llada")
    settings = llada.settings_from({"max_new_tokens": 12, "steps": 8, "block_length": 6, "eos_token_ids": ()})
    rows = prompts([9], seed=1)
    got = llada.generate(Models(drafter=model), rows, settings)
    assert got.tokens.tolist() == llada_generate(model, rows, settings).tokens.tolist()
    with pytest.raises(ValueError, match="decoder 'llada' needs a drafter"):
        llada.generate(Models(), rows, settings)
