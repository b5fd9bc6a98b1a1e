"""A fixed-shape KV cache with one valid length per row (entries past it are invisible, so a crop
changes only `lengths` and no shape ever changes), and the attention masks over it.

K and V are one array per layer, not one stacked [layers, ...] array: a layer's attention then reads
its own buffer, where a slice of a stacked cache is a copy XLA makes before the scores' matmul, two
per layer and pass (BENCHMARKS.md, the batch-1 profile by kind)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from apd_jax.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]: attention reads it without a transpose
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [batch] int32: positions [0, length) hold valid K/V

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = dtype or cfg.dtype
        layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
        return cls(layers(), layers(), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def write(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> "KVCache":
        """Layer `layer`'s K and V of a window [B, S, H, D] written at per-row `positions` [B, S] (write_window)."""
        def put(bufs: tuple[jax.Array, ...], new: jax.Array) -> tuple[jax.Array, ...]:
            return (*bufs[:layer], write_window(bufs[layer], new, positions), *bufs[layer + 1:])

        return KVCache(put(self.k, k), put(self.v, v), self.lengths)

    def crop(self, lengths: jax.Array) -> "KVCache":
        """Keep only the first `lengths[b]` positions of each row (never grows a row)."""
        return dataclasses.replace(self, lengths=jnp.minimum(self.lengths, lengths.astype(jnp.int32)))

    def put_rows(self, rows: jax.Array, part: "KVCache") -> "KVCache":
        """Reset rows `rows` [G] to `part`, a G-row cache: its K/V at positions [0, part.max_len) and its
        lengths (a slot taking a new sequence; later positions stay, invisible past the length). A row
        index >= batch is dropped: the padding of a fixed-size group of rows."""
        n = part.max_len
        put = lambda buf, new: buf.at[rows, :, :n].set(new.astype(buf.dtype), mode="drop")  # noqa: E731
        return KVCache(tuple(map(put, self.k, part.k)), tuple(map(put, self.v, part.v)),
                       self.lengths.at[rows].set(part.lengths, mode="drop"))


def write_window(buf: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter `new` [B, S, H, D] into one layer's `buf` [B, H, T, D] at per-row `positions` [B, S].
    Positions past the buffer (only ever padding) are dropped, not clamped onto another."""
    rows = jnp.arange(new.shape[0])[:, None]  # advanced indices around a slice: a [B, S, H, D] view
    return buf.at[rows, :, positions].set(new.astype(buf.dtype), mode="drop")


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, kv_end: jax.Array, causal: bool) -> jax.Array:
    """bool [B, S, T]: keys (positions k_pos [B, T]) before the row's end `kv_end` [B] (Dream: the
    window's right edge) and, if causal, at or before the query (q_pos [B, S])."""
    shape = (q_pos.shape[0], q_pos.shape[1], k_pos.shape[1])
    visible = jnp.broadcast_to(k_pos[:, None, :] < kv_end[:, None, None], shape)
    if causal:
        visible &= k_pos[:, None, :] <= q_pos[:, :, None]
    return visible
