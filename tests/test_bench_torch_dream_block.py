"""Fast-dLLM's Dream block decoding as `apd-jax bench --torch --baselines dream-block` runs it: the
published `_sample` (apd_jax.bench.pytorch.fastdllm_dream_sample) with the dual cache, its rows keyed
and matched to the rows `apd-jax bench` writes for apd_jax's dream_block_generate. The token-for-token
parity of the two loops is tests/test_block_cache.py's."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from apd_jax.decoding.blocks.dream import DreamBlockConfig

torch = pytest.importorskip("torch")
bench_torch = pytest.importorskip("apd_jax.bench.pytorch")


def test_jax_keys_tell_dreams_threshold_from_threshold_decoding():
    key = bench_torch._jax_key
    assert key({"name": "Dream block steps=16 block=16 threshold=0.9 cache=dual", "batch": 1}) == (
        "dream-block threshold dual", None, None, None)
    assert key({"name": "Dream block steps=16 block=16 schedule cache=dual", "batch": 1}) == (
        "dream-block schedule dual", None, None, None)
    assert key({"name": "llada threshold=0.9 block=16 cache=dual", "batch": 1}) == ("threshold dual", None, None, None)
    assert key({"name": "Dream block steps=16 block=16 schedule cache=dual", "batch": 2}) is None


def test_bench_torch_dream_block_rows_match_the_jax_rows(tmp_path):
    """`bench --torch --shapes tiny --baselines dream-block --against J` beside the rows `apd-jax bench
    --shapes tiny --baselines dream-block` writes for Fast-dLLM's Dream block decoding (bench_canvas)."""
    from apd_jax.bench import decoders as bench
    from apd_jax.cli import main
    from apd_jax.models.config import tiny_config

    n, prompt_len = 16, 8
    model = bench.random_model(tiny_config(causal=False), 1)
    ceilings = {"bandwidth": 1e12, "matmul_flops": 1e12}
    jax_rows = [bench.bench_canvas(model, DreamBlockConfig(max_new_tokens=n, block_length=n, threshold=threshold,
                                                           eos_token_ids=()), 1, prompt_len, ceilings, 1)
                for threshold in (None, bench.THRESHOLD)]
    (tmp_path / "jax.json").write_text(bench.to_json(jax_rows, ceilings))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--torch", "--shapes", "tiny", "--settings", "0.7,4,8", "--prompt-len", str(prompt_len),
                     "--max-new-tokens", str(n), "--repeats", "1", "--baselines", "dream-block",
                     "--json", str(tmp_path / "torch.json"), "--against", str(tmp_path / "jax.json")]) == 0
    rows = json.loads((tmp_path / "torch.json").read_text())["rows"]
    assert [r["decoder"] for r in rows] == ["apd", "apd", "dream-block schedule dual", "dream-block threshold dual"]
    for mine, theirs in zip(rows[2:], jax_rows):
        # One block: its refresh, then window passes; the schedule's count and one token a pass (random
        # weights never reach 0.9) are the jax rows' too.
        assert (mine["refresh_passes"], mine["window_passes"]) == (1, mine["passes"] - 1)
        assert mine["passes"] == theirs.passes and mine["refresh_ms"] > 0 and mine["window_ms"] > 0
        assert mine["kinds_cover"] > 0  # the clock's call over the median call: near 1, either side
        line = next(line for line in out.getvalue().splitlines() if line.startswith(mine["name"] + ":"))
        assert f"against apd_jax's {theirs.ms_per_pass:.2f} ms" in line
        assert f"refresh {mine['refresh_ms']:.2f} ms against {theirs.refresh_ms:.2f} ms" in line
