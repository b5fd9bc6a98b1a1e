"""The `apd-jax` command line: real runs on tiny models, and errors as messages."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from apd_jax import ASSETS_DIR
from apd_jax.cli import main


def test_generate_random_tiny_prints_tokens_and_stats(capsys):
    assert main(["generate", "--random-tiny", "--ids", "5 6 7 8", "--max-new-tokens", "12", "--W", "4", "--M", "6"]) == 0
    out = capsys.readouterr().out
    assert "tokens/pass" in out and "passes" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--random-tiny", "--ids", "1 2", "--R", "2"], "R=2.0 must lie in [0, 1]"),
        (["generate", "--random-tiny", "--ids", "1 2", "--top-p", "0"], "top_p=0.0 must lie in (0, 1]"),
        (["generate", "--drafter", "/no/such/dir", "--verifier", "/no/such/dir", "hi"], "/no/such/dir not found"),
        (["generate", "--random-tiny", "--prompts-file", "/no/prompts.txt", "--ids"], "prompts file /no/prompts.txt not found"),
        (["convert", "hf-to-flax", "/no/src", "/tmp/x"], "/no/src not found"),
        (["compare", "--random-tiny", "--prompts-file", "/no/p.txt"], "/no/p.txt not found"),
    ],
)
def test_errors_are_messages_not_tracebacks(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_convert_round_trip_through_the_cli(qwen_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-flax", str(qwen_dir), str(tmp_path / "flax")]) == 0
    assert main(["convert", "flax-to-hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_compare_prints_a_row_per_decoder(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("5 6 7 8\n10 11 12\n")
    assert main(["compare", "--random-tiny", "--prompts-file", str(prompts), "--max-new-tokens", "8", "--W", "2",
                 "--M", "4"]) == 0
    out = capsys.readouterr().out
    for name in ("left-to-right K=1", "most confident first", "entropy", "threshold", "APD", "AR (verifier alone)"):
        assert name in out


def test_bench_runs_on_tiny_shapes(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--batch", "1", "--settings", "0.7,4,8", "--prompt-len", "8",
                 "--max-new-tokens", "16", "--repeats", "1", "--profile", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "APD R=0.7 W=4 M=8" in out and "AR decode" in out and "left-to-right" in out
    assert out.count("device profile") == 3  # every row profiled (XLA:CPU records no device ops)
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 1, 1] and all(r["profile"] is not None for r in rows)


def test_profile_sums_every_op_by_kind():
    from apd_jax.bench import decoders as bench

    assert [bench.op_kind(n) for n in ("nvjet_sm90_tst_320x128", "gemm_fusion_dot_1708", "memcpy32_post",
                                       "input_scatter_fusion_213", "input_reduce_fusion", "loop_add_fusion_144")] == [
        "gemm", "gemm", "copy", "scatter", "reduce", "other"]
    row = bench.Row(name="APD", batch=1, ms_per_pass=9.0, tokens_per_s=1.0, tokens_per_pass=2.0, passes=10,
                    compile_s=1.0, bound_ms=6.0, memory_floor_ms=6.0, peak_memory_gb=None,
                    profile=[("nvjet_a", 6.5, 27.0)], profile_kinds={"gemm": (6.94, 315.5), "other": (1.31, 420.5)})
    assert "every op: 8.25 ms/pass in 736 kernels; by kind (kernels): gemm 6.94 ms (316), other 1.31 ms (420)" in (
        bench.format_row(row))


def test_bench_llada_baseline_runs_in_jax_and_in_the_published_pytorch_code(tmp_path, capsys):
    common = ["--shapes", "tiny", "--settings", "0.7,4,8", "--prompt-len", "8", "--max-new-tokens", "16",
              "--repeats", "1", "--baselines", "llada,dream-block"]
    assert main(["bench", "--batch", "1,2", *common, "--json", str(tmp_path / "jax.json")]) == 0
    rows = json.loads((tmp_path / "jax.json").read_text())["rows"]
    assert [(r["name"], r["batch"]) for r in rows] == [
        ("APD R=0.7 W=4 M=8", 1), ("APD R=0.7 W=4 M=8", 2), ("Dream block steps=16 block=16 schedule cache=dual", 1),
        ("Dream block steps=16 block=16 threshold=0.9 cache=dual", 1),
        ("Dream block steps=16 block=16 threshold=0.9 cache=dual", 2), ("LLaDA steps=16 block=16", 1),
        ("LLaDA steps=16 block=16 cache=prefix", 1), ("LLaDA steps=16 block=16 cache=dual", 1),
        ("llada threshold=0.9", 1), ("llada threshold=0.9 block=16 cache=dual", 1),
        ("LLaDA steps=16 block=16 cache=dual", 2)]  # the dual-cache rows at every batch size
    assert all(r["passes"] == 16 and r["tokens_per_pass"] == 1.0 for r in rows[5:8])  # steps = answer length
    capsys.readouterr()
    assert main(["bench", "--torch", *common, "--json", str(tmp_path / "torch.json"),
                 "--against", str(tmp_path / "jax.json")]) == 0
    torch_rows = json.loads((tmp_path / "torch.json").read_text())["rows"]
    assert [r["decoder"] for r in torch_rows] == ["apd", "apd", "dream-block schedule dual",
                                                  "dream-block threshold dual", "llada", "llada prefix",
                                                  "llada dual", "threshold dual"]
    assert [r["passes"] for r in torch_rows[4:7]] == [16] * 3  # Fast-dLLM's cached samplers, steps = answer length
    assert "PyTorch LLaDA generate steps=16 block=16 (published): " in capsys.readouterr().out  # its ratio line


def test_bench_workload_compares_fixed_batches_with_continuous_batching(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--batch", "3", "--settings", "0.7,4,8", "--workload", "7",
                 "--budgets", "2-12", "--prompt-len", "8", "--json", str(tmp_path / "w.json")]) == 0
    assert "continuous / fixed tokens/s: " in capsys.readouterr().out
    report = json.loads((tmp_path / "w.json").read_text())
    fixed, continuous = report["rows"]
    assert fixed["name"].startswith("fixed ") and continuous["name"].startswith("continuous ")
    assert (fixed["group"], continuous["group"]) == (3, 1) and report["budgets"]["low"] == 2
    # The same prompts and budgets, so the same tokens; refilling a slot as soon as its row ends never
    # needs more passes than waiting for the whole batch.
    assert fixed["tokens"] == continuous["tokens"] and 7 * 2 <= fixed["tokens"] <= 7 * 12
    assert fixed["same_outputs"] is None and (continuous["same_outputs"], continuous["same_tokens"]) == (1.0, 1.0)
    assert continuous["passes"] <= fixed["passes"] and 0 < fixed["occupancy"] <= continuous["occupancy"] <= 1
    # Runs in other calls (a long GPU run split in two) decode the same workload; fixed batches sorted by
    # budget decode the same tokens too.
    capsys.readouterr()
    assert main(["bench", "--shapes", "tiny", "--batch", "3", "--settings", "0.7,4,8", "--workload", "7",
                 "--budgets", "2-12", "--prompt-len", "8", "--runs", "continuous,sorted", "--group", "2",
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "sorted / continuous tokens/s: " in capsys.readouterr().out
    alone, ordered = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert (alone["group"], alone["tokens"]) == (2, continuous["tokens"])
    assert ordered["name"].startswith("sorted ") and (ordered["group"], ordered["tokens"]) == (3, fixed["tokens"])
    # Sampled, each prompt in other slots beside other rows in each run: the same outputs (float32, CPU).
    capsys.readouterr()
    assert main(["bench", "--shapes", "tiny", "--batch", "3", "--settings", "0.7,4,8", "--workload", "7",
                 "--budgets", "2-12", "--prompt-len", "8", "--runs", "fixed,continuous", "--temperature", "0.9",
                 "--top-p", "0.95", "--json", str(tmp_path / "s.json")]) == 0
    assert "against the first run: 100.0% of the outputs the same, 100.0% of the tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["rows"][1]["same_tokens"] == 1.0


def test_bench_samples_at_its_temperature_and_top_p(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--batch", "2", "--settings", "0.7,4,8", "--prompt-len", "8",
                 "--max-new-tokens", "16", "--repeats", "1", "--temperature", "0.6", "--top-p", "0.95",
                 "--json", str(tmp_path / "b.json")]) == 0
    names = [r["name"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]]
    assert names == ["APD R=0.7 W=4 M=8 T=0.6 p=0.95", "Dream left-to-right K=1 W=16 M=100 T=0.6 p=0.95",
                     "AR decode T=0.6 p=0.95"]
    capsys.readouterr()
    assert main(["bench", "--torch", "--temperature", "0.6"]) != 0
    assert "--torch times greedy decoding only" in capsys.readouterr().err
    assert main(["bench", "--shapes", "tiny", "--top-p", "1.5"]) != 0
    assert "top_p=1.5" in capsys.readouterr().err


def test_bench_prompts_avoid_the_mask_and_special_tokens():
    from apd_jax.bench.decoders import random_prompts
    from apd_jax.models.config import dream_7b_config, qwen25_05b_config, tiny_config

    for configs in ([tiny_config(False), tiny_config(True)], [dream_7b_config(), qwen25_05b_config()]):
        ids = np.array(random_prompts(configs, 4, 512))
        assert ids.shape == (4, 512) and ids.min() >= 0
        assert ids.max() < min([150000] + [c.mask_token_id for c in configs if c.mask_token_id])


@pytest.mark.parametrize("decoder", ["apd", "leftright", "ar", "dream", "threshold"])
def test_every_decoder_runs_from_generate(decoder, capsys):
    own = {"apd": ["--W", "2", "--M", "4"], "leftright": ["--W", "2", "--M", "4", "--K", "2"], "ar": [],
           "dream": ["--steps", "4"], "threshold": []}[decoder]  # a decoder refuses options it does not take
    argv = ["generate", "--random-tiny", "--ids", "5 6 7 8", "--max-new-tokens", "8", "--decoder", decoder, *own]
    assert main(argv) == 0
    assert "tokens/pass" in capsys.readouterr().out


def test_llada_runs_from_generate_on_the_shipped_llada_model_alone(capsys):
    llada = str(ASSETS_DIR / "llada")
    common = ["generate", "--drafter", llada, "--decoder", "llada", "--max-new-tokens", "16", "--steps", "16",
              "--block-length", "8", "--no-chat", "def add(a, b):"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert "16 tokens, 16 passes, 1.00 tokens/pass" in plain
    assert main([*common, "--cache", "dual", "--confidence-eos-eot-inf", "--eos-id", "0", "--eot-id", "0"]) == 0
    assert "16 tokens, 16 passes" in capsys.readouterr().out
    assert main([*common, "--verifier", str(ASSETS_DIR / "verifier")]) == 2
    assert "--decoder llada runs the diffusion model alone (--drafter DIR): drop --verifier" in capsys.readouterr().err


def test_learn2pd_without_a_filter_is_a_clear_error(capsys):
    argv = ["generate", "--random-tiny", "--ids", "5 6", "--decoder", "learn2pd", "--max-new-tokens", "4"]
    assert main(argv) == 2
    assert "needs --filter" in capsys.readouterr().err


def test_learn2pd_defaults_to_the_embedded_filter_with_the_embedded_drafter(tmp_path, monkeypatch, capsys):
    from apd_jax import ASSETS_DIR
    from apd_jax.cli.common import embedded_filter
    from apd_jax.decoding.learn2pd import FEATURES, load_filter

    assert load_filter(ASSETS_DIR / "filter").fc1.in_features == len(FEATURES)
    monkeypatch.chdir(ASSETS_DIR)  # a relative path to the embedded drafter counts too
    assert embedded_filter(ASSETS_DIR / "drafter") == embedded_filter(Path("drafter")) == ASSETS_DIR / "filter"
    assert embedded_filter(tmp_path) is None and embedded_filter(None) is None
    argv = ["generate", "def add(a, b):\n", "--decoder", "learn2pd", "--max-new-tokens", "8", "--threshold", "0.5"]
    assert main(argv) == 0
    assert "tokens/pass" in capsys.readouterr().out


def test_live_view_shows_every_pass_of_the_compiled_loop(capsys):
    argv = ["generate", "--random-tiny", "--ids", "5 6 7 8", "--max-new-tokens", "10", "--W", "2", "--M", "4"]
    assert main(argv) == 0
    plain = capsys.readouterr().out.splitlines()
    assert main([*argv, "--live"]) == 0
    live = capsys.readouterr().out.splitlines()
    assert live[0] == plain[0]  # the passes, printed as they happen, spell the same text
    assert live[-1].split(" tokens/pass")[0] == plain[-1].split(" tokens/pass")[0]  # same tokens and passes


def test_dream_steps_zero_is_an_error_not_a_default(capsys):
    argv = ["generate", "--random-tiny", "--ids", "5 6", "--decoder", "dream", "--max-new-tokens", "4", "--steps", "0"]
    assert main(argv) == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().err


def test_decoder_defaults_come_from_their_settings_classes():
    from apd_jax.decoding.apd import APDConfig
    from apd_jax.cli.app import build_parser
    from apd_jax.cli.generate import settings
    from apd_jax.decoding.diffusion import DiffusionConfig

    parse = build_parser().parse_args
    assert settings(parse(["generate", "x"])) == APDConfig()
    assert settings(parse(["generate", "x", "--decoder", "dream"])) == DiffusionConfig(steps=256)
    assert settings(parse(["generate", "x", "--decoder", "dream"])).top_k == 50  # Dream's published default
    assert settings(parse(["generate", "x", "--decoder", "dream", "--top-k", "0", "--steps", "8"])) == DiffusionConfig(
        top_k=0, steps=8)
    assert settings(parse(["generate", "x", "--decoder", "learn2pd", "--threshold", "0.5", "--eot-threshold",
                           "none"])).keep_threshold == 0.5
    assert settings(parse(["generate", "x", "--decoder", "leftright", "--K", "3"])).K == 3


@pytest.mark.parametrize("command", ["generate", "convert", "bench", "compare", "eval", "train", "train-filter"])
def test_every_option_help_shows_its_default(command):
    from apd_jax.cli.app import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    # An option of a required either-or group has no default: one of the group must be given.
    chosen = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in sub._actions:
        if action.option_strings and action.nargs != 0 and not action.required and action not in chosen:
            assert "default" in sub._get_formatter()._get_help_string(action), action.option_strings


def test_generate_at_a_terminal_says_it_reads_stdin(monkeypatch, capsys):
    class Terminal:
        def isatty(self):
            return True

        def read(self):
            return "5 6 7"

    monkeypatch.setattr("sys.stdin", Terminal())
    assert main(["generate", "--random-tiny", "--ids", "--max-new-tokens", "4", "--W", "2", "--M", "4"]) == 0
    assert "reading the prompt from stdin" in capsys.readouterr().err


def test_bad_prompts_files_name_the_file_and_the_problem(tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for command in (["generate", "--random-tiny", "--ids"], ["compare", "--random-tiny"]):
        assert main([*command, "--prompts-file", str(tmp_path)]) == 2
        assert f"prompts file {tmp_path} is a directory" in capsys.readouterr().err
        assert main([*command, "--prompts-file", str(latin)]) == 2
        assert f"prompts file {latin} is not UTF-8" in capsys.readouterr().err


def test_prompt_files_unescape_newlines_the_same_way_everywhere(tmp_path, capsys):
    from apd_jax.text.prompts import read_prompts_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("def f():\\n    return 1\n\na \\\\n b\n")
    assert read_prompts_file(prompts) == ["def f():\n    return 1", "a \\n b"]
    assert main(["generate", "--prompts-file", str(prompts), "--max-new-tokens", "4"]) == 0
    assert "def f():\n    return 1" in capsys.readouterr().out


def test_compare_defaults_to_the_embedded_pair(tmp_path, monkeypatch, capsys):
    from apd_jax import ASSETS_DIR
    from apd_jax.checkpoints import load_model

    seen = {}

    def record(drafter, verifier, prompts, max_new_tokens, apd, learned, threshold, **kw):
        seen.update(drafter=drafter, verifier=verifier, learned=learned)
        return []

    monkeypatch.setattr("apd_jax.cli.compare.compare_decoders", record)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def add(a, b):\n")
    assert main(["compare", "--prompts-file", str(prompts)]) == 0
    for role in ("drafter", "verifier"):
        assert seen[role].cfg == load_model(ASSETS_DIR / role).cfg
    assert seen["learned"] is not None  # the embedded drafter's own filter


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("apd-jax ")


@pytest.mark.parametrize("flag", [[], ["--no-compile-cache"]])
def test_compiled_programs_persist_between_runs_unless_turned_off(flag, tmp_path):
    import os
    import subprocess
    import sys

    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "apd_jax.cli", *flag, "generate", "def f(x):", "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "apd_jax" / "jax"
    if flag:
        assert not cache.exists()
    else:
        assert any(p.name.startswith("jit__generate") for p in cache.iterdir())


def test_runtime_defaults_keep_what_the_user_set(monkeypatch):
    # XLA's up-front reservation of GPU memory is off unless the user asks for it.
    from apd_jax.utils.runtime import runtime_defaults

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    runtime_defaults()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    runtime_defaults()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


def test_workload_agreement_counts_prompts_and_token_positions():
    from apd_jax.bench import workload

    row = workload.WorkloadRow("continuous", 2, 1, 2, 6, 1.0, 6.0, 3, 1.0, 1.0, 0.0)
    compared = workload.agreement(row, {0: [1, 2, 3], 1: [4, 5]}, {0: [1, 2, 9], 1: [4]})
    assert (compared.same_outputs, compared.same_tokens) == (0.0, 0.6)  # 2 + 1 of 3 + 2 positions
    assert workload.agreement(row, {0: [7]}, {0: [7]}).same_outputs == 1.0
