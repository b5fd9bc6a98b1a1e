"""Dream's sampler (parity with the PyTorch `_sample`), threshold parallel decoding, bad input."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from apd_jax.decoding.diffusion import (
    DiffusionConfig,
    ThresholdConfig,
    diffusion_generate,
    dream_timesteps,
    dream_transfer_ratios,
    threshold_generate,
)
from conftest import MASK, PROMPTS
from apd_jax.bench.torch_reference.decoders import torch_dream_diffusion_generate
from apd_jax.bench.torch_reference.dream import shift_logits

N = 16
WHOLE = dict(max_new_tokens=N, eos_token_ids=())  # no eos: the whole canvas, as the reference returns it


@torch.no_grad()
def torch_parallel_generate(model, prompt, n, threshold, eot_threshold=None, eos=()):
    """Eager parallel decoding of one row on an exact-size canvas: commit masked positions with
    probability > threshold and the most confident one; End-of-Text physically cuts the canvas."""
    p, gen, counts = len(prompt), [MASK] * n, []
    while True:
        first_eos = next((i for i, t in enumerate(gen) if t in eos), len(gen))
        masked = [i for i in range(len(gen)) if gen[i] == MASK]
        if not any(i < first_eos for i in masked):
            break
        logits = shift_logits(model(torch.tensor([prompt + gen]))[0])[0, p:]
        logits[:, MASK] = -torch.inf
        conf, tok = torch.softmax(logits, -1).max(-1)
        conf, tok = conf.tolist(), tok.tolist()
        best = max(masked, key=lambda i: (conf[i], -i))
        new = list(gen)
        for i in masked:
            if conf[i] > threshold or i == best:
                new[i] = tok[i]
        eot = [i for i in masked if tok[i] in eos and eot_threshold is not None and conf[i] > eot_threshold]
        if eot:
            new[eot[0]] = tok[eot[0]]
            new = new[: eot[0] + 1]
        counts.append(sum(gen[i] == MASK and new[i] != MASK for i in range(len(new))))
        gen = new
    first_eos = next((i for i, t in enumerate(gen) if t in eos), None)
    return gen if first_eos is None else gen[: first_eos + 1], counts


# --- Dream's schedule -------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 1e-4, 0.05, 0.3])
def test_timesteps_and_counts_match_torch_bit_for_bit(eps):
    """Plain float32 arithmetic misses torch.linspace by an ulp for most step counts, enough to move
    int(num_mask * (1 - s / t)) at integer boundaries; ours must equal it everywhere."""
    num_mask = torch.arange(0, 1025)[:, None]
    for steps in list(range(1, 200)) + [511, 512, 1000, 1024]:
        ts = torch.linspace(1, eps, steps + 1)
        np.testing.assert_array_equal(dream_timesteps(steps, eps), ts.numpy())
        theirs = (num_mask * (1 - ts[1:] / ts[:-1])).to(torch.int64).numpy()[:, :-1]
        ours = dream_transfer_ratios(steps, eps)
        counts = (num_mask.numpy().astype(np.float32) * ours).astype(np.int64)
        np.testing.assert_array_equal(counts[:, :-1], theirs)
        assert ours[-1] == 1.0  # the last step transfers every remaining mask


# --- Dream's sampler: parity with the PyTorch reference ---------------------


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [1, 3, 7, N])
def test_greedy_matches_dream_sample_at_its_published_defaults(dream, torch_dream, alg, steps):
    """DiffusionConfig's defaults are the published code's: top_k 50 (Dream's `top_k_logits`) even at temperature 0."""
    result = diffusion_generate(dream, PROMPTS, DiffusionConfig(steps=steps, alg=alg, **WHOLE))
    for row, prompt in enumerate(PROMPTS):
        ref = torch_dream_diffusion_generate(
            torch_dream, prompt, max_new_tokens=N, steps=steps, alg=alg, mask_token_id=MASK, top_k=50
        )
        assert result.tokens[row].tolist() == ref
    assert result.passes == steps and result.accepted.shape == (3, steps)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("steps", [3, N])
def test_greedy_without_top_k_matches_dream_sample(dream, torch_dream, alg, steps):
    result = diffusion_generate(dream, PROMPTS, DiffusionConfig(steps=steps, alg=alg, top_k=0, **WHOLE))
    for row, prompt in enumerate(PROMPTS):
        ref = torch_dream_diffusion_generate(
            torch_dream, prompt, max_new_tokens=N, steps=steps, alg=alg, mask_token_id=MASK, top_k=None
        )
        assert result.tokens[row].tolist() == ref


def test_top_k_changes_the_unmasking_order_at_temperature_zero(dream):
    """The top-50 renormalisation matters on the tiny model too, so the two parity tests above differ."""
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        config = DiffusionConfig(steps=N, alg=alg, **WHOLE)
        with_top_k = diffusion_generate(dream, PROMPTS, config).tokens.tolist()
        assert with_top_k != diffusion_generate(dream, PROMPTS, dataclasses.replace(config, top_k=0)).tokens.tolist()


def test_more_steps_than_tokens_matches(dream, torch_dream):
    result = diffusion_generate(dream, PROMPTS[:2], DiffusionConfig(steps=N + 5, alg="entropy", **WHOLE))
    for row, prompt in enumerate(PROMPTS[:2]):
        ref = torch_dream_diffusion_generate(
            torch_dream, prompt, max_new_tokens=N, steps=N + 5, alg="entropy", mask_token_id=MASK, top_k=50
        )
        assert result.tokens[row].tolist() == ref


def test_batched_equals_per_row(dream):
    config = DiffusionConfig(steps=7, alg="maskgit_plus", **WHOLE)
    batched = diffusion_generate(dream, PROMPTS, config)
    for row, prompt in enumerate(PROMPTS):
        alone = diffusion_generate(dream, [prompt], config)
        assert alone.tokens[0].tolist() == batched.tokens[row].tolist()
        assert alone.accepted[0].tolist() == batched.accepted[row].tolist()


def test_schedule_is_per_row_and_alg_temp_only_moves_positions(dream):
    """Counts follow int(num_mask * ratio) per row whatever picks the positions (no mask is predicted here)."""
    base = DiffusionConfig(steps=5, alg="entropy", **WHOLE)
    greedy = diffusion_generate(dream, PROMPTS, base)
    assert greedy.accepted.tolist() == [[3, 3, 3, 3, 4]] * 3  # int(n * (1 - s/t)) from 16 masks, eps 1e-3
    tiny_temp = diffusion_generate(dream, PROMPTS, dataclasses.replace(base, alg_temp=1e-9))
    assert tiny_temp.tokens.tolist() == greedy.tokens.tolist()  # Gumbel top-k -> top-k as alg_temp -> 0
    hot = diffusion_generate(dream, PROMPTS, dataclasses.replace(base, alg_temp=5.0))
    assert hot.accepted.tolist() == greedy.accepted.tolist() and hot.tokens.tolist() != greedy.tokens.tolist()
    sampled = dataclasses.replace(base, temperature=1.0, top_p=0.9, top_k=20)
    first = diffusion_generate(dream, PROMPTS, sampled, key=jax.random.key(3))
    again = diffusion_generate(dream, PROMPTS, sampled, key=jax.random.key(3))
    assert first.tokens.tolist() == again.tokens.tolist() and first.accepted.tolist() == greedy.accepted.tolist()


def test_origin_transfers_everything_by_the_last_step(dream):
    one = diffusion_generate(dream, PROMPTS, DiffusionConfig(steps=1, alg="origin", **WHOLE))
    argmax = diffusion_generate(dream, PROMPTS, DiffusionConfig(steps=1, alg="maskgit_plus", **WHOLE))
    assert one.tokens.tolist() == argmax.tokens.tolist()
    result = diffusion_generate(dream, PROMPTS, DiffusionConfig(steps=6, alg="origin", **WHOLE), jax.random.key(1))
    assert (result.accepted.sum(axis=1) == N).all() and (result.tokens != MASK).all()
    assert len({tuple(r) for r in result.accepted.tolist()}) > 1  # rows draw their own positions


def test_eos_cuts_the_row_and_stops_early(dream):
    config = DiffusionConfig(steps=N, alg="maskgit_plus", **WHOLE)
    free = diffusion_generate(dream, PROMPTS[:1], config).tokens[0].tolist()
    eos = free[6]
    result = diffusion_generate(dream, PROMPTS[:1], dataclasses.replace(config, eos_token_ids=(eos,)))
    cut = free.index(eos) + 1
    assert result.sequences()[0] == free[:cut] and result.stopped_at_eos[0] and result.lengths[0] == cut
    assert (result.tokens[0, cut:] == dream.cfg.pad_token_id).all()
    assert result.passes <= N


# --- Threshold parallel decoding --------------------------------------------


def test_threshold_one_is_one_token_per_pass_in_confidence_order(dream, torch_dream):
    result = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=1.0, **WHOLE))
    assert result.passes == N and (result.accepted == 1).all()
    for row, prompt in enumerate(PROMPTS):
        tokens, counts = torch_parallel_generate(torch_dream, prompt, N, threshold=1.0)
        assert result.sequences()[row] == tokens and counts == [1] * N


