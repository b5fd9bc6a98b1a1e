"""Flax Qwen2 / Dream against PyTorch (transformers' Qwen2, the test's Dream reference) in float32."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from apd_jax.decoding.autoregressive import ARConfig, ar_generate
from apd_jax.models.cache import KVCache
from apd_jax.checkpoints import load_hf
from apd_jax.models.model import forward_logits, shift_right, with_config
from apd_jax.bench.torch_reference.dream import TorchDream, crop, shift_logits

# A long prompt: RoPE is the identity at position 0, short prompts hide RoPE bugs.
TOKENS = np.random.default_rng(0).integers(0, 320, size=(2, 200))


def test_qwen2_logits_match_transformers(qwen, torch_qwen):
    ours = np.asarray(forward_logits(qwen, jnp.asarray(TOKENS)))
    with torch.no_grad():
        ref = torch_qwen(torch.as_tensor(TOKENS)).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-4


def test_qwen2_cached_decoding_equals_full_forward(qwen):
    full = np.asarray(forward_logits(qwen, jnp.asarray(TOKENS[:, :40])))
    cache = KVCache.zeros(qwen.cfg, 2, 64)
    hidden, cache = qwen(jnp.asarray(TOKENS[:, :30]), cache=cache)
    steps = [qwen.logits(hidden)]
    for p in range(30, 40):
        hidden, cache = qwen(jnp.asarray(TOKENS[:, p : p + 1]), start=jnp.array([p, p]), cache=cache)
        steps.append(qwen.logits(hidden))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() < 1e-4
    np.testing.assert_array_equal(cache.lengths, [40, 40])


def test_qwen2_greedy_generation_matches_transformers_generate(qwen, torch_qwen):
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :19].tolist()]
    ours = ar_generate(qwen, prompts, ARConfig(max_new_tokens=32, eos_token_ids=()))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = torch_qwen.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert ours.sequences()[row] == ref
    assert ours.passes == 32


def test_dream_shifted_logits_match_reference(dream, dream_dir, torch_dream, capsys):
    """Against the PyTorch Dream run in float64: on these 200-token prompts float32 rounding alone
    moves the PyTorch logits by ~7e-5 and ours by ~6e-5 from the exact values, so the pairwise
    float32 difference (~1e-4) measures two roundings; the float64 run is the ground truth."""
    ours = np.asarray(forward_logits(dream, jnp.asarray(TOKENS)))
    with torch.no_grad():
        exact = shift_logits(TorchDream.from_pretrained(dream_dir, torch.float64)(torch.as_tensor(TOKENS))[0]).numpy()
        ref32 = shift_logits(torch_dream(torch.as_tensor(TOKENS))[0]).numpy()
    ours_err, torch_err = np.abs(ours - exact).max(), np.abs(ref32 - exact).max()
    with capsys.disabled():
        print(f"\n[fp32 dream] |ours - f64| {ours_err:.2e}, |torch fp32 - f64| {torch_err:.2e}, "
              f"|ours - torch fp32| {np.abs(ours - ref32).max():.2e}")
    assert ours_err < 1e-4
    assert ours_err <= torch_err  # no less accurate than the PyTorch float32 model


def test_dream_window_on_partly_filled_cache_matches_reference(dream, torch_dream):
    """Cache built from one pass, cropped to `left`, then a window [left, right) attends fully."""
    first = TOKENS[:1, :60]
    window = TOKENS[1:, 25:50]  # different tokens: the cached prefix is older context
    left, right = 25, 50
    cache = KVCache.zeros(dream.cfg, 1, 64)
    _, cache = dream(jnp.asarray(first), cache=cache)
    hidden, cache = dream(jnp.asarray(window), start=jnp.array([left]), cache=cache.crop(jnp.array([left])))
    ours = np.asarray(dream.logits(shift_right(hidden)))
    with torch.no_grad():
        _, past = torch_dream(torch.as_tensor(first), torch.arange(60)[None])
        logits, _ = torch_dream(torch.as_tensor(window), torch.arange(left, right)[None], crop(past, left))
    assert np.abs(ours - shift_logits(logits).numpy()).max() < 1e-4
    np.testing.assert_array_equal(cache.lengths, [right])


@pytest.mark.parametrize("kind", ["qwen", "dream"])
def test_bf16_differences_are_reported(kind, qwen_dir, dream_dir, torch_qwen, torch_dream, capsys):
    """bf16 against the float32 PyTorch reference: reported, with a loose sanity bound only."""
    model = load_hf(qwen_dir if kind == "qwen" else dream_dir, param_dtype="bfloat16")
    ours = np.asarray(forward_logits(model, jnp.asarray(TOKENS)))
    with torch.no_grad():
        if kind == "qwen":
            ref = torch_qwen(torch.as_tensor(TOKENS)).logits.numpy()
        else:
            ref = shift_logits(torch_dream(torch.as_tensor(TOKENS))[0]).numpy()
    diff = np.abs(ours - ref).max()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    with capsys.disabled():
        print(f"\n[bf16 {kind}] max |logit diff| {diff:.3f} (logit scale {np.abs(ref).max():.1f}), "
              f"top-1 agreement {top1:.3f}")
    assert top1 > 0.8


def test_with_config_shares_weights_and_refuses_new_shapes(qwen):
    same = with_config(qwen, qwen.cfg.replace(eos_token_ids=(7,)))
    assert same.cfg.eos_token_ids == (7,)
    np.testing.assert_array_equal(forward_logits(same, jnp.asarray(TOKENS[:, :20])),
                                  forward_logits(qwen, jnp.asarray(TOKENS[:, :20])))
    with pytest.raises(ValueError, match="changes parameter shapes"):
        with_config(qwen, qwen.cfg.replace(num_layers=qwen.cfg.num_layers + 1))


def test_attention_implementation_is_checked(qwen):
    with pytest.raises(ValueError, match="attention='flash'"):
        qwen.cfg.replace(attention="flash")
    # cuDNN attention is measured on GPUs (BENCHMARKS.md); elsewhere it is a clear error, not an XLA crash.
    cudnn = with_config(qwen, qwen.cfg.replace(attention="cudnn"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        forward_logits(cudnn, jnp.asarray(TOKENS[:, :20]))
