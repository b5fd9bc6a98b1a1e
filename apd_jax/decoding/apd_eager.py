"""APD as a Python loop over one row with exact-size windows, written step by step as the published
loop (danielmisrael/apd, dream/generation_utils.py): the independent oracle of the compiled loop in
`apd.py` for adaptive lookahead and sampling, and the plainest statement of the algorithm to read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apd_jax.decoding.apd_rule import (
    APDConfig,
    APDKnobs,
    accepted_length,
    draft_tokens,
    right_edge,
    shared_vocab_size,
    verifier_predictions,
)
from apd_jax.decoding.generation import check_config, prepare
from apd_jax.models.cache import KVCache
from apd_jax.models.model import Transformer


@nnx.jit
def _window_forward(model: Transformer, tokens: jax.Array, start: jax.Array, cache: KVCache):
    return model(tokens, start=start, cache=cache)


def apd_generate_eager(
    drafter: Transformer,
    verifier: Transformer,
    prompt: Sequence[int],
    config: APDConfig = APDConfig(),
    key: jax.Array | None = None,
    on_pass: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], list[int]]:
    """The same algorithm as a Python loop over one row with exact-size windows, step by step as the
    published loop. Returns (generated ids through the first eos, tokens accepted per pass);
    `on_pass` receives each pass's accepted tokens."""
    config = check_config(config, APDConfig)
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg)
    batch = prepare(config, [prompt], key, drafter.cfg, verifier.cfg, vocab=vocab)
    prompt, eos, key = batch.ids[0, : batch.lengths[0]].tolist(), batch.eos_ids, batch.keys[0]  # row 0's key
    mask_id = drafter.cfg.mask_token_id
    knobs = APDKnobs.of(config)
    length = len(prompt) + config.max_new_tokens
    x = prompt + [mask_id] * config.max_new_tokens
    dcache = KVCache.zeros(drafter.cfg, 1, length)
    vcache = KVCache.zeros(verifier.cfg, 1, length)
    t, counts, first, lookahead = len(prompt), [], True, config.M
    while t < length:
        right = int(right_edge(t, lookahead, length))
        left = 0 if first else max(t - config.W - counts[-1] + 1, 0)
        dcache = dcache.crop(jnp.array([left]))
        hidden, dcache = _window_forward(drafter, jnp.array([x[left:right]]), jnp.array([left]), dcache)
        logits_d = drafter.logits(drafter.aligned(hidden)[:, t - left :], vocab=vocab)
        key, noise_key = jax.random.split(key)
        draft = draft_tokens(logits_d, noise_key, knobs, mask_id)
        v_start = 0 if first else t
        v_in = jnp.array([x[:t]]) if first else jnp.zeros((1, 0), jnp.int32)
        hidden, vcache = _window_forward(verifier, jnp.concatenate([v_in, draft], 1), jnp.array([v_start]), vcache)
        logits_v = verifier_predictions(verifier, hidden[:, t - v_start :], vocab)
        n = jnp.array([right - t])
        k = int(accepted_length(draft, logits_d, logits_v, n, noise_key, knobs, config.rule, mask_id)[0])
        draft = np.asarray(draft)[0].tolist()
        x[t : t + k] = draft[:k]
        vcache = vcache.crop(jnp.array([t + k]))
        counts.append(k)
        first, lookahead = False, int(config.next_lookahead(jnp.int32(k)))
        hits = [i for i in range(t, t + k) if x[i] in eos]
        if on_pass is not None:
            on_pass(x[t : hits[0] + 1] if hits else x[t : t + k])
        t += k
        if hits:
            return x[len(prompt) : hits[0] + 1], counts
    return x[len(prompt) :], counts
