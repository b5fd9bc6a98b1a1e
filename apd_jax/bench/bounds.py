"""Roofline bounds of one decoding pass: the least time the hardware needs for the work the pass must do.

A pass's work is counted per model as `Work` summed over its rows: the positions run through the
decoder layers and through the output head (2 FLOPs per parameter per position), every weight
read once, the float32 logits [positions, V] written by the head and read by the rule, the K/V
caches' traffic (positions read from a cache and positions written into one, every layer), and the
sampling filter's (top-p / top-k: the logits read and the filtered copy written and read again,
the least any filter moves; apd_jax's bisection reads them about 30 times). The bound is
max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), with the rates measured in the same run.

Left out: attention's score FLOPs (QK^T and PV: about 1 % of a 7B's FLOPs at these lengths) and the
activations' traffic between layers, which a fused program need not move.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.apd_rule import APDConfig
from apd_jax.models.config import ModelConfig

LEFT_OUT = "attention's score FLOPs, activations between layers"


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the decoder layers, parameters of the output head): each costs 2 FLOPs per token."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp), h * cfg.vocab_size


def kv_bytes(cfg: ModelConfig) -> int:
    """Bytes of one position's K and V over every layer, in the compute dtype (the cache's)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Work:
    """What one model does in a pass, summed over its rows (position counts)."""

    tokens: float  # positions through the decoder layers
    heads: float  # positions through the output head, each giving V float32 logits
    kv_read: float = 0.0  # cached positions whose K/V are read
    kv_written: float = 0.0  # positions whose K/V are written into a cache
    filtered: bool = False  # the rule filters the logits (top-p < 1 or top-k > 0)

    def __add__(self, other: Work) -> Work:
        """Both passes' work in one pass (the weights are read once: pass_ms counts them apart)."""
        return Work(self.tokens + other.tokens, self.heads + other.heads, self.kv_read + other.kv_read,
                    self.kv_written + other.kv_written, self.filtered or other.filtered)

    def flops(self, cfg: ModelConfig) -> float:
        layers, head = matmul_params(cfg)
        return 2 * (layers * self.tokens + head * self.heads)

    def moved(self, cfg: ModelConfig) -> float:
        """Bytes besides the weights: logits written and read (twice more when filtered), K/V."""
        logits = 4 * self.heads * cfg.vocab_size * (4 if self.filtered else 2)
        return logits + kv_bytes(cfg) * (self.kv_read + self.kv_written)


def pass_ms(parts: list[tuple[ModelConfig, Work]], weight_bytes: float, ceilings: dict[str, float]) -> float:
    """The roofline bound of one pass in ms: each model's Work, every weight (weight_bytes) read once."""
    flops = sum(w.flops(cfg) for cfg, w in parts)
    nbytes = weight_bytes + sum(w.moved(cfg) for cfg, w in parts)
    return 1e3 * max(nbytes / ceilings["bandwidth"], flops / ceilings["matmul_flops"])


def weight_floor_ms(weight_bytes: float, ceilings: dict[str, float]) -> float:
    """Reading every weight once: the floor of any pass."""
    return 1e3 * weight_bytes / ceilings["bandwidth"]


def apd_work(accepted: np.ndarray, cfg: APDConfig, prompt_len: int, verifier: bool, filtered: bool
             ) -> list[tuple[tuple[Work, Work | None], tuple[Work, Work | None]]]:
    """Per pass of an APD call (left-to-right K without the verifier), its (drafter, verifier) Work
    twice: over what the rule asks (each running row's window [left, right) and its draft of right -
    t positions, right = min(t + lookahead, end)), and over the compiled width the pass runs (every
    row of the batch, the draft padded to the narrowest of APDConfig.lookahead_levels() holding the
    widest row's, the window widened by as much; the drafter window's own rounding to compiled sizes
    is not counted). Replayed from `accepted` [B, passes] (tokens each row accepted in each of its
    passes, every row starting in pass 0) with the loop's window rule (decoding.apd_steps.step)."""
    b = accepted.shape[0]
    passes = (accepted > 0).sum(axis=1)
    levels = np.asarray(cfg.lookahead_levels())
    end = prompt_len + cfg.max_new_tokens
    t = np.full(b, prompt_len)
    t_prev = np.zeros(b, int)
    lookahead = np.full(b, cfg.M)
    out = []
    for i in range(int(passes.max(initial=0))):
        run = i < passes
        left = np.zeros(b, int) if i == 0 else np.maximum(t_prev - cfg.W + 1, 0)
        draft = np.minimum(t + lookahead, end) - t
        width = int(levels[np.searchsorted(levels, draft[run].max())])
        window = int((t - left)[run].max()) + width

        def works(tokens, heads, written):
            d = Work(tokens, heads, kv_read=left[run].sum(), kv_written=written, filtered=filtered)
            v = Work(heads, heads, kv_read=t[run].sum(), kv_written=heads, filtered=filtered) if verifier else None
            return d, v

        asked = works((t - left + draft)[run].sum(), draft[run].sum(), (t - left + draft)[run].sum())
        out.append((asked, works(b * window, b * width, b * window)))
        k = accepted[:, i]
        t_prev = np.where(run, t, t_prev)
        t = np.where(run, t + k, t)
        lookahead = np.where(run, np.asarray(cfg.next_lookahead(jnp.asarray(k, jnp.int32))), lookahead)
    return out
