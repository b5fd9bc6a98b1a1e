"""The reference of apd_jax.decoding.blocks.dream: NVlabs/Fast-dLLM (commit 24cc59e)
dream/model/generation_utils_block.py `_sample` re-stated for one row at temperature 0 on the
parity tests' TorchDream, with its prefix cache (the cache cropped to the block's start, the
window from the block's start to the end) or its dual cache (the window is the block, attending to
the cache before and after it: TorchDream appends the window's K/V after the cached ones, which
for bidirectional attention over RoPE-rotated keys is Fast-dLLM's in-place replace_position).

Kept as published: the block's first pass commits only its first position; window logits are
shifted within the window; the mask token is not excluded; the threshold rule keeps confidence
>= threshold and at least the most confident; the schedule uses the entropy confidence and
int(masks * (1 - s / t)) from float32 timesteps; top_k filters before the softmax. Tied
confidences go to the lower position (torch.topk's order is unspecified).
"""

from __future__ import annotations

import torch

from apd_jax.bench.torch_reference.decoders import top_k_logits
from apd_jax.bench.torch_reference.dream import KVCache, TorchDream, shift_logits


def _sample_tokens(logits: torch.Tensor, top_k: int | None, neg_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast-dLLM's sample_tokens at temperature 0: (confidence, argmax) of the top_k-filtered softmax."""
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    confidence, x0 = probs.max(dim=-1)
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _top(confidence: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest entries' indices, best first, ties to the lower index."""
    return torch.sort(confidence, descending=True, stable=True).indices[:k]


def _window_cache(past: KVCache, start: int, end: int, dual: bool) -> KVCache:
    """The cache a window pass attends to: before the block (prefix), or before and after it (dual)."""
    if not dual:
        return [(k[:, :, :start], v[:, :, :start]) for k, v in past]
    return [(torch.cat([k[:, :, :start], k[:, :, end:]], 2), torch.cat([v[:, :, :start], v[:, :, end:]], 2))
            for k, v in past]


@torch.no_grad()
def fastdllm_dream_generate(
    model: TorchDream, prompt: list[int], *, max_new_tokens: int, steps: int, block_length: int,
    threshold: float | None, dual_cache: bool, mask_token_id: int, eps: float = 1e-3, top_k: int | None = 50,
) -> list[int]:
    """Fast-dLLM's Dream block decoding of one prompt: the answer's tokens (masks where left)."""
    x = torch.tensor([prompt + [mask_token_id] * max_new_tokens], dtype=torch.long)
    num_blocks = max_new_tokens // block_length
    steps_per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1)
    for num_block in range(num_blocks):
        start = len(prompt) + num_block * block_length
        end = start + block_length
        logits, past = model(x)
        _, x0 = _sample_tokens(shift_logits(logits), top_k, neg_entropy=False)
        x[:, start] = x0[:, start]
        i = 1
        while True:
            if threshold is None and i == steps_per_block:
                break
            window_end = end if dual_cache else x.shape[1]
            positions = torch.arange(start, window_end)[None]
            logits, _ = model(x[:, start:window_end], positions, _window_cache(past, start, end, dual_cache))
            logits = shift_logits(logits)[0, :block_length]
            mask_index = x[0, start:end] == mask_token_id
            idx = mask_index.nonzero()[:, 0]
            if threshold is not None:
                confidence, x0 = _sample_tokens(logits[idx], top_k, neg_entropy=False)
                order = _top(confidence, len(idx))
                keep = [order[0]] + [j for j in order[1:] if confidence[j] >= threshold]
            else:
                t, s = timesteps[i], timesteps[i + 1]
                confidence, x0 = _sample_tokens(logits[idx], top_k, neg_entropy=True)
                num_mask = mask_index.sum() / 1
                n = int(num_mask * (1 - s / t)) if i < steps_per_block - 1 else int(num_mask)
                keep = list(_top(confidence, n))
                i += 1
            for j in keep:
                x[0, start + idx[j]] = x0[j]
            if not (x[0, start:end] == mask_token_id).any():
                break
    return x[0, len(prompt):].tolist()
