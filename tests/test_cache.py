"""Masks and cache writes on literal arrays."""

import jax.numpy as jnp
import numpy as np

from apd_jax.models.cache import KVCache, attention_mask, write_window
from apd_jax.models.config import ModelConfig


def test_causal_mask_respects_position_and_end():
    q = jnp.array([[2, 3]])
    k = jnp.array([[0, 1, 2, 3, 4]])
    got = attention_mask(q, k, jnp.array([4]), causal=True)
    np.testing.assert_array_equal(got[0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


def test_bidirectional_mask_sees_everything_before_the_end_only():
    q = jnp.array([[1, 2], [0, 1]])
    k = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    got = attention_mask(q, k, jnp.array([3, 4]), causal=False)
    np.testing.assert_array_equal(got[0], [[1, 1, 1, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(got[1], [[1, 1, 1, 1], [1, 1, 1, 1]])


def test_write_window_drops_out_of_range_positions_instead_of_clamping():
    buf = jnp.zeros((2, 2, 4, 1))  # one layer's [batch, kv_heads, positions, head_dim]
    new = jnp.arange(1, 13, dtype=jnp.float32).reshape(2, 3, 2, 1)  # [batch, window, kv_heads, head_dim]
    got = write_window(buf, new, jnp.array([[2, 3, 4], [0, 1, 2]]))
    np.testing.assert_array_equal(got[0, :, :, 0], [[0, 0, 1, 3], [0, 0, 2, 4]])  # position 4 dropped
    np.testing.assert_array_equal(got[1, :, :, 0], [[7, 9, 11, 0], [8, 10, 12, 0]])


def test_crop_only_shrinks_lengths():
    cfg = ModelConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=4)
    cache = KVCache.zeros(cfg, 2, 6)
    cache = KVCache(cache.k, cache.v, jnp.array([5, 2]))
    np.testing.assert_array_equal(cache.crop(jnp.array([3, 4])).lengths, [3, 2])
