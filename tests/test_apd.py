"""The APD engine: token-for-token parity with the PyTorch loop, batching, rules, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apd_jax.decoding.apd import APDConfig, APDKnobs, apd_generate, shared_vocab_size
from apd_jax.decoding.apd_rule import accepted_length
from apd_jax.decoding.apd_eager import apd_generate_eager
from conftest import MASK, PROMPTS
from apd_jax.bench.torch_reference.decoders import torch_apd_generate


def reference(torch_dream, torch_qwen, prompt, cfg, eos):
    tokens, counts = torch_apd_generate(
        torch_dream, torch_qwen, prompt, max_new_tokens=cfg.max_new_tokens, R=cfg.R, W=cfg.W, M=cfg.M,
        mask_token_id=MASK, eos_token_id=eos, shared_vocab_size=320,
    )
    if eos in tokens:  # ours pads what the final pass accepted after the eos
        tokens = tokens[: tokens.index(eos) + 1]
    return tokens, counts


SETTINGS = [
    APDConfig(R=0.7, W=4, M=12, max_new_tokens=40),  # (0.7, 16, 100) scaled to the tiny models
    APDConfig(R=1.0, W=4, M=12, max_new_tokens=40),  # everything accepted
    APDConfig(R=0.0, W=4, M=12, max_new_tokens=40),  # the verifier decides
    APDConfig(R=0.6, W=1, M=1, max_new_tokens=20),  # smallest window and lookahead
    APDConfig(R=0.8, W=2, M=5, max_new_tokens=33),
    APDConfig(R=0.7, W=8, M=60, max_new_tokens=40),  # M beyond the generation length
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=lambda c: f"R{c.R}-W{c.W}-M{c.M}")
def test_greedy_matches_pytorch_loop_token_for_token(cfg, dream, qwen, torch_dream, torch_qwen):
    cfg = dataclasses.replace(cfg, eos_token_ids=(2,))
    result = apd_generate(dream, qwen, PROMPTS, cfg)
    for row, prompt in enumerate(PROMPTS):
        tokens, counts = reference(torch_dream, torch_qwen, prompt, cfg, eos=2)
        assert result.sequences()[row] == tokens
        assert result.accepted_per_pass(row) == counts
    if cfg.R == 1.0:
        assert result.accepted_per_pass(0) == [12, 12, 12, 4]


def test_eos_stops_a_row_and_pads_the_rest(dream, qwen, torch_dream, torch_qwen):
    cfg = APDConfig(R=0.7, W=4, M=12, max_new_tokens=40, eos_token_ids=())
    free = apd_generate(dream, qwen, PROMPTS[:1], cfg).sequences()[0]
    eos = free[9]  # a token the row really generates
    cfg = dataclasses.replace(cfg, eos_token_ids=(eos,))
    result = apd_generate(dream, qwen, PROMPTS[:1] + [[eos] + PROMPTS[1]], cfg)
    tokens, counts = reference(torch_dream, torch_qwen, PROMPTS[0], cfg, eos)
    assert result.sequences()[0] == tokens == free[: free.index(eos) + 1]
    assert result.accepted_per_pass(0) == counts
    assert result.stopped_at_eos[0] and result.lengths[0] == len(tokens)
    assert (result.tokens[0, len(tokens) :] == dream.cfg.pad_token_id).all()
    assert result.lengths[1] > 1  # an eos inside the prompt does not stop a row


def test_tokens_per_pass_counts_generated_tokens_only(dream, qwen):
    """A row whose eos comes mid-pass: the tokens that pass accepted after the eos are not generated."""
    cfg = APDConfig(R=1.0, W=4, M=12, max_new_tokens=40, eos_token_ids=())
    free = apd_generate(dream, qwen, PROMPTS[:1], cfg)
    tokens, first_pass = free.sequences()[0], free.accepted_per_pass(0)[0]
    # A token first generated inside the first pass, not at its end.
    at = next(j for j in range(3, first_pass - 1) if tokens[j] not in tokens[:j])
    result = apd_generate(dream, qwen, PROMPTS, dataclasses.replace(cfg, eos_token_ids=(tokens[at],)))
    assert result.lengths[0] == at + 1 and result.accepted[0].sum() > result.lengths[0]
    assert result.tokens_per_pass() == result.lengths.sum() / result.row_passes().sum()
    assert result.tokens_per_pass() < result.accepted.sum() / result.row_passes().sum()


def test_batched_run_equals_per_row_runs_and_the_eager_loop(dream, qwen):
    cfg = APDConfig(R=0.7, W=3, M=7, max_new_tokens=30, eos_token_ids=())
    batched = apd_generate(dream, qwen, PROMPTS, cfg)
    for row, prompt in enumerate(PROMPTS):
        single = apd_generate(dream, qwen, [prompt], cfg)
        assert single.sequences()[0] == batched.sequences()[row]
        assert single.accepted_per_pass(0) == batched.accepted_per_pass(row)
        assert apd_generate_eager(dream, qwen, prompt, cfg) == (batched.sequences()[row], batched.accepted_per_pass(row))


def test_jitted_loop_equals_eager_loop_when_sampling(dream, qwen):
    """Same key, same row: the compiled loop and the Python loop draw the same noise only at batch 1
    with the draft width equal to M, so compare those."""
    cfg = APDConfig(R=0.5, W=4, M=8, max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=50, eos_token_ids=())
    key = jax.random.key(3)
    jitted = apd_generate(dream, qwen, PROMPTS[:1], cfg, key)
    eager = apd_generate_eager(dream, qwen, PROMPTS[0], cfg, key)
    assert eager[1][0] == jitted.accepted_per_pass(0)[0]
    assert eager[0][: eager[1][0]] == jitted.sequences()[0][: eager[1][0]]


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_same_key_same_output_other_key_other_output(rule, dream, qwen):
    cfg = APDConfig(R=0.7, W=4, M=12, max_new_tokens=24, temperature=1.0, rule=rule, eos_token_ids=())
    a = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(1))
    b = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(1))
    c = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(2))
    assert a.sequences() == b.sequences() and a.accepted.tolist() == b.accepted.tolist()
    assert a.sequences() != c.sequences()


def test_paper_rule_with_R_one_accepts_every_drafted_token(dream, qwen):
    cfg = APDConfig(R=1.0, W=4, M=10, max_new_tokens=35, temperature=0.9, top_p=0.95, eos_token_ids=())
    result = apd_generate(dream, qwen, PROMPTS, cfg, jax.random.key(5))
    for row in range(len(PROMPTS)):
        assert result.accepted_per_pass(row) == [10, 10, 10, 5]


KNOBS = APDKnobs(R=jnp.float32(0.5), temperature=jnp.float32(1.0), top_p=jnp.float32(1.0), top_k=jnp.int32(0))


def test_paper_rule_accepts_everything_when_both_models_agree():
    logits = jax.random.normal(jax.random.key(0), (3, 6, 40)) * 3
    draft = jax.random.randint(jax.random.key(1), (3, 6), 0, 40)  # any draft: the noise decides both
    key = jax.random.key(2)
    from apd_jax.decoding.apd_rule import draft_tokens

    draft = draft_tokens(logits, key, KNOBS, mask_id=40)
    k = accepted_length(draft, logits, logits, jnp.array([6, 6, 4]), key, KNOBS, "paper", mask_id=40)
    np.testing.assert_array_equal(k, [6, 6, 4])


def test_acceptance_is_the_matching_prefix_on_literal_logits():
    # vocab 3; drafter prefers the draft everywhere; verifier disagrees at position 2.
    eye = jnp.eye(3) * 5.0
    draft = jnp.array([[0, 1, 2, 0]])
    logits_d = eye[draft]
    logits_v = eye[jnp.array([[1, 1, 0, 0]])]  # position 0 unused; disagrees at 2
    greedy = APDKnobs(R=jnp.float32(0.3), temperature=jnp.float32(0.0), top_p=jnp.float32(1.0), top_k=jnp.int32(0))
    n = jnp.array([4])
    for rule in ("paper", "reference"):
        assert int(accepted_length(draft, logits_d, logits_v, n, jax.random.key(0), greedy, rule, 99)[0]) == 2
    trust_drafter = dataclasses.replace(greedy, R=jnp.float32(0.9))
    assert int(accepted_length(draft, logits_d, logits_v, n, jax.random.key(0), trust_drafter, "reference", 99)[0]) == 4
    assert int(accepted_length(draft, logits_d, logits_v, jnp.array([3]), jax.random.key(0), trust_drafter, "reference", 99)[0]) == 3


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(R=1.5), "R=1.5 must lie in"),
        (dict(R=-0.1), "R=-0.1 must lie in"),
        (dict(W=0), "W=0 must be >= 1"),
        (dict(M=0), "M=0 must be >= 1"),
        (dict(top_p=0.0), "top_p=0.0 must lie in"),
        (dict(top_p=1.2), "top_p=1.2 must lie in"),
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(rule="fast"), "rule='fast' must be one of"),
        (dict(max_new_tokens=600), "exceeds the cache capacity 512"),
    ],
)
def test_bad_settings_are_clear_errors(kw, message, dream, qwen):
    with pytest.raises(ValueError, match=message):
        apd_generate(dream, qwen, PROMPTS[:1], APDConfig(**kw))


def test_bad_prompts_are_clear_errors(dream, qwen):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        apd_generate(dream, qwen, [[1, 2], []], APDConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"ids \[325\] outside the vocabulary \[0, 320\)"):
        apd_generate(dream, qwen, [[1, 325]], APDConfig(max_new_tokens=4))


def test_model_roles_and_vocabularies_are_checked(dream, qwen):
    with pytest.raises(ValueError, match="drafter must be a bidirectional"):
        shared_vocab_size(qwen.cfg, qwen.cfg)
    with pytest.raises(ValueError, match="verifier must be a causal"):
        shared_vocab_size(dream.cfg, dream.cfg)
    assert shared_vocab_size(dream.cfg, qwen.cfg) == 320

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    same = Tok({f"t{i}": i for i in range(300)})
    assert shared_vocab_size(dream.cfg, qwen.cfg, same, same) == 320
    with pytest.raises(ValueError, match="tokenizers disagree"):
        shared_vocab_size(dream.cfg, qwen.cfg, same, Tok({"t0": 1, "t1": 0}))
    with pytest.raises(ValueError, match="beyond the verifier's vocabulary of 320"):
        shared_vocab_size(dream.cfg, qwen.cfg, Tok({f"t{i}": i for i in range(330)}), same)


@pytest.mark.parametrize("K, W, M", [(1, 4, 12), (3, 2, 6), (5, 8, 40)])
def test_leftright_K_matches_pytorch_loop(K, W, M, dream, torch_dream):
    from apd_jax.decoding.apd import leftright_generate
    from apd_jax.bench.torch_reference.decoders import torch_leftright_generate

    cfg = APDConfig(W=W, M=M, max_new_tokens=30, eos_token_ids=(2,))
    result = leftright_generate(dream, PROMPTS, K, cfg)
    for row, prompt in enumerate(PROMPTS):
        tokens, counts = torch_leftright_generate(
            torch_dream, prompt, max_new_tokens=30, K=K, W=W, M=M, mask_token_id=MASK, eos_token_id=2,
            shared_vocab_size=336,
        )
        if 2 in tokens:
            tokens = tokens[: tokens.index(2) + 1]
        assert result.sequences()[row] == tokens
        assert result.accepted_per_pass(row) == counts
    with pytest.raises(ValueError, match="K=0 must be >= 1"):
        leftright_generate(dream, PROMPTS, 0, cfg)