@pytest.mark.parametrize("threshold", [0.4, 0.2])
def test_threshold_matches_eager_loop(dream, torch_dream, threshold):
    result = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=threshold, **WHOLE))
    for row, prompt in enumerate(PROMPTS):
        tokens, counts = torch_parallel_generate(torch_dream, prompt, N, threshold=threshold)
        assert result.sequences()[row] == tokens
        assert result.accepted_per_pass(row) == counts
    assert not (result.tokens == MASK).any()


def test_lower_threshold_fewer_passes(dream):
    passes = [threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=t, **WHOLE)).row_passes()
              for t in (1.0, 0.4, 0.2, 1e-6)]
    assert (passes[0] == N).all()
    assert (passes[0] >= passes[1]).all() and (passes[1] >= passes[2]).all() and passes[2].sum() < passes[0].sum()
    assert (passes[3] == 1).all()  # everything is above a tiny threshold: one pass


def test_threshold_batched_equals_per_row(dream):
    config = ThresholdConfig(threshold=0.3, **WHOLE)
    batched = threshold_generate(dream, PROMPTS, config)
    for row, prompt in enumerate(PROMPTS):
        alone = threshold_generate(dream, [prompt], config)
        assert alone.sequences()[0] == batched.sequences()[row]
        assert alone.accepted_per_pass(0) == batched.accepted_per_pass(row)


