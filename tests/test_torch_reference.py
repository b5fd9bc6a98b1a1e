"""Checks of the PyTorch reference itself (apd_jax/bench/torch_reference/), before the JAX code is compared to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import MASK
from apd_jax.bench.torch_reference.checkpoints import load_safetensors_dir, save_tiny_dream, save_tiny_qwen2
from apd_jax.bench.torch_reference.decoders import torch_apd_generate, torch_dream_diffusion_generate, torch_leftright_generate
from apd_jax.bench.torch_reference.dream import TorchDream, crop, shift_logits

transformers = pytest.importorskip("transformers")

SHARED = 320
NO_EOS = 335  # drafter-only id: never drafted (drafts are restricted to the shared vocab)
PROMPT = [5, 17, 42, 7, 99, 3]


def _verifier(path: Path):  # type: ignore[no-untyped-def]
    return transformers.Qwen2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "dream": save_tiny_dream(root / "dream", seed=1),
        "qwen2": save_tiny_qwen2(root / "qwen2", seed=2),
    }


@pytest.fixture(scope="module")
def drafter(ckpts: dict[str, Path]) -> TorchDream:
    return TorchDream.from_pretrained(ckpts["dream"])


@pytest.fixture(scope="module")
def verifier(ckpts: dict[str, Path]):  # type: ignore[no-untyped-def]
    return _verifier(ckpts["qwen2"])


# (i) layer math: TorchDream with a causal mask == transformers Qwen2 on the same weights.
def test_torchdream_causal_matches_hf_qwen2(tmp_path: Path) -> None:
    path = save_tiny_qwen2(tmp_path / "q", seed=3, tie_word_embeddings=False)
    hf = _verifier(path)
    ours = TorchDream.from_pretrained(path)
    ids = torch.tensor([[1, 9, 250, 33, 7, 7, 120, 64, 2, 300, 11, 5]])
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids, causal=True)
        # Also the causal path with a cache (prefix then suffix) equals the one-shot forward.
        _, past = ours(ids[:, :5], causal=True)
        tail, _ = ours(ids[:, 5:], past=past, causal=True)
    assert ref.abs().std() > 1.0  # random weights give well-spread logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail, ref[:, 5:], atol=1e-5, rtol=1e-5)
    # Tied checkpoint (no lm_head.weight in the file) loads through the embedding.
    tied = save_tiny_qwen2(tmp_path / "t", seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            TorchDream.from_pretrained(tied)(ids, causal=True)[0], _verifier(tied)(ids).logits, atol=1e-5, rtol=1e-5
        )


# (ii) K/V consistency: a window on a cropped cache == the full forward at the window's positions.
@pytest.mark.parametrize("left,right", [(0, 14), (4, 14), (9, 20), (13, 14)])
def test_window_on_cropped_cache_matches_full_forward(drafter: TorchDream, left: int, right: int) -> None:
    x = torch.tensor([PROMPT + [60, 61, 62, 63, 64, 65, 66] + [MASK] * 7])
    with torch.no_grad():
        full, past = drafter(x[:, :right])
        win, new_past = drafter(x[:, left:right], torch.arange(left, right)[None], crop(past, left))
    # Different matmul shapes reorder float32 sums: ~1e-5 absolute on logits of std ~3.
    torch.testing.assert_close(win, full[:, left:], atol=1e-4, rtol=1e-5)
    for (k0, v0), (k1, v1) in zip(past, new_past):
        torch.testing.assert_close(k1, k0)
        torch.testing.assert_close(v1, v0)
    # Full attention: the window's logits depend on tokens after them (unlike a causal model).
    y = x[:, :right].clone()
    y[0, right - 1] = 0 if int(y[0, right - 1]) else 1
    with torch.no_grad():
        changed, _ = drafter(y)
    assert not torch.allclose(changed[:, 0], full[:, 0])


def test_shift_logits() -> None:
    z = torch.arange(8.0).view(1, 4, 2)
    assert shift_logits(z)[0, :, 0].tolist() == [0.0, 0.0, 2.0, 4.0]


def test_dream_checkpoint_layout(ckpts: dict[str, Path]) -> None:
    cfg = json.loads((ckpts["dream"] / "config.json").read_text())
    assert cfg["model_type"] == "Dream" and cfg["architectures"] == ["DreamModel"]
    assert cfg["mask_token_id"] == MASK and cfg["vocab_size"] == 336 and cfg["tie_word_embeddings"] is False
    gen = json.loads((ckpts["dream"] / "generation_config.json").read_text())
    assert gen["mask_token_id"] == MASK and gen["eos_token_id"] == 2
    state = load_safetensors_dir(ckpts["dream"])
    assert "lm_head.weight" in state and "model.layers.1.self_attn.k_proj.bias" in state
    norm = state["model.layers.0.input_layernorm.weight"]
    assert 0.75 < float(norm.min()) and float(norm.max()) < 1.25 and float(norm.std()) > 0.05
    assert float(state["model.layers.0.self_attn.q_proj.bias"].abs().mean()) > 0.1
    qcfg = json.loads((ckpts["qwen2"] / "config.json").read_text())
    assert qcfg["rope_theta"] == 10000.0 and qcfg["tie_word_embeddings"] is True
    assert (ckpts["qwen2"] / "generation_config.json").exists()


# (iii) APD at R=1 accepts the whole first draft.
def test_apd_r1_accepts_everything(drafter: TorchDream, verifier) -> None:  # type: ignore[no-untyped-def]
    tokens, counts = torch_apd_generate(
        drafter, verifier, PROMPT, max_new_tokens=24, R=1.0, W=4, M=16,
        mask_token_id=MASK, eos_token_id=NO_EOS, shared_vocab_size=SHARED,
    )
    assert counts == [16, 8] and len(tokens) == 24
    assert all(t < SHARED for t in tokens)


# (iii) APD at R=0: every accepted token after the first of its pass is the verifier's greedy choice.
def test_apd_r0_follows_verifier_greedy(tmp_path: Path) -> None:
    # A tiny vocabulary makes drafter/verifier agreement (k > 1) frequent, so the check is not vacuous.
    mask, shared, no_eos = 9, 8, 8  # no_eos >= shared: never drafted
    drafter = TorchDream.from_pretrained(save_tiny_dream(tmp_path / "d", seed=4, vocab_size=10, mask_token_id=mask))
    verifier = _verifier(save_tiny_qwen2(tmp_path / "v", seed=5, vocab_size=shared))
    prompt = [3, 1, 4, 1]
    tokens, counts = torch_apd_generate(
        drafter, verifier, prompt, max_new_tokens=40, R=0.0, W=3, M=8,
        mask_token_id=mask, eos_token_id=no_eos, shared_vocab_size=shared,
    )
    assert len(tokens) == 40 and sum(counts) == 40
    assert max(counts) > 1, "no multi-token acceptance: the R=0 check would be vacuous"
    with torch.no_grad():
        greedy = verifier(torch.tensor([prompt + tokens])).logits[0].argmax(-1)  # causal: one pass suffices
    pos = len(prompt)
    checked = 0
    for k in counts:
        for j in range(1, k):
            assert tokens[pos - len(prompt) + j] == int(greedy[pos + j - 1])
            checked += 1
        pos += k
    assert checked == sum(counts) - len(counts) >= 10


def test_apd_intermediate_r_and_eos_stop(drafter: TorchDream, verifier) -> None:  # type: ignore[no-untyped-def]
    kw = dict(max_new_tokens=30, R=0.7, W=4, M=10, mask_token_id=MASK, shared_vocab_size=SHARED)
    tokens, counts = torch_apd_generate(drafter, verifier, PROMPT, eos_token_id=NO_EOS, **kw)
    assert len(tokens) == 30 and sum(counts) == 30 and all(1 <= k <= 10 for k in counts)
    # Stop on eos among the generated tokens: the pass that writes it is the last one.
    first_pass_end = counts[0]
    eos = tokens[first_pass_end]  # first token of the second pass
    stop_at = tokens.index(eos)
    ends = [sum(counts[: i + 1]) for i in range(len(counts))]
    expected_len = next(e for e in ends if e > stop_at)
    t2, c2 = torch_apd_generate(drafter, verifier, PROMPT, eos_token_id=eos, **kw)
    assert t2 == tokens[:expected_len] and c2 == counts[: len(c2)] and sum(c2) == expected_len
    # An eos inside the prompt does not stop generation (deliberate fix of the reference quirk).
    t3, _ = torch_apd_generate(drafter, verifier, PROMPT, eos_token_id=PROMPT[1], **kw)
    assert len(t3) > counts[0] or PROMPT[1] in t3[: counts[0]]


def test_apd_rejects_bad_shared_vocab(drafter: TorchDream, verifier) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        torch_apd_generate(drafter, verifier, PROMPT, max_new_tokens=4, R=0.5, W=4, M=4,
                           mask_token_id=MASK, eos_token_id=NO_EOS, shared_vocab_size=336)


def test_leftright_full_window_equals_no_cache_greedy(drafter: TorchDream) -> None:
    # W and M covering everything make left = 0 each pass: the loop must equal plain recomputation.
    n = 10
    tokens, counts = torch_leftright_generate(
        drafter, PROMPT, max_new_tokens=n, K=1, W=64, M=64,
        mask_token_id=MASK, eos_token_id=NO_EOS, shared_vocab_size=SHARED,
    )
    assert counts == [1] * n
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq + [MASK] * (len(PROMPT) + n - len(seq))])
            logits = shift_logits(drafter(x)[0])[0, len(seq), :SHARED]
            seq.append(int(logits.argmax()))
    assert tokens == seq[len(PROMPT):]


def test_leftright_windowed_counts(drafter: TorchDream) -> None:
    tokens, counts = torch_leftright_generate(
        drafter, PROMPT, max_new_tokens=11, K=3, W=2, M=5,
        mask_token_id=MASK, eos_token_id=NO_EOS, shared_vocab_size=SHARED,
    )
    assert counts == [3, 3, 3, 2] and len(tokens) == 11 and all(t < SHARED for t in tokens)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_diffusion_one_step_is_one_argmax(drafter: TorchDream, alg: str) -> None:
    n = 12
    out = torch_dream_diffusion_generate(drafter, PROMPT, max_new_tokens=n, steps=1, alg=alg, mask_token_id=MASK)
    with torch.no_grad():
        logits = shift_logits(drafter(torch.tensor([PROMPT + [MASK] * n]))[0])[0, len(PROMPT):]
    assert out == logits.argmax(-1).tolist()  # full vocabulary: Dream does not exclude the mask


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_diffusion_first_step_transfers_most_confident(drafter: TorchDream, alg: str) -> None:
    n, steps = 12, 3
    out = torch_dream_diffusion_generate(drafter, PROMPT, max_new_tokens=n, steps=steps, alg=alg, mask_token_id=MASK)
    assert len(out) == n
    with torch.no_grad():
        probs = torch.softmax(shift_logits(drafter(torch.tensor([PROMPT + [MASK] * n]))[0])[0, len(PROMPT):], -1)
    conf = {
        "maskgit_plus": probs.max(-1).values,
        "topk_margin": probs.topk(2, -1).values[:, 0] - probs.topk(2, -1).values[:, 1],
        "entropy": (probs * torch.log(probs + 1e-10)).sum(-1),
    }[alg]
    ts = torch.linspace(1, 1e-3, steps + 1)
    n0 = int(torch.tensor(n) * (1 - ts[1] / ts[0]))
    assert n0 == 3
    first = conf.topk(n0).indices
    assert [out[i] for i in first.tolist()] == probs.argmax(-1)[first].tolist()


# (iv) sharded and single-file checkpoints hold identical tensors.
def test_sharded_equals_single(tmp_path: Path) -> None:
    single = save_tiny_dream(tmp_path / "d1", seed=7)
    sharded = save_tiny_dream(tmp_path / "d2", seed=7, sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (sharded / "model.safetensors").exists()
    a, b = load_safetensors_dir(single), load_safetensors_dir(sharded)
    assert a.keys() == b.keys() == index["weight_map"].keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = TorchDream.from_pretrained(single), TorchDream.from_pretrained(sharded)
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)

    q1 = save_tiny_qwen2(tmp_path / "q1", seed=8)
    q2 = save_tiny_qwen2(tmp_path / "q2", seed=8, sharded=True)
    assert (q2 / "model.safetensors.index.json").exists() and not (q2 / "model.safetensors").exists()
    s1, s2 = _verifier(q1).state_dict(), _verifier(q2).state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # The files themselves agree too (tied: no lm_head.weight stored).
    f1, f2 = load_safetensors_dir(q1), load_safetensors_dir(q2)
    assert f1.keys() == f2.keys() and "lm_head.weight" not in f1
    assert all(torch.equal(f1[k], f2[k]) for k in f1)


def test_bf16_checkpoint_roundtrip(tmp_path: Path) -> None:
    path = save_tiny_dream(tmp_path / "b", seed=9, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = load_safetensors_dir(path)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    model = TorchDream.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        logits, _ = model(torch.tensor([PROMPT]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
