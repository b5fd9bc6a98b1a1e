"""The reference decoders of the parity tests, at temperature 0 (greedy), batch 1, CPU: compact
re-statements (not copies) of the published code's semantics:
- danielmisrael/apd `dream/generation_utils.py::apd_sample` (APD, torch_apd_generate, and
  "leftright", torch_leftright_generate),
- DreamLM/Dream `generation_utils.py::_sample` (maskgit_plus / topk_margin / entropy,
  torch_dream_diffusion_generate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from apd_jax.bench.torch_reference.dream import KVCache, TorchDream, crop, shift_logits

if TYPE_CHECKING:
    from transformers import DynamicCache, Qwen2ForCausalLM


# --------------------------------------------------------------------------
# APD / left-to-right (apd_sample at temperature 0)
# --------------------------------------------------------------------------


def _crop_dynamic_cache(cache: DynamicCache, n: int) -> None:
    # transformers 5: DynamicCache.crop(x) takes a NEGATIVE count of tokens to drop and raises on a
    # positive x (the reference, on 4.x, called crop(absolute_length)). Convert to the new form.
    drop = cache.get_seq_length() - n
    if drop > 0:
        cache.crop(-drop)


def _draft(mask_logits: torch.Tensor, shared_vocab_size: int, mask_token_id: int) -> torch.Tensor:
    # Deviation (a): draft only from the shared vocabulary. Deviation (b): never draft the mask.
    logits = mask_logits[..., :shared_vocab_size].clone()
    if mask_token_id < shared_vocab_size:
        logits[..., mask_token_id] = -torch.inf
    return logits.argmax(-1)


def _drafter_pass(
    drafter: TorchDream, x: torch.Tensor, past: KVCache | None, t: int, left: int, right: int,
    mask_token_id: int,
) -> tuple[torch.Tensor, KVCache]:
    """Run window x[left:right] on the cache cropped to `left`; shifted logits at the masked positions."""
    if past is not None:
        past = crop(past, left)
    positions = torch.arange(left, right).unsqueeze(0)
    logits, past = drafter(x[None, left:right], positions, past)
    logits = shift_logits(logits)[0]
    window_is_mask = x[left:right] == mask_token_id
    mask_logits = logits[window_is_mask]  # rows for positions t..right-1 (all still masked)
    assert mask_logits.shape[0] == right - t, "positions >= t must be exactly the masked ones"
    return mask_logits, past


def _window_draft(
    drafter: TorchDream, x: torch.Tensor, past: KVCache | None, t: int, k_prev: int, L: int, W: int, M: int,
    mask_token_id: int, shared_vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
    """One pass's drafter step: the window right = min(t + M, L), left = 0 on the first pass and
    max(t - W - k_prev + 1, 0) later; its masked positions' logits, the draft and the new cache."""
    right = min(t + M, L)
    left = 0 if past is None else max(t - W - k_prev + 1, 0)
    mask_logits, past = _drafter_pass(drafter, x, past, t, left, right, mask_token_id)
    return mask_logits, _draft(mask_logits, shared_vocab_size, mask_token_id), past


@torch.no_grad()
def torch_apd_generate(
    drafter: TorchDream, verifier: Qwen2ForCausalLM, prompt: list[int], *, max_new_tokens: int, R: float,
    W: int, M: int, mask_token_id: int, eos_token_id: int, shared_vocab_size: int,
) -> tuple[list[int], list[int]]:
    """Greedy APD (published acceptance rule at temperature 0), batch 1. Returns (generated ids, k per pass)."""
    p = len(prompt)
    if p < 1:
        raise ValueError("the first verifier pass reads the logit of position len(prompt)-1")
    v_vocab = verifier.config.vocab_size
    if not shared_vocab_size <= min(v_vocab, drafter.cfg.vocab_size):
        raise ValueError(f"shared_vocab_size {shared_vocab_size} exceeds a vocabulary "
                         f"(drafter {drafter.cfg.vocab_size}, verifier {v_vocab})")
    L = p + max_new_tokens
    x = torch.tensor(prompt + [mask_token_id] * max_new_tokens, dtype=torch.long)
    t, k_prev = p, 0
    d_past: KVCache | None = None
    v_cache = None
    prev_logit: torch.Tensor | None = None  # verifier logit for position t, carried over passes
    counts: list[int] = []
    while t < L:
        mask_logits, x0, d_past = _window_draft(drafter, x, d_past, t, k_prev, L, W, M, mask_token_id,
                                                shared_vocab_size)
        n = x0.shape[0]
        right = t + n  # the window's end: every position t..right-1 was drafted

        if v_cache is None:  # prefill: prompt + draft, no cache; logits shifted by one
            draft = x[:right].clone()
            draft[t:right] = x0
            out = verifier(draft[None], use_cache=True)
            v_logits = out.logits[0, t - 1:-1]
        else:  # draft only, at positions t..right-1, on the cache; carried logit supplies position t
            assert prev_logit is not None
            positions = torch.arange(t, right).unsqueeze(0)
            out = verifier(x0[None], past_key_values=v_cache, position_ids=positions, use_cache=True)
            v_logits = torch.cat([prev_logit[None], out.logits[0, :-1]], dim=0)
        v_cache = out.past_key_values
        v_logits = v_logits[:M]

        # Published rule at temperature 0: y = argmax(R * D + (1 - R) * AR) over the shared vocab.
        target = R * mask_logits[:, :shared_vocab_size] + (1 - R) * v_logits[:, :shared_vocab_size]
        if mask_token_id < shared_vocab_size:  # deviation (b), after mixing (avoids 0 * -inf)
            target[:, mask_token_id] = -torch.inf
        y = target.argmax(-1)
        accept = x0 == y
        accept[0] = True
        k = min(int(torch.cumprod(accept.long(), 0).sum()), n)

        # Carried logit: position t+k's prediction; the reference takes the last one when all are
        # accepted (it only ever feeds position 0 of the next pass, which is always accepted).
        prev_logit = v_logits[k] if k < v_logits.shape[0] else v_logits[-1]
        _crop_dynamic_cache(v_cache, t + k)
        x[t:t + k] = x0[:k]
        t += k
        k_prev = k
        counts.append(k)
        if bool((x[p:t] == eos_token_id).any()):  # eos among generated tokens only (deviation)
            break
    return x[p:t].tolist(), counts


