"""`apd-jax bench`'s accounting on tiny shapes: the cached block decoder's refresh and window passes apart
(in JAX and in Fast-dLLM's published samplers), the bounds' logits, cache and filter traffic, and the
two bounds of APD's passes (the positions asked, the compiled widths). No timing thresholds: only
fields, counts and the relations between them."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from apd_jax.bench import bounds, passes
from apd_jax.cli import main
from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.blocks.dream import DreamBlockConfig
from apd_jax.decoding.blocks.llada import LLaDAConfig
from apd_jax.decoding.diffusion import ThresholdConfig
from apd_jax.decoding.generation import GenerationResult
from apd_jax.models.config import tiny_config

KINDS = ("refresh_passes", "window_passes", "mixed_passes", "refresh_ms", "window_ms", "refresh_bound_ms",
         "window_bound_ms", "kinds_ms_per_pass", "kinds_ms_per_token", "kinds_cover")
MIXED = ("mixed_ms", "mixed_bound_ms", "mixed_ratio_to_bound")  # rows at different steps: none at batch 1


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """One JAX run (APD, LLaDA's rows: 64 tokens in two blocks of 32) and the PyTorch run against it;
    their JSON and printed output. (The adaptive program's replay is tested below without compiling it.)"""
    tmp = tmp_path_factory.mktemp("bench")
    common = ["--shapes", "tiny", "--batch", "1", "--settings", "0.7,4,8", "--prompt-len", "8", "--max-new-tokens",
              "64", "--repeats", "1", "--baselines", "llada"]
    runs = {}
    for side, extra in (("jax", []), ("torch", ["--torch", "--against", str(tmp / "jax.json")])):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["bench", *common, *extra, "--json", str(tmp / f"{side}.json")]) == 0
        runs[side] = json.loads((tmp / f"{side}.json").read_text())["rows"], out.getvalue()
    return runs


def test_cached_rows_give_refresh_and_window_passes_apart(bench_runs):
    rows, out = bench_runs["jax"]
    cached = [r for r in rows if "cache=" in r["name"]]
    assert [r["name"] for r in cached] == ["LLaDA steps=64 block=32 cache=prefix", "LLaDA steps=64 block=32 cache=dual",
                                           "llada threshold=0.9 block=32 cache=dual"]
    for r in cached:
        assert all(r[key] is not None for key in KINDS) and all(r[key] is None for key in MIXED), r["name"]
        assert r["refresh_passes"] == 2 and r["mixed_passes"] == 0  # batch 1: every row at the same step
        assert r["refresh_passes"] + r["window_passes"] == r["passes"]
        low, high = sorted((r["refresh_ms"], r["window_ms"]))
        assert low <= r["kinds_ms_per_pass"] <= high
        tokens = r["batch"] * 64  # no eos: every row generates the whole answer
        assert r["kinds_ms_per_token"] * tokens == pytest.approx(r["kinds_ms_per_pass"] * r["passes"])
        assert r["kinds_cover"] == pytest.approx(r["kinds_ms_per_pass"] / r["ms_per_pass"])
        # The row's bound is the counts' weighted mean of the kinds' bounds; a refresh runs the whole canvas.
        weighted = (r["refresh_passes"] * r["refresh_bound_ms"] + r["window_passes"] * r["window_bound_ms"])
        assert r["bound_ms"] == pytest.approx(weighted / r["passes"])
        # A refresh runs more positions through the layers; both kinds run the head on the block and move the
        # canvas's K/V once (read or written), so where the bytes decide (these tiny shapes) the bounds are equal.
        window, refresh = r["window_bound_ms"], r["refresh_bound_ms"]
        assert window <= refresh or window == pytest.approx(refresh)  # equal up to rounding
        assert r["refresh_ratio_to_bound"] == pytest.approx(r["refresh_ms"] / r["refresh_bound_ms"])
        assert r["window_ratio_to_bound"] == pytest.approx(r["window_ms"] / r["window_bound_ms"])
    assert [r["window_passes"] for r in cached[:2]] == [62, 62]  # LLaDA's rule: 32 steps a block, one a refresh
    assert out.count("counts x times = ") == 3
    for r in rows:
        if "cache=" not in r["name"]:
            assert all(r[key] is None for key in KINDS), r["name"]


def test_apd_rows_give_both_bounds(bench_runs):
    rows, out = bench_runs["jax"]
    apd = [r for r in rows if r["name"].startswith("APD")]
    assert [r["name"] for r in apd] == ["APD R=0.7 W=4 M=8"]
    for r in apd:
        assert r["bound_compiled_ms"] >= r["bound_ms"] > 0
        assert r["ratio_to_compiled_bound"] == pytest.approx(r["ms_per_pass"] / r["bound_compiled_ms"])
        assert r["ratio_to_compiled_bound"] <= r["ratio_to_bound"]
        assert r["bound_leaves_out"] == bounds.LEFT_OUT
    assert out.count("bound over the compiled widths") == len(apd)


def test_fastdllm_passes_apart_and_against_jax(bench_runs):
    rows, out = bench_runs["torch"]
    cached = [r for r in rows if r["decoder"] in ("llada prefix", "llada dual", "threshold dual")]
    assert len(cached) == 3
    for r in cached:
        assert r["refresh_passes"] == 2 and r["refresh_passes"] + r["window_passes"] == r["passes"]
        assert r["refresh_ms"] > 0 and r["window_ms"] > 0 and r["kinds_cover"] > 0
    assert [r["window_passes"] for r in cached[:2]] == [62, 62]
    assert out.count("; refresh ") == 3 and out.count("; window ") == 3  # each kind's ratio to apd_jax's


def test_work_counts_logits_caches_and_the_filter():
    cfg = tiny_config(causal=False)
    per_position = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, float32
    assert bounds.kv_bytes(cfg) == per_position
    logits = 4 * 3 * cfg.vocab_size  # three positions' float32 logits
    assert bounds.Work(tokens=3, heads=3).moved(cfg) == 2 * logits  # written, then read
    assert bounds.Work(tokens=3, heads=3, filtered=True).moved(cfg) == 4 * logits  # and the filtered copy
    assert bounds.Work(tokens=3, heads=0, kv_read=5, kv_written=3).moved(cfg) == 8 * per_position
    layers, head = bounds.matmul_params(cfg)
    assert bounds.Work(tokens=3, heads=2).flops(cfg) == 2 * (3 * layers + 2 * head)
    ceilings = {"bandwidth": 1e9, "matmul_flops": 1e30}  # memory-bound: the bytes decide
    work = bounds.Work(tokens=3, heads=3, kv_written=3)
    assert bounds.pass_ms([(cfg, work)], 1000, ceilings) == pytest.approx(1e3 * (1000 + work.moved(cfg)) / 1e9)


def test_window_work_follows_the_cache_mode():
    """A dual window is the block, reading the cache outside it; a prefix window runs from the block's start
    to the end, reading the cache before it; a refresh runs and writes the whole canvas; every pass runs the
    head on the block alone."""
    dual = LLaDAConfig(max_new_tokens=64, block_length=16, cache="dual")
    prefix = LLaDAConfig(max_new_tokens=64, block_length=16, cache="prefix")
    assert passes.kind_work(dual, 2, 10, None, False) == bounds.Work(2 * 74, 2 * 16, kv_written=2 * 74)
    assert passes.kind_work(LLaDAConfig(max_new_tokens=64, block_length=16), 2, 10, None, False) == bounds.Work(
        2 * 74, 2 * 16)  # without a cache: every pass a refresh writing nothing
    assert passes.kind_work(dual, 2, 10, 1, False) == bounds.Work(2 * 16, 2 * 16, kv_read=2 * 58, kv_written=2 * 16)
    assert passes.kind_work(prefix, 1, 10, 1, False) == bounds.Work(48, 16, kv_read=26, kv_written=48)
    assert passes.kind_work(prefix, 1, 10, 3, True) == bounds.Work(16, 16, kv_read=58, kv_written=16, filtered=True)
    assert passes.filtered_rule(DreamBlockConfig(max_new_tokens=64))  # its top_k 50 filters even when greedy
    assert not passes.filtered_rule(dual)


def _result(accepted: list[list[int]]) -> GenerationResult:
    a = np.asarray(accepted)
    return GenerationResult(np.zeros((len(a), 8), np.int32), np.full(len(a), 8), a, np.zeros(len(a), bool), a.shape[1])


def test_pass_kinds_follow_each_rule_end_of_a_block():
    threshold = ThresholdConfig(threshold=0.9, max_new_tokens=8, block_length=4, cache="dual")
    # A block ends once all of it is committed: blocks of 2 and 3 passes, each opened by a refresh.
    assert passes.pass_kinds(_result([[1, 3, 2, 1, 1]]), threshold) == [(True, None), (False, 0), (True, None),
                                                                       (False, 1), (False, 1)]
    # Rows at different steps: passes 1 and 2 run both forwards (pass 1: row 0's window in block 0, row 1's
    # refresh of block 1; pass 2 the other way round).
    assert passes.pass_kinds(_result([[1, 3, 2, 1, 1], [4, 2, 2, 0, 0]]), threshold) == [
        (True, None), (True, 0), (True, 1), (False, 1), (False, 1)]
    assert passes.pass_kinds(_result([[1, 3, 2, 1]]), threshold) is None  # the last block never ended
    llada = LLaDAConfig(max_new_tokens=8, block_length=4, steps=4, cache="dual")
    two_steps = [(True, None), (False, 0), (True, None), (False, 1)]
    assert passes.pass_kinds(_result([[2, 2, 2, 2]]), llada) == two_steps  # two steps a block
    assert passes.pass_kinds(_result([[2, 1, 2, 2]]), llada) == two_steps  # a masked prediction: its steps end it
    assert [passes.kind_of(*kind) for kind in [(True, None), (True, 0), (False, 1)]] == ["refresh", "mixed", "window"]
    refresh, window = bounds.Work(10, 8), bounds.Work(4, 4, kv_read=6)
    work = lambda block: refresh if block is None else window  # noqa: E731
    assert passes.forwards((True, 0), work) == [refresh, window] and passes.forwards((False, 0), work) == [window]
    assert refresh + window == bounds.Work(14, 12, kv_read=6)


def test_apd_replay_asks_what_the_rule_asks_and_pads_to_the_level():
    cfg = APDConfig(W=4, M=8, M_min=2, M_scale=1.0, M_margin=1, max_new_tokens=16)
    assert cfg.lookahead_levels() == (4, 8)
    accepted = np.asarray([[2, 1, 5, 8], [1, 1, 0, 0]])  # row 1 stops after two passes
    (asked0, compiled0), (asked1, compiled1), (asked2, compiled2), _ = bounds.apd_work(accepted, cfg, 10, True, False)
    drafter, verifier = asked0
    assert (drafter.tokens, drafter.heads, verifier.tokens) == (2 * 18, 2 * 8, 2 * 8)  # window [0, 10 + M)
    assert compiled0[0].tokens == 2 * 18 and compiled0[1].heads == 2 * 8
    # Pass 1: lookaheads ceil(k) + 1 = 3 and 2 from t = 12 and 11; windows from t_prev - W + 1 = 7.
    assert (asked1[0].tokens, asked1[0].heads, asked1[0].kv_read) == ((12 - 7 + 3) + (11 - 7 + 2), 5, 14)
    assert (compiled1[0].tokens, compiled1[0].heads, compiled1[1].tokens) == (2 * (5 + 4), 2 * 4, 2 * 4)
    # Pass 2: row 1 is done; row 0 asks ceil(1) + 1 = 2 from t = 13, the level of 4 for both rows.
    assert (asked2[0].heads, compiled2[0].heads, asked2[1].kv_read) == (2, 2 * 4, 13)


def test_a_mixed_pass_runs_both_forwards_alone():
    """Rows of a batch at different steps (rare on tiny random weights, which commit one token a pass):
    the mixed kind is timed on its own program, one row refreshing while the other runs its window."""
    from apd_jax.bench.decoders import random_model, random_prompts
    from apd_jax.models.llada import LLADA

    model = random_model(tiny_config(causal=False, family=LLADA, num_kv_heads=4), 4)
    cfg = ThresholdConfig(threshold=0.9, max_new_tokens=16, block_length=8, cache="prefix", eos_token_ids=())
    seconds = passes.time_kinds(model, cfg, random_prompts([model.cfg], 2, 8), {("mixed", 1): 2}, 1)
    assert list(seconds) == [("mixed", 1)] and seconds["mixed", 1] > 0


def test_every_canvas_rule_runs_its_head_on_the_block():
    """kind_work counts the head over the block alone: every rule the bench runs reads positions only
    relative to the block (blocks.loop view_size)."""
    from apd_jax.bench.decoders import random_model
    from apd_jax.decoding.blocks.loop import view_size
    from apd_jax.models.llada import LLADA

    model = random_model(tiny_config(causal=False, family=LLADA, num_kv_heads=4), 4)
    for cfg in (LLaDAConfig(max_new_tokens=64, block_length=16), DreamBlockConfig(max_new_tokens=64, block_length=16),
                ThresholdConfig(max_new_tokens=64, block_length=16)):
        assert view_size(passes.canvas_rule(model, cfg), 16) == 16


def test_caches_choose_the_block_rows(tmp_path, capsys):
    """--caches keeps the block rows of those cache modes (a prefix call alone compiles a window per block)."""
    out = tmp_path / "none.json"
    assert main(["bench", "--shapes", "tiny", "--batch", "1", "--settings", "0.7,4,8", "--prompt-len", "8",
                 "--max-new-tokens", "16", "--repeats", "1", "--baselines", "llada", "--caches", "none",
                 "--json", str(out)]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["APD R=0.7 W=4 M=8", "LLaDA steps=16 block=16", "llada threshold=0.9"]
    with pytest.raises(SystemExit):
        main(["bench", "--shapes", "tiny", "--caches", "dual,full"])
    assert main(["bench", "--shapes", "tiny", "--baselines", "dream-block", "--caches", "prefix"]) == 2
    assert "dream-block runs the dual cache only" in capsys.readouterr().err


def test_settings_none_times_the_baselines_alone(tmp_path, capsys):
    """--settings none drops the APD rows (and the pair, when no baseline runs on it); it needs a baseline,
    and --quality and --workload need an APD setting."""
    out = tmp_path / "llada.json"
    assert main(["bench", "--shapes", "tiny", "--batch", "1", "--settings", "none", "--prompt-len", "8",
                 "--max-new-tokens", "16", "--repeats", "1", "--baselines", "llada", "--caches", "dual",
                 "--json", str(out)]) == 0
    names = [r["name"] for r in json.loads(out.read_text())["rows"]]
    assert names == ["LLaDA steps=16 block=16 cache=dual", "llada threshold=0.9 block=16 cache=dual"]
    assert main(["bench", "--shapes", "tiny", "--settings", "none", "--baselines", "none"]) == 2
    assert "leave nothing to time" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny", "--settings", "none", "--workload", "4"]) == 2
    assert "give an APD --settings entry" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny", "--torch", "--settings", "0.7,4,8,2,1.0,1", "--baselines", "none"]) == 2
    assert "gives only adaptive-lookahead entries" in capsys.readouterr().err
