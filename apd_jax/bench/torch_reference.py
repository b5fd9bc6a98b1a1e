"""PyTorch reference for the apd_jax parity tests.

Compact re-statements (not copies) of the published code's semantics:
- danielmisrael/apd `dream/generation_utils.py::apd_sample` (APD and "leftright"),
- DreamLM/Dream `generation_utils.py::_sample` (maskgit_plus / topk_margin / entropy),
- `dream/modeling_dream.py` (Qwen2 layers with full, non-causal attention),
plus tiny random Hugging Face-layout checkpoints used as fixtures by every parity test.

Everything here is batch 1, greedy (temperature 0), CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from transformers import DynamicCache, Qwen2ForCausalLM

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

# The models here are tiny: intra-op threads only add synchronisation, and thrash on a shared CPU.
torch.set_num_threads(1)

_WEIGHT_STD = 0.3  # large enough that logits are far from ties and nothing is ~0
_BIAS_STD = 0.3
_NORM_SPREAD = 0.2  # RMSNorm weights drawn uniformly from 1 +- 0.2


# --------------------------------------------------------------------------
# Tiny checkpoint writers
# --------------------------------------------------------------------------


def _param_shapes(
    *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
    num_heads: int, num_kv_heads: int, tie_word_embeddings: bool,
) -> dict[str, tuple[int, ...]]:
    """Qwen2/Dream parameter names and shapes, in a fixed order (the RNG draws in this order)."""
    hd = hidden_size // num_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (num_heads * hd, hidden_size),
            p + "self_attn.q_proj.bias": (num_heads * hd,),
            p + "self_attn.k_proj.weight": (num_kv_heads * hd, hidden_size),
            p + "self_attn.k_proj.bias": (num_kv_heads * hd,),
            p + "self_attn.v_proj.weight": (num_kv_heads * hd, hidden_size),
            p + "self_attn.v_proj.bias": (num_kv_heads * hd,),
            p + "self_attn.o_proj.weight": (hidden_size, num_heads * hd),
            p + "mlp.gate_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": (intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": (hidden_size, intermediate_size),
            p + "input_layernorm.weight": (hidden_size,),
            p + "post_attention_layernorm.weight": (hidden_size,),
        }
    shapes["model.norm.weight"] = (hidden_size,)
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, hidden_size)
    return shapes


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = 1.0 + _NORM_SPREAD * (2.0 * torch.rand(shape, generator=gen) - 1.0)
        elif name.endswith(".bias"):
            t = _BIAS_STD * torch.randn(shape, generator=gen)
        else:
            t = _WEIGHT_STD * torch.randn(shape, generator=gen)
        state[name] = t.to(dtype).contiguous()
    return state


def _write_weights(path: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """model.safetensors, or exactly two shards plus model.safetensors.index.json."""
    if not sharded:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(state)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map: dict[str, str] = {}
    for fname, keys in files.items():
        save_file({k: state[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in keys}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_tiny_qwen2(
    path: str | Path, *, seed: int = 0, vocab_size: int = 320, hidden_size: int = 64,
    intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    tie_word_embeddings: bool = True, rope_theta: float = 10000.0, max_position_embeddings: int = 512,
    eos_token_id: int = 2, dtype: torch.dtype = torch.float32, sharded: bool = False,
) -> Path:
    """Random tiny Qwen2ForCausalLM in the Hugging Face layout (the verifier fixture)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, attn_implementation="eager",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).eval()
    shapes = _param_shapes(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
    )
    state = _random_state(shapes, seed, dtype)
    # HF initialises biases to 0 and norms to 1: overwrite every parameter, strictly.
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model = model.to(dtype)
    if sharded:
        config.dtype = dtype
        config.save_pretrained(path)
        _write_weights(path, state, sharded=True)
    else:
        model.save_pretrained(path)
    if not (path / "generation_config.json").exists():
        GenerationConfig(bos_token_id=eos_token_id, eos_token_id=eos_token_id).save_pretrained(path)
    # transformers 5 writes rope_parameters/dtype; real Qwen2.5 checkpoints carry the legacy
    # top-level rope_theta/torch_dtype. Keep both so loaders written for either layout work.
    cfg = json.loads((path / "config.json").read_text())
    cfg.setdefault("rope_theta", rope_theta)
    cfg.setdefault("torch_dtype", _dtype_name(dtype))
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def save_tiny_dream(
    path: str | Path, *, seed: int = 0, vocab_size: int = 336, hidden_size: int = 64,
    intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
    rope_theta: float = 10000.0, max_position_embeddings: int = 512, mask_token_id: int = 330,
    eos_token_id: int = 2, pad_token_id: int = 2, bos_token_id: int | None = None,
    dtype: torch.dtype = torch.float32, sharded: bool = False,
) -> Path:
    """Random tiny Dream checkpoint (config.json with Dream's fields, Qwen2 key names, untied lm_head)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bos = eos_token_id if bos_token_id is None else bos_token_id
    config = {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "mask_token_id": mask_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": bos,
        "eos_token_id": eos_token_id,
        "torch_dtype": _dtype_name(dtype),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    gen_config = {"mask_token_id": mask_token_id, "eos_token_id": eos_token_id,
                  "pad_token_id": pad_token_id, "bos_token_id": bos}
    (path / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    shapes = _param_shapes(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, tie_word_embeddings=False,
    )
    _write_weights(path, _random_state(shapes, seed, dtype), sharded)
    return path


def load_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded (via the index's weight_map)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        state |= load_file(str(path / fname))
    if set(state) != set(weight_map):
        raise ValueError(f"shards of {path} do not match the index weight_map")
    return state


# --------------------------------------------------------------------------
# Dream model (Qwen2 layers, full attention)
# --------------------------------------------------------------------------


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
