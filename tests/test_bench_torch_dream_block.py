"""Fast-dLLM's Dream block decoding as `apd-jax bench --torch --baselines dream-block` runs it: the
published `_sample` (apd_jax.bench.dream_published.generation_utils_block) with the dual cache on the
published Dream modeling code (dream_published.modeling_dream: K/V cached before RoPE, the block's
replaced in place), held to apd_jax's dream_block_generate token for token at temperature 0 on a tiny
random float32 checkpoint, pass for pass; and its bench rows matched to `apd-jax bench`'s."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from apd_jax.decoding.blocks.dream import DreamBlockConfig, dream_block_generate

torch = pytest.importorskip("torch")
bench_torch = pytest.importorskip("apd_jax.bench.pytorch")

N, BLOCK = 32, 8  # four blocks; steps = N, as bench runs it


@pytest.fixture(scope="module")
def published(dream, dream_dir):
    """Fast-dLLM's DreamModel with the weights of the conftest's tiny Dream checkpoint, float32."""
    from apd_jax.bench.dream_published.modeling_dream import DreamModel
    from apd_jax.bench.torch_reference.checkpoints import load_safetensors_dir

    model = DreamModel(bench_torch.published_dream_config(dream.cfg))
    model.load_state_dict(load_safetensors_dir(dream_dir), strict=True)
    return model.eval()


def published_answer(model, prompt: list[int], threshold: float | None, cache: str) -> tuple[list[int], int, int]:
    """The published loop's answer to one prompt alone, its refresh passes and its window passes."""
    clock = bench_torch.PassClock(model, len(prompt) + N)
    out = bench_torch.fastdllm_dream_sample(clock, torch.tensor([prompt]), N, BLOCK, threshold, 330, cache)
    refresh, window = clock.kinds()
    return out[0, len(prompt):].tolist(), len(refresh), len(window)


# 0.9 is bench's threshold (tiny random weights never reach it: one token a pass); 0.3 commits several.
# bench times the dual cache; the prefix cache is the published loop's other mode.
@pytest.mark.parametrize(("cache", "threshold"), [("dual", None), ("dual", 0.9), ("dual", 0.3), ("prefix", None),
                                                  ("prefix", 0.3)])
def test_ragged_rows_equal_the_published_loop_alone(dream, published, cache, threshold):
    prompts = [np.random.default_rng(3).integers(0, 300, n).tolist() for n in (7, 13, 20)]
    settings = DreamBlockConfig(max_new_tokens=N, steps=N, block_length=BLOCK, threshold=threshold, cache=cache,
                                eos_token_ids=())
    assert settings.top_k == bench_torch.FASTDLLM_DREAM_TOP_K
    got = dream_block_generate(dream, prompts, settings)
    for b, prompt in enumerate(prompts):
        tokens, refresh, window = published_answer(published, prompt, threshold, cache)
        assert got.tokens[b].tolist() == tokens
        # A refresh per block. row_passes counts the passes that committed a token: the schedule's
        # int(masks * (1 - s / t)) is 0 at some passes of every block, which the published loop runs too.
        assert refresh == N // BLOCK and got.row_passes()[b] <= refresh + window
        if threshold is not None:  # the threshold rule commits at least one token every pass
            assert got.row_passes()[b] == refresh + window
    if threshold == 0.3:
        assert got.row_passes().max() < N  # the threshold committed several tokens in some pass


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
