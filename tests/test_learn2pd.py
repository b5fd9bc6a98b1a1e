"""Learn2PD: the oracle's labels, the filter's training and checkpoint, filter decoding, End-of-Text."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apd_jax import ASSETS_DIR
from apd_jax.cli import train_filter as train_filter_cmd
from apd_jax.decoding.diffusion import Prediction, ThresholdConfig, threshold_generate
from apd_jax.decoding.learn2pd import FEATURES, FILTER_FILE, Filter, Learn2PDConfig, learn2pd_generate, load_filter, save_filter
from apd_jax.training.learn2pd_oracle import Traces, collect_traces, oracle_step, oracle_traces
from apd_jax.training.learn2pd_train import (
    FilterTrainConfig,
    compare_with_confidence_rule,
    filter_loss,
    keep_probabilities,
    train_filter,
)
from conftest import MASK, PROMPTS

N = 16
TRAIN_ROWS, HELD_ROWS = np.arange(12), np.arange(12, 16)


@pytest.fixture(scope="module")
def traces(dream):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 320, size=int(rng.integers(2, 15))).tolist() for _ in range(16)]
    return collect_traces(dream, prompts, N, batch_size=8)


@pytest.fixture(scope="module")
def trained(traces):
    return train_filter(traces.select(TRAIN_ROWS), FilterTrainConfig(steps=300))


def constant_filter(logit: float) -> Filter:
    """A filter whose keep logit is `logit` everywhere (keep all / keep nothing)."""
    f = Filter(rngs=nnx.Rngs(0))  # the trained filter's width: the same compiled decoder
    f.fc2.kernel[...] = jnp.zeros_like(f.fc2.kernel[...])
    f.fc2.bias[...] = jnp.full((1,), logit)
    return f


def hand_prediction(tokens, confidence) -> Prediction:
    tokens, confidence = jnp.asarray(tokens, jnp.int32), jnp.asarray(confidence, jnp.float32)
    return Prediction(tokens, confidence, confidence, -confidence)


# --- The oracle ---------------------------------------------------------------


def test_oracle_step_on_hand_made_predictions():
    gen = jnp.asarray([[MASK, MASK, 7, MASK, MASK], [MASK, MASK, MASK, 3, 3]])
    answers = jnp.asarray([[1, 2, 7, 4, 5], [6, 6, 6, 3, 3]])
    pred = hand_prediction([[1, 9, 7, 4, 0], [0, 0, 0, 3, 3]], [[0.1, 0.9, 0.5, 0.2, 0.3], [0.2, 0.9, 0.5, 1.0, 1.0]])
    new, labels = oracle_step(pred, gen, answers, MASK)
    # Row 0: positions 0 and 3 predict the answer (2 is decoded already, 1 is confident but wrong).
    assert labels.tolist()[0] == [True, False, False, True, False]
    assert new.tolist()[0] == [1, MASK, 7, 4, MASK]
    # Row 1: nothing matches; the most confident masked position gets the answer's token, labelled remask.
    assert labels.tolist()[1] == [False] * 5
    assert new.tolist()[1] == [MASK, 6, MASK, 3, 3]


def test_oracle_with_a_left_to_right_stub_labels_the_front_only():
    """A predictor that is right only next to decoded text: the oracle keeps exactly the front each pass."""
    answers = jnp.asarray([[11, 12, 13, 14, 15, 16]])
    gen = jnp.full((1, 6), MASK)
    labels_per_pass = []
    while bool((gen == MASK).any()):
        decoded_left = jnp.concatenate([jnp.ones((1, 1), bool), gen[:, :-1] != MASK], axis=1)
        pred = hand_prediction(jnp.where(decoded_left, answers, 0), jnp.linspace(0.9, 0.1, 6)[None])
        gen, labels = oracle_step(pred, gen, answers, MASK)
        labels_per_pass.append(np.asarray(labels[0]).tolist())
    assert labels_per_pass == np.eye(6, dtype=bool).tolist()
    assert gen.tolist() == answers.tolist()


def test_oracle_traces_from_the_model(traces):
    passes = np.asarray([traces.passes[traces.rows == r].max() + 1 for r in range(16)])
    print(f"\noracle: {len(traces)} samples, {traces.labels.mean():.1%} keep labels, "
          f"{16 * N / passes.sum():.2f} tokens/pass (one-per-pass: 1.00), passes per row {passes.tolist()}")
    assert (passes <= N).all() and passes.sum() < 16 * N
    first = traces.passes == 0
    assert np.bincount(traces.rows[first]).tolist() == [N] * 16  # every position is masked on pass 0
    # The answer is the greedy one-per-pass output, whose first token is pass 0's most confident prediction.
    for r in range(16):
        assert traces.labels[first & (traces.rows == r)].any()
    f = traces.features
    assert ((f[:, :3] >= -1e-6) & (f[:, :3] <= 1 + 1e-6)).all()
    np.testing.assert_allclose(f[first, FEATURES.index("front_distance")], f[first, FEATURES.index("position")])
    # Masked positions only shrink: each row records fewer positions every pass.
    for r in range(16):
        counts = np.bincount(traces.passes[traces.rows == r])
        assert (np.diff(counts) < 0).all()


# --- The filter -----------------------------------------------------------------


def test_filter_has_about_2k_parameters():
    params = nnx.state(Filter(rngs=nnx.Rngs(0)), nnx.Param)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == len(FEATURES) * 256 + 256 + 256 + 1 == 1793


def test_training_reduces_loss_and_report_against_confidence_rule(traces, trained):
    filt, losses = trained
    train, held = traces.select(TRAIN_ROWS), traces.select(HELD_ROWS)
    untrained = Filter(rngs=nnx.Rngs(0))
    before, after = filter_loss(untrained, train), filter_loss(filt, train)
    held_loss = filter_loss(filt, held)
    report = compare_with_confidence_rule(filt, held, keep_threshold=0.5)
    p = held.labels.mean()
    constant = -(p * math.log(p) + (1 - p) * math.log(1 - p))  # the best constant guess's BCE
    print(f"\nBCE on train {before:.4f} -> {after:.4f}; held out {held_loss:.4f} (best constant: {constant:.4f})")
    for name, stats in report.items():
        print(f"held out {name}: {json.dumps(stats)}")
    assert np.isfinite(losses).all()
    assert after < before - 0.02
    assert held_loss < constant  # better than any constant guess on unseen prompts


def test_save_and_restore(tmp_path, trained):
    filt, _ = trained
    out = save_filter(filt, tmp_path / "filter")
    restored = load_filter(out)
    probe = Traces(np.random.default_rng(1).random((50, len(FEATURES)), np.float32), np.zeros(50, bool),
                   np.zeros(50, int), np.zeros(50, int))
    np.testing.assert_array_equal(keep_probabilities(restored, probe), keep_probabilities(filt, probe))
    with pytest.raises(FileExistsError):
        save_filter(filt, out)
    save_filter(Filter(width=4, rngs=nnx.Rngs(0)), out, overwrite=True)
    assert load_filter(out).width == 4
    with pytest.raises(FileNotFoundError, match="not a Learn2PD filter"):
        load_filter(tmp_path / "missing")
    meta = json.loads((out / FILTER_FILE).read_text())
    (out / FILTER_FILE).write_text(json.dumps(meta | {"features": ["confidence"]}))
    with pytest.raises(ValueError, match="trained on features"):
        load_filter(out)


# --- Decoding with the filter -----------------------------------------------


def test_constant_filters_bracket_the_threshold_decoder(dream):
    whole = dict(max_new_tokens=N, eos_token_ids=(), eot_threshold=None)
    nothing = learn2pd_generate(dream, constant_filter(-30.0), PROMPTS, Learn2PDConfig(**whole))
    one_per_pass = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=1.0, **whole))
    assert nothing.tokens.tolist() == one_per_pass.tokens.tolist() and nothing.passes == N
    everything = learn2pd_generate(dream, constant_filter(30.0), PROMPTS, Learn2PDConfig(**whole))
    one_pass = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=1e-6, **whole))
    assert everything.tokens.tolist() == one_pass.tokens.tolist() and everything.passes == 1


def test_trained_filter_decodes_batched_equals_per_row(dream, trained):
    filt, _ = trained
    config = Learn2PDConfig(max_new_tokens=N, eos_token_ids=())
    batched = learn2pd_generate(dream, filt, PROMPTS, config)
    print(f"\nlearn2pd (tiny random Dream): passes per row {batched.row_passes().tolist()} of {N}")
    assert not (batched.tokens == MASK).any() and (batched.row_passes() <= N).all()
    for row, prompt in enumerate(PROMPTS):
        alone = learn2pd_generate(dream, filt, [prompt], config)
        assert alone.sequences()[0] == batched.sequences()[row]
        assert alone.accepted_per_pass(0) == batched.accepted_per_pass(row)


def test_end_of_text_drops_positions_after_a_confident_eos(dream):
    first_pass = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=1e-6, max_new_tokens=N,
                                                                    eos_token_ids=())).tokens[0].tolist()
    at = next(j for j in range(4, N) if first_pass[j] not in first_pass[:j])
    eos = first_pass[at]  # pass 0 predicts it first at `at`
    keep_nothing = constant_filter(-30.0)
    config = Learn2PDConfig(max_new_tokens=N, eos_token_ids=(eos,), eot_threshold=0.0)
    result = learn2pd_generate(dream, keep_nothing, PROMPTS, config)
    without = learn2pd_generate(dream, keep_nothing, PROMPTS, Learn2PDConfig(max_new_tokens=N, eos_token_ids=(eos,),
                                                                             eot_threshold=None))
    assert result.stopped_at_eos[0] and result.lengths[0] <= at + 1 and result.sequences()[0][-1] == eos
    assert (result.tokens[0, result.lengths[0]:] == dream.cfg.pad_token_id).all()
    assert result.row_passes()[0] <= at + 1 and result.row_passes()[0] < without.row_passes()[0]
    # The same loop with the threshold rule at 1.0 (also one forced token per pass) agrees.
    same = threshold_generate(dream, PROMPTS, ThresholdConfig(threshold=1.0, max_new_tokens=N, eos_token_ids=(eos,),
                                                              eot_threshold=0.0))
    assert same.sequences() == result.sequences() and same.accepted.tolist() == result.accepted.tolist()


# --- Bad input and the command ----------------------------------------------


def test_bad_input_raises(dream, traces):
    with pytest.raises(ValueError, match="keep_threshold"):
        learn2pd_generate(dream, constant_filter(0.0), PROMPTS, Learn2PDConfig(keep_threshold=1.0))
    with pytest.raises(ValueError, match="eot_threshold"):
        learn2pd_generate(dream, constant_filter(0.0), PROMPTS, Learn2PDConfig(eot_threshold=1.5))
    with pytest.raises(ValueError, match="steps=0"):
        train_filter(traces, FilterTrainConfig(steps=0))
    only_remask = Traces(traces.features, np.zeros_like(traces.labels), traces.rows, traces.passes)
    with pytest.raises(ValueError, match="only remask"):
        train_filter(only_remask)
    with pytest.raises(ValueError, match="other than the mask"):
        oracle_traces(dream, PROMPTS[:1], np.full((1, 4), MASK))
    with pytest.raises(ValueError, match="answers must be"):
        oracle_traces(dream, PROMPTS, np.zeros((1, 4), int))


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    train_filter_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-filter", *map(str, argv)])
    return args.func(args)


def test_train_filter_command(tmp_path, dream_dir, qwen_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(map(str, p)) for p in (PROMPTS * 3)[:8]) + "\n")
    out = tmp_path / "filter"
    # 8 prompts of <= 16 tokens, 16 new tokens: the shapes the `traces` fixture compiled.
    common = ["--prompts-file", prompts, "--ids", "--max-new-tokens", N, "--steps", 30, "--train-batch", 256]
    assert _run_cli(["--drafter", dream_dir, "--out", out, "--holdout", 0.25, *common]) == 0
    printed = capsys.readouterr().out
    assert "oracle traces" in printed and "held out (2 prompts" in printed and "filter > 0.9: precision" in printed
    assert load_filter(out).width == 256
    with pytest.raises(FileExistsError):
        _run_cli(["--drafter", dream_dir, "--out", out, *common])
    with pytest.raises(ValueError, match="causal"):
        _run_cli(["--drafter", qwen_dir, "--out", tmp_path / "f2", *common])
    common[1] = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="prompts file"):
        _run_cli(["--drafter", dream_dir, "--out", tmp_path / "f3", *common])


def test_train_filter_on_stdlib_training_prompts(tmp_path, capsys):
    common = ["--drafter", ASSETS_DIR / "drafter", "--max-new-tokens", 4, "--steps", 5, "--train-batch", 64]
    assert _run_cli([*common, "--train-prompts", 4, "--batch-size", 4, "--out", tmp_path / "f"]) == 0
    assert "oracle traces" in capsys.readouterr().out and (tmp_path / "f" / FILTER_FILE).is_file()
    with pytest.raises(ValueError, match="no --ids"):
        _run_cli([*common, "--train-prompts", 4, "--ids", "--out", tmp_path / "g"])
