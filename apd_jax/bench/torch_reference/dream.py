"""The PyTorch Dream model of the parity tests: a compact re-statement (not a copy) of DreamLM/Dream
`modeling_dream.py`, Qwen2 layers with full (non-causal) attention, and its cache and logit-shift
helpers. Batch 1, CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apd_jax.bench.torch_reference.checkpoints import load_safetensors_dir

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DreamConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, cfg: dict) -> DreamConfig:
        # Dream/legacy configs have top-level rope_theta; transformers 5 writes rope_parameters.
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, cast back before the weight multiply (as Dream/Qwen2 do).
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class _Attention(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kvh * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kvh * hd, bias=True)
        self.o_proj = nn.Linear(h * hd, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, s, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past is not None:  # DynamicCache.update: append the window after the cached positions
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        n_rep = c.num_attention_heads // c.num_key_value_heads
        kr, vr = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        # Eager attention, softmax in float32 (Dream's eager path; its SDPA path is the same math).
        scores = torch.matmul(q, kr.transpose(2, 3)) / math.sqrt(c.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, vr).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out), (k, v)


class _MLP(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, past, mask)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, kv


class _Backbone(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TorchDream(nn.Module):
    """Dream = Qwen2 layers with full (bidirectional) attention and an untied lm_head.

    Parameter names equal the checkpoint keys, so loading is a strict load_state_dict.
    """

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TorchDream:
        path = Path(path)
        cfg = DreamConfig.from_json(json.loads((path / "config.json").read_text()))
        state = load_safetensors_dir(path)
        if "lm_head.weight" not in state and cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        return model.to(dtype).eval()

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        past: KVCache | None = None, causal: bool = False,
    ) -> tuple[torch.Tensor, KVCache]:
        """Unshifted logits [B,S,V] and the new cache (past plus this window's K/V).

        The window attends to every cached key and to the whole window, unmasked, as the reference
        does with DynamicCache and attention_mask="full". `causal=True` only exists to test the layer
        math against transformers' Qwen2.
        """
        b, s = input_ids.shape
        past_len = past[0][0].shape[2] if past else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s).unsqueeze(0).expand(b, s)
        h = self.model.embed_tokens(input_ids)
        # RoPE angles in float32, cos/sin cast to the activation dtype (as Dream does).
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        mask = None
        if causal:
            q_pos = torch.arange(past_len, past_len + s)[:, None]
            mask = torch.arange(past_len + s)[None, :] <= q_pos
        new_past: KVCache = []
        for i, layer in enumerate(self.model.layers):
            h, kv = layer(h, cos, sin, past[i] if past else None, mask)
            new_past.append(kv)
        return self.lm_head(self.model.norm(h)), new_past


def crop(past: KVCache, n: int) -> KVCache:
    """Keep the first n cached positions (DynamicCache.crop to absolute length n)."""
    return [(k[:, :, :n], v[:, :, :n]) for k, v in past]


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dream predicts position i at output i-1; position 0 reuses output 0."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