def test_threshold_eos_and_end_of_text_match_eager_loop(dream, torch_dream):
    free = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=0.3, **WHOLE)).sequences()[0]
    eos = free[5]
    passes = {}
    for eot in (None, 0.0):
        config = ThresholdConfig(threshold=0.3, max_new_tokens=N, eos_token_ids=(eos,), eot_threshold=eot)
        result = threshold_generate(dream, PROMPTS, config)
        for row, prompt in enumerate(PROMPTS):
            tokens, counts = torch_parallel_generate(torch_dream, prompt, N, 0.3, eot_threshold=eot, eos=(eos,))
            assert result.sequences()[row] == tokens
            assert result.accepted_per_pass(row) == counts
            assert result.stopped_at_eos[row] == (eos in tokens)
            assert (result.tokens[row, result.lengths[row]:] == dream.cfg.pad_token_id).all()
        assert result.sequences()[0][-1] == eos
        passes[eot] = result.row_passes()
    assert passes[0.0][0] < passes[None][0]  # End-of-Text dropped row 0's tail early


# --- Bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (DiffusionConfig(steps=0), "steps=0"),
        (DiffusionConfig(alg="greedy"), "not a Dream algorithm"),
        (DiffusionConfig(eps=0.0), "eps=0.0"),
        (DiffusionConfig(eps=1.0), "eps=1.0"),
        (DiffusionConfig(alg_temp=-1.0), "alg_temp"),
        (DiffusionConfig(max_new_tokens=0), "max_new_tokens"),
        (DiffusionConfig(top_p=0.0), "top_p"),
        (ThresholdConfig(threshold=0.0), "threshold=0.0"),
        (ThresholdConfig(threshold=1.5), "threshold=1.5"),
        (ThresholdConfig(eot_threshold=1.0), "eot_threshold"),
        (ThresholdConfig(temperature=-1.0), "temperature"),
    ],
)
def test_bad_settings_raise(dream, config, message):
    generate = diffusion_generate if isinstance(config, DiffusionConfig) else threshold_generate
    with pytest.raises(ValueError, match=message):
        generate(dream, PROMPTS, config)


def test_bad_prompts_and_models_raise(dream, qwen):
    with pytest.raises(ValueError, match="mask token"):
        diffusion_generate(dream, [[1, MASK, 2]], DiffusionConfig(**WHOLE))
    with pytest.raises(ValueError, match="empty"):
        threshold_generate(dream, [[]], ThresholdConfig(**WHOLE))
    with pytest.raises(ValueError, match="bidirectional"):
        diffusion_generate(qwen, PROMPTS, DiffusionConfig(**WHOLE))
    with pytest.raises(ValueError, match="capacity"):
        diffusion_generate(dream, PROMPTS, DiffusionConfig(max_new_tokens=N, max_len=20))
