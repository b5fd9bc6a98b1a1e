"""`apd-jax compare` with the block decoders (issues 27, 28): Fast-dLLM's cached rows beside APD on a Dream
drafter, and a LLaDA drafter compared alone, through the API and the command line."""

from __future__ import annotations

import pytest
from conftest import last_error_line, run_cli

from apd_jax import ASSETS_DIR
from apd_jax.checkpoints import read_config
from apd_jax.decoding.apd import APDConfig
from apd_jax.decoding.registry import Models
from apd_jax.evaluation.compare import FIRST_ROW, PAIR_REFERENCES, measure_runs, planned_runs
from apd_jax.models.config import tiny_config
from apd_jax.models.model import init_model

APD = APDConfig(W=2, M=4)
LLADA = ASSETS_DIR / "llada"


def labels(drafter, verifier, learn2pd=True, **kw) -> list[str]:
    runs, _ = planned_runs(drafter, verifier, 8, APD, 0.9, learn2pd, **kw)
    return [label for label, _, _ in runs]


def test_a_dream_drafter_gets_fast_dllm_rows_for_each_cache_and_the_parallel_rules_in_blocks():
    dream, qwen = tiny_config(causal=False), tiny_config(causal=True)
    rows = labels(dream, qwen, block_length=4)
    fast = [f"Fast-dLLM Dream threshold 0.9, blocks of 4, {c}" for c in ("no cache", "prefix cache", "dual cache")]
    blocked = ["confidence threshold 0.9, blocks of 4", "Learn2PD keep > 0.9 + EoT 0.9, blocks of 4"]
    assert rows[-5:] == fast + blocked
    assert "APD R=0.7 W=2 M=4" in rows and "AR (verifier alone)" in rows
    # The threshold and Learn2PD rules take no cache on Dream: with --cache dual only Fast-dLLM's rule runs blocked.
    assert labels(dream, qwen, block_length=4, caches=("dual",))[-1:] == fast[-1:]
    # One block: the prefix window is the block, as the dual cache's; no blocked copies of the whole-answer rows.
    assert labels(dream, qwen)[-2:] == ["Fast-dLLM Dream threshold 0.9, one block, no cache",
                                        "Fast-dLLM Dream threshold 0.9, one block, dual cache"]
    alone = labels(dream, None, learn2pd=False, block_length=4)
    assert not any(r.startswith(("APD", "AR", "Learn2PD")) for r in alone) and fast[0] in alone
    assert planned_runs(dream, None, 8, APD, 0.9, False)[1] == PAIR_REFERENCES


def test_a_llada_drafter_gets_its_block_decoders_against_the_first_row():
    llada = read_config(LLADA)
    runs, references = planned_runs(llada, None, 8, APD, 0.9, True, block_length=4)
    assert [(label, chosen.name, config.cache) for label, chosen, config in runs] == [
        ("LLaDA low-confidence steps=8, blocks of 4, no cache (reference)", "llada", "none"),
        ("LLaDA low-confidence steps=8, blocks of 4, prefix cache", "llada", "prefix"),
        ("LLaDA low-confidence steps=8, blocks of 4, dual cache", "llada", "dual"),
        *[(f"confidence threshold 0.9, blocks of 4, {c} cache".replace("none cache", "no cache"), "threshold", c)
          for c in ("none", "prefix", "dual")],
        *[(f"Learn2PD keep > 0.9 + EoT 0.9, blocks of 4, {c} cache".replace("none cache", "no cache"), "learn2pd",
           c) for c in ("none", "prefix", "dual")],
    ]
    assert references == {FIRST_ROW: runs[0][0]}
    assert all(config.block_length == 4 and config.max_new_tokens == 8 for _, _, config in runs)
    with pytest.raises(ValueError, match="a llada drafter and a qwen2 verifier do not share a tokenizer"):
        planned_runs(llada, read_config(ASSETS_DIR / "verifier"), 8, APD, 0.9, False)
    with pytest.raises(ValueError, match="block_length=3 must divide max_new_tokens=8"):
        planned_runs(llada, None, 8, APD, 0.9, False, block_length=3)


def test_cached_rows_measure_passes_and_agreement_on_a_tiny_dream():
    drafter = init_model(tiny_config(causal=False, eos_token_ids=()), 1)  # no eos: every row fills its 8 tokens
    runs, references = planned_runs(drafter.cfg, None, 8, APD, 0.9, False, block_length=4, caches=("none", "dual"))
    first = references["most confident first"]
    kept = {first, "Fast-dLLM Dream threshold 0.9, blocks of 4, dual cache", "confidence threshold 0.9, blocks of 4"}
    rows = measure_runs(Models(drafter), [[5, 6, 7], [9, 10]], [r for r in runs if r[0] in kept], {"first": first})
    assert {r.decoder for r in rows} == kept
    reference = next(r for r in rows if r.decoder == first)
    assert reference.agreements == {"first": 1.0} and reference.passes_per_token == 1.0  # one token per pass
    # Each pass commits at least one token, Fast-dLLM's Dream only its block's first in a block's first pass.
    assert all(r.tokens == 16 and 2 / 8 <= r.passes_per_token <= 1.0 and 0 <= r.agreements["first"] <= 1
               for r in rows)


def test_compare_runs_a_llada_checkpoint_alone_from_the_command_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\n")
    assert run_cli(["compare", "--drafter", str(LLADA), "--prompts-file", str(prompts), "--max-new-tokens", "8",
                    "--block-length", "4", "--cache", "dual"]) == 0
    captured = capsys.readouterr()
    assert ("(no APD or AR rows: APD needs a causal verifier sharing the drafter's tokenizer, and apd_jax has none "
            "for a llada drafter)") in captured.err
    assert "(no Learn2PD rows: give --filter DIR for this drafter)" in captured.err
    table = captured.out.strip().splitlines()
    assert table[0] == "| decoder | passes per token | agreement with the first row | tokens/s | tokens |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [c[0] for c in cells] == ["LLaDA low-confidence steps=8, blocks of 4, no cache (reference)",
                                     "LLaDA low-confidence steps=8, blocks of 4, dual cache",
                                     "confidence threshold 0.9, blocks of 4, dual cache"]
    assert cells[0][1:3] == ["1.000", "1.000"]  # one token per step; the reference agrees with itself
    assert all(0 < float(c[1]) <= 1.0 and 0 < int(c[4]) <= 8 for c in cells)


@pytest.mark.parametrize("argv, error", [
    (["--drafter", str(LLADA), "--verifier", str(ASSETS_DIR / "verifier")],
     "a llada drafter and a qwen2 verifier do not share a tokenizer"),
    (["--drafter", str(LLADA), "--lookahead", "8"], "--lookahead studies APD, which needs a verifier: give --verifier"),
    (["--drafter", str(LLADA), "--block-length", "3"], "block_length=3 must divide max_new_tokens=64"),
    (["--drafter", str(ASSETS_DIR / "verifier")], "the drafter is a causal (qwen2) model: compare runs a diffusion"),
    (["--cache", "full"], "argument --cache: invalid choice: 'full'"),
    (["--lookahead", "8", "--cache", "dual"], "--block-length and --cache set the block decoders' rows; --lookahead"),
])
def test_bad_combinations_are_one_line_errors_before_any_model_loads(argv, error, no_work, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\n")
    assert run_cli(["compare", "--prompts-file", str(prompts), *argv]) == 2
    assert error in last_error_line(capsys)
