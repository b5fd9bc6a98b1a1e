"""Adaptive lookahead (opt-in) and the live view from inside the compiled loop."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from apd_jax.decoding import apd
from apd_jax.decoding.apd import APDConfig, _levels, apd_generate
from apd_jax.decoding.apd_steps import _Level, _level_index, live_view
from apd_jax.decoding.apd_eager import apd_generate_eager
from apd_jax.cli import main
from conftest import PROMPTS

ADAPTIVE = [
    APDConfig(R=0.7, W=4, M=24, max_new_tokens=40, M_min=2, M_scale=1.0, M_margin=1, eos_token_ids=()),
    APDConfig(R=1.0, W=4, M=24, max_new_tokens=40, M_min=4, M_scale=2.0, M_margin=2, eos_token_ids=()),
    APDConfig(R=0.5, W=2, M=12, max_new_tokens=30, M_min=3, M_scale=0.5, M_margin=0, eos_token_ids=(2,)),
]


def test_levels_and_rule_on_literals():
    cfg = APDConfig(M=100, M_min=8, M_scale=2.0, M_margin=4)
    assert cfg.lookahead_levels() == (28, 100)  # round(sqrt(8 * 100)) = round(28.28), then M
    assert dataclasses.replace(cfg, max_new_tokens=40).lookahead_levels() == (18, 40)  # round(sqrt(8 * 40)) = 18
    assert dataclasses.replace(cfg, M_min=50).lookahead_levels() == (71, 100)  # 2 * M_min = M: round(70.71)
    assert dataclasses.replace(cfg, M_min=51).lookahead_levels() == (100,)  # 2 * M_min > M: M alone
    assert APDConfig(M=2, M_min=1).lookahead_levels() == (1, 2)  # round(sqrt(2)) = 1 < 2
    assert APDConfig(M=100).lookahead_levels() == (100,)  # the paper's fixed M: one width
    k = jnp.array([0, 1, 2, 10, 60], jnp.int32)
    assert cfg.next_lookahead(k).tolist() == [8, 8, 8, 24, 100]  # clip(ceil(2k) + 4, 8, 100)
    assert APDConfig(M=100).next_lookahead(k).tolist() == [100] * 5


def test_two_levels_one_window_below_the_top_holds_every_row_of_it():
    cfg = APDConfig(W=16, M=100, M_min=6, M_scale=2.0, M_margin=4)  # `apd-jax bench`'s adaptive setting
    levels = _levels(cfg, 128, 384)  # prompt 128, 256 new tokens: 4 drafter programs, 2 verifier (fixed M: 3, 1)
    # mid = round(sqrt(6 * 100)) = 24; 2k + 4 <= 24 up to k = 10: 15 + 10 + 24 = 49. The top keeps the fixed
    # M's windows, 15 + 100 + (8, 32) and 128 + 100: a row with k = 11 there spans only 15 + 11 + 26 = 52.
    assert levels == (_Level(24, (49,)), _Level(100, (123, 147, 228)))
    assert _levels(APDConfig(W=16, M=100), 128, 384) == (_Level(100, (123, 147, 228)),)  # the fixed M's, unchanged
    assert _levels(dataclasses.replace(cfg, M_min=51), 128, 384) == (_Level(100, (123, 147, 228)),)  # one level
    k = jnp.arange(101)
    fits = cfg.next_lookahead(k) <= levels[0].draft  # a row that accepted k, so looks ahead <= mid, spans
    assert int(jnp.max(jnp.where(fits, cfg.W - 1 + k + levels[0].draft, 0))) == levels[0].windows[0]  # <= 49
    # 40 new tokens after 56: top 40, its windows 15 + 40 + (8, 32) and the first pass's 56 + 100 cut to the buffer's
    # 96; mid round(sqrt(240)) = 15, 2k + 4 <= 15 up to k = 5: 15 + 5 + 15 = 35; 15 + 6 + 40 = 61 keeps all three
    assert _levels(dataclasses.replace(cfg, max_new_tokens=40), 56, 96) == (_Level(15, (35,)), _Level(40, (63, 87, 96)))


def test_a_pass_takes_the_first_level_that_holds_both_its_width_and_its_window():
    levels = _levels(APDConfig(W=16, M=100, M_min=6, M_scale=2.0, M_margin=4), 128, 384)
    cases = [((6, 22), 0), ((24, 49), 0), ((24, 50), 1), ((25, 30), 1), ((6, 200), 1), ((100, 228), 1)]
    assert [int(_level_index(levels, width, window)) for (width, window), _ in cases] == [i for _, i in cases]


@pytest.mark.parametrize("cfg", ADAPTIVE, ids=lambda c: f"R{c.R}-M{c.M}-min{c.M_min}-x{c.M_scale}+{c.M_margin}")
def test_compiled_adaptive_loop_equals_the_eager_loop(cfg, dream, qwen):
    """Padded draft widths and windows shared by the batch give each row exactly its own lookahead."""
    batched = apd_generate(dream, qwen, PROMPTS, cfg)
    for row, prompt in enumerate(PROMPTS):
        assert apd_generate_eager(dream, qwen, prompt, cfg) == (batched.sequences()[row], batched.accepted_per_pass(row))


@pytest.mark.parametrize("cfg", ADAPTIVE[::2], ids=["min2", "min3"])  # ADAPTIVE[1] (R = 1) looks ahead M throughout
def test_compiled_levels_only_pad_the_draft(cfg, dream, qwen, monkeypatch):
    """Whatever draft widths and windows are compiled, each row looks ahead its own lookahead: the same tokens."""
    results = [apd_generate(dream, qwen, PROMPTS, cfg)]
    ladders = [
        lambda top, total: (top,),  # every pass at the top width
        lambda top, total: (_Level(cfg.M_min, (total,)), top),  # a lower level, its one window the whole buffer
        lambda top, total: (_Level(cfg.M_min, (cfg.W - 1 + 2 * cfg.M_min, total)),  # three levels
                            _Level((cfg.M_min + top.draft) // 2, (total,)), top),
    ]
    for ladder in ladders:
        monkeypatch.setattr(apd, "_levels", lambda config, prompt_len, total, ladder=ladder:
                            ladder(_levels(config, prompt_len, total)[-1], total))
        results.append(apd_generate(dream, qwen, PROMPTS, cfg))
    for r in results[1:]:
        assert r.sequences() == results[0].sequences()
        assert all(r.accepted_per_pass(i) == results[0].accepted_per_pass(i) for i in range(len(PROMPTS)))


def test_adaptive_lookahead_changes_what_the_drafter_sees(dream, qwen):
    fixed = APDConfig(R=0.7, W=4, M=24, max_new_tokens=40, eos_token_ids=())
    adaptive = dataclasses.replace(fixed, M_min=2, M_scale=1.0, M_margin=1)
    a, f = apd_generate(dream, qwen, PROMPTS, adaptive), apd_generate(dream, qwen, PROMPTS, fixed)
    assert (a.lengths == f.lengths).all()
    assert a.sequences() != f.sequences()  # a smaller window is a different drafter input


@pytest.mark.parametrize("kw, message", [
    (dict(M=10, M_min=11), "M_min=11"), (dict(M_min=0), "M_min=0"), (dict(M_min=4, M_scale=0.0), "M_scale"),
    (dict(M_min=4, M_margin=-1), "M_margin"),
])
def test_bad_lookahead_settings_are_clear_errors(kw, message, dream, qwen):
    with pytest.raises(ValueError, match=message):
        apd_generate(dream, qwen, PROMPTS, APDConfig(**kw))


@pytest.mark.parametrize("cfg", [APDConfig(R=0.7, W=4, M=12, max_new_tokens=30, eos_token_ids=()), ADAPTIVE[0]],
                         ids=["fixed", "adaptive"])
def test_live_view_reports_every_pass_of_the_compiled_loop(cfg, dream, qwen):
    # an eos that row 0 generates mid-way, so one pass accepts tokens past it that are not generated
    eos = apd_generate(dream, qwen, PROMPTS, cfg).sequences()[0][5]
    cfg = dataclasses.replace(cfg, eos_token_ids=(eos,))
    passes = []
    with live_view(lambda draft, k, eos_at: passes.append((draft.copy(), k.copy(), eos_at.copy()))):
        result = apd_generate(dream, qwen, PROMPTS, cfg, live=True)
    assert len(passes) == result.passes
    assert result.stopped_at_eos.any()  # a row that stops at an eos mid-pass is streamed up to it
    for row in range(len(PROMPTS)):
        streamed = [tok for draft, kept, _ in passes for tok in draft[row, : kept[row]].tolist()]
        assert streamed == result.sequences()[row]
        assert sum(1 for _, kept, _ in passes if kept[row]) == result.row_passes()[row]
    assert np.array_equal(passes[-1][2] >= 0, result.stopped_at_eos)
    assert apd_generate(dream, qwen, PROMPTS, cfg).sequences() == result.sequences()  # live or not, the same


def test_bench_measures_fixed_and_adaptive_rows_in_one_process(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--batch", "1,2", "--settings", "0.7,4,8;0.7,4,8,2,2,1",
                 "--prompt-len", "8", "--max-new-tokens", "16", "--repeats", "1", "--baselines", "none",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out.count("APD R=0.7 W=4 M=8 adaptive 2,2,1") == 2
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["name"].endswith("adaptive 2,2,1"), r["batch"]) for r in rows] == [
        (False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r["compile_s"] > 0 for r in rows)  # each row compiles its own program
