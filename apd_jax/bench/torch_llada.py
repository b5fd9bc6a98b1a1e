"""The published LLaDA modeling code (apd_jax.bench.llada_published) as the PyTorch reference of
apd_jax's LLaDA: tiny random checkpoints written by its own save_pretrained, and a checkpoint
directory loaded into it. Imported only by tests and `apd-jax bench --torch`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from apd_jax.bench.llada_published.configuration_llada import LLaDAConfig
from apd_jax.bench.llada_published.modeling_llada import LLaDAModelLM

# Large enough that nothing is ~0; smaller than the Qwen2/Dream fixtures' 0.3: with LLaDA's
# rope_theta 500000 most rotary frequencies barely turn over a few hundred positions, and larger
# weights make attention so peaky that float32 rounding alone moves either implementation's
# logits by ~1e-4.
_WEIGHT_STD = 0.15
_NORM_SPREAD = 0.2  # RMSNorm weights drawn uniformly from 1 +- 0.2


def tiny_llada_config(
    *, vocab_size: int = 300, embedding_size: int | None = 384, d_model: int = 64, n_layers: int = 2,
    n_heads: int = 4, n_kv_heads: int = 2, mlp_hidden_size: int = 128, rope_theta: float = 500000.0,
    max_sequence_length: int = 512, mask_token_id: int = 290, eos_token_id: int = 2, weight_tying: bool = False,
) -> LLaDAConfig:
    """A LLaDAConfig of LLaDA-8B's kind (llama block, RMSNorm, SiLU, RoPE, no biases) at tiny shapes,
    its embedding padded past the vocabulary as LLaDA-8B's may be."""
    return LLaDAConfig(
        d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, n_layers=n_layers, mlp_hidden_size=mlp_hidden_size,
        vocab_size=vocab_size, embedding_size=embedding_size, max_sequence_length=max_sequence_length,
        rope_theta=rope_theta, rms_norm_eps=1e-5, weight_tying=weight_tying, block_type="llama",
        layer_norm_type="rms", activation_type="silu", rope=True, rope_full_precision=True, alibi=False,
        include_bias=False, include_qkv_bias=False, attention_dropout=0.0, residual_dropout=0.0,
        embedding_dropout=0.0, init_fn="normal", mask_token_id=mask_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def save_tiny_llada(
    path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, sharded: bool = False, **config: Any
) -> Path:
    """A random tiny LLaDA checkpoint written by the published code's save_pretrained (sharded into
    several files with an index when `sharded`); `config`: tiny_llada_config's fields."""
    path = Path(path)
    model = LLaDAModelLM(tiny_llada_config(**config), init_params=False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # every parameter drawn, in the module's order
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.copy_(1 + _NORM_SPREAD * (2 * torch.rand(param.shape, generator=generator) - 1))
            else:
                param.copy_(_WEIGHT_STD * torch.randn(param.shape, generator=generator))
    model = model.to(dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path, max_shard_size=size // 3 if sharded else size * 2)
    return path


def load_torch_llada(path: str | Path, dtype: torch.dtype | None = None) -> LLaDAModelLM:
    """The published LLaDAModelLM with a checkpoint directory's weights (config.json and safetensors,
    single or sharded), in eval mode: built from the config and loaded strictly (transformers 5's
    from_pretrained does not run the published class; llada_published/modeling_llada.py says why)."""
    path = Path(path)
    config = LLaDAConfig.from_pretrained(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {k: v for f in files for k, v in load_file(str(path / f)).items()}
    model = LLaDAModelLM(config, init_params=False).eval()
    model.load_state_dict(state, strict=True)
    return model if dtype is None else model.to(dtype)
