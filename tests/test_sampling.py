"""Sampling filters on literal logits; temperature 0 is argmax."""

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.decoding.sampling import filter_logits, sample

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def kept(x):
    return np.isfinite(np.asarray(x))[0].tolist()


def test_top_p_keeps_the_prefix_through_the_first_token_past_p():
    assert kept(filter_logits(LOGITS, jnp.float32(0.7), jnp.int32(0))) == [True, True, False, False]
    assert kept(filter_logits(LOGITS, jnp.float32(0.79), jnp.int32(0))) == [True, True, False, False]
    assert kept(filter_logits(LOGITS, jnp.float32(0.81), jnp.int32(0))) == [True, True, True, False]
    assert kept(filter_logits(LOGITS, jnp.float32(0.1), jnp.int32(0))) == [True, False, False, False]


def test_top_k_then_disabled_filters():
    assert kept(filter_logits(LOGITS, jnp.float32(1.0), jnp.int32(3))) == [True, True, True, False]
    assert kept(filter_logits(LOGITS, jnp.float32(1.0), jnp.int32(0))) == [True] * 4
    assert kept(filter_logits(LOGITS, jnp.float32(0.81), jnp.int32(2))) == [True, True, False, False]


def _reference_filter(x: np.ndarray, top_p: float, top_k: int) -> np.ndarray:
    """The rule literally, one row at a time: sort, cumulative softmax, nucleus, then top-k."""
    out = np.full_like(x, -np.inf)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        cum = np.cumsum(probs / probs.sum())
        n = len(row) if top_p >= 1 else 1 + int(np.sum(cum[:-1] <= top_p))
        n = min(n, top_k) if top_k > 0 else n
        threshold = row[order][n - 1]
        out[r] = np.where(row < threshold, -np.inf, row)
    return out


def test_filters_match_the_sorted_rule():
    widths = []
    filtered = jax.jit(filter_logits)  # one program for every knob value: they are traced
    for scale in (8.0, 0.5):  # peaked rows (cuts after a few tokens), flat ones (after hundreds)
        x = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * scale
        x[0, :3] = x[0, 3]  # ties at the top
        x[1, 10:] = -np.inf  # excluded tokens (the mask)
        x[2] -= 40.0  # all negative
        for top_p in (0.5, 0.9, 0.95, 1.0):
            for top_k in (0, 1, 5, 100, 400):
                if top_p >= 1 and top_k == 0:
                    continue
                got = np.asarray(filtered(jnp.asarray(x), jnp.float32(top_p), jnp.int32(top_k)))
                want = _reference_filter(x, top_p, top_k)
                np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"{scale} {top_p} {top_k}")
                np.testing.assert_array_equal(got[np.isfinite(got)], x[np.isfinite(want)])
                widths += np.isfinite(want).sum(1).tolist()
    assert min(widths) < 10 and max(widths) > 200  # narrow and wide cuts both tried


def test_temperature_zero_is_argmax_and_sampling_follows_the_distribution():
    key = jax.random.key(0)
    assert int(sample(LOGITS, key, jnp.float32(0), jnp.float32(0.5), jnp.int32(0))[0]) == 0
    logits = jnp.broadcast_to(LOGITS, (20000, 4))
    ids = np.asarray(sample(logits, key, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0)))
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / len(ids), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    ids = np.asarray(sample(logits, key, jnp.float32(1.0), jnp.float32(0.7), jnp.int32(0)))
    assert set(np.unique(ids)) == {0, 1}


def test_an_excluded_id_is_never_sampled():
    key = jax.random.key(1)
    assert int(sample(LOGITS, key, jnp.float32(0), jnp.float32(1.0), jnp.int32(0), exclude=0)[0]) == 1
    logits = jnp.broadcast_to(LOGITS, (20000, 4))
    ids = np.asarray(sample(logits, key, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0), exclude=1))
    # The rest renormalised: 0.5, 0.15, 0.05 of 0.7.
    expected = [0.5 / 0.7, 0, 0.15 / 0.7, 0.05 / 0.7]
    np.testing.assert_allclose(np.bincount(ids, minlength=4) / len(ids), expected, atol=0.015)
    # An id past the vocabulary excludes nothing.
    assert int(sample(LOGITS, key, jnp.float32(0), jnp.float32(1.0), jnp.int32(0), exclude=9)[0]) == 0


def test_a_row_samples_the_same_whichever_rows_share_its_batch():
    """sample_rows picks, for the whole batch, the least filter work any sampling row needs (none, the
    nucleus, the nucleus and top-k); each row's sample is still its own, as it is alone."""
    from apd_jax.decoding.sampling import sample_rows

    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 6, 50)).astype(np.float32) * 2)
    keys = jax.random.split(jax.random.key(4), 4)
    knobs = [jnp.asarray(v) for v in ([0.7, 0.7, 0.0, 1.0], [0.9, 1.0, 0.5, 1.0], [0, 5, 3, 0])]
    knobs[2] = knobs[2].astype(jnp.int32)
    together = np.asarray(sample_rows(logits, keys, *knobs))
    alone = [np.asarray(sample_rows(logits[b:b + 1], keys[b:b + 1], *(k[b:b + 1] for k in knobs)))[0]
             for b in range(4)]
    np.testing.assert_array_equal(together, np.stack(alone))
    np.testing.assert_array_equal(together[2], np.argmax(np.asarray(logits[2]), -1))  # temperature 0: argmax
    # The filters bite: row 1 (top-k 5) samples only among its row's 5 largest logits.
    top5 = np.argsort(-np.asarray(logits[1]), -1)[:, :5]
    assert all(t in top for t, top in zip(together[1], top5))