@torch.no_grad()
def torch_leftright_generate(
    drafter: TorchDream, prompt: list[int], *, max_new_tokens: int, K: int, W: int, M: int,
    mask_token_id: int, eos_token_id: int, shared_vocab_size: int,
) -> tuple[list[int], list[int]]:
    """apd_sample with alg "leftright": accept the first K drafted tokens each pass (Dream K=k)."""
    p = len(prompt)
    L = p + max_new_tokens
    x = torch.tensor(prompt + [mask_token_id] * max_new_tokens, dtype=torch.long)
    t, k_prev = p, 0
    d_past: KVCache | None = None
    counts: list[int] = []
    while t < L:
        mask_logits, x0, d_past = _window_draft(drafter, x, d_past, t, k_prev, L, W, M, mask_token_id,
                                                shared_vocab_size)
        k = min(K, x0.shape[0])
        x[t:t + k] = x0[:k]
        t += k
        k_prev = k
        counts.append(k)
        if bool((x[p:t] == eos_token_id).any()):
            break
    return x[p:t].tolist(), counts


# --------------------------------------------------------------------------
# Dream diffusion_generate (_sample) at temperature 0
# --------------------------------------------------------------------------


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Dream's `top_k_logits`: every logit below the k-th largest set to the dtype's minimum (ties kept)."""
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


@torch.no_grad()
def torch_dream_diffusion_generate(
    model: TorchDream, prompt: list[int], *, max_new_tokens: int, steps: int, alg: str,
    eps: float = 1e-3, mask_token_id: int, top_k: int | None = None,
) -> list[int]:
    """Dream `_sample` for alg in {maskgit_plus, topk_margin, entropy}, temperature 0, alg_temp None.

    Follows Dream exactly, including that the mask token is NOT excluded from the argmax, and that
    the transfer count is computed in float32 from torch.linspace (int(n * (1 - s / t)) truncates,
    so the float32 values matter at integer boundaries). top_k (None: off, as Dream's `if top_k is
    not None`) filters the logits before the softmax, so every confidence is read from
    probabilities renormalised over the top k tokens, as Dream's `sample_tokens` does.
    """
    if alg not in ("maskgit_plus", "topk_margin", "entropy"):
        raise ValueError(f"unsupported alg {alg!r}")
    p = len(prompt)
    x = torch.tensor([prompt + [mask_token_id] * max_new_tokens], dtype=torch.long)
    timesteps = torch.linspace(1, eps, steps + 1)  # float32, as in Dream
    for i in range(steps):
        mask_index = x == mask_token_id
        logits, _ = model(x)  # full sequence, positions 0..L-1, no cache, no mask
        mask_logits = shift_logits(logits)[mask_index]
        if top_k is not None:
            mask_logits = top_k_logits(mask_logits, top_k)
        probs = torch.softmax(mask_logits, dim=-1)
        confidence, x0 = probs.max(dim=-1)
        if alg == "topk_margin":
            top2 = torch.sort(probs, dim=-1, descending=True).values
            confidence = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask = mask_index.sum()
        n_transfer = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        if n_transfer > 0:
            _, idx = torch.topk(confidence, n_transfer)
            new = torch.full_like(x0, mask_token_id)
            new[idx] = x0[idx]
            x[mask_index] = new
    return x[0, p:].tolist()
