"""Training a pair from scratch: corpus, tokenizer, the two objectives, saving, and APD on the result."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from apd_jax.text import corpus
import apd_jax.training as T
from apd_jax.decoding.apd import APDConfig, apd_generate, shared_vocab_size
from apd_jax.checkpoints import load_model, load_tokenizer
from apd_jax.models.config import ModelSize, tiny_config
from apd_jax.models.model import forward_logits, init_model
from apd_jax.text.tokenizer import EOS_ID, MASK_ID, load_tokenizer_file, save_tokenizer, train_tokenizer

SNIPPETS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
] * 8

TINY_DRAFTER = ModelSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
TINY_VERIFIER = ModelSize(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(SNIPPETS, vocab_size=300), path, model_max_length=64)
    return path


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_sorted_split_by_path_and_cleaned():
    root = corpus.stdlib_root()
    files = corpus.list_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel
    assert not any("site-packages" in r for r in rel)
    # The split depends on the path alone: the same answer twice, and about the asked share held out.
    held = [r for r in rel if corpus.is_heldout(r)]
    assert held == [r for r in rel if corpus.is_heldout(r)]
    assert 0.01 < len(held) / len(rel) < 0.06
    assert corpus.clean("x = 1\r\n\r\n\r\n\r\n\r\ny = 2   \n\x0c\n") == "x = 1\n\n\ny = 2\n"
    assert corpus.clean("decoding_table = (\n" + "    '\\x00'  #  0x00\n" * 200 + ")\n") is None
    assert corpus.clean("s = '<|endoftext|>'\n") is None
    stream = np.arange(10)
    np.testing.assert_array_equal(corpus.chunk(stream, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_token_stream_ends_every_document_with_eos(tokenizer_dir):
    tok = load_tokenizer_file(tokenizer_dir)
    docs = [corpus.Document("a.py", SNIPPETS[0]), corpus.Document("b.py", SNIPPETS[1])]
    stream = corpus.token_stream(docs, tok, EOS_ID)
    first = tok.encode(SNIPPETS[0]).ids
    assert stream.dtype == np.int32 and stream[len(first)] == EOS_ID and stream[-1] == EOS_ID
    assert (stream == EOS_ID).sum() == 2 and not (stream == MASK_ID).any()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_with_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = "def fib(n):\n    return n  # é ünïcode\t<|mask|>x<|endoftext|>"
    for tok in (PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json")),
                AutoTokenizer.from_pretrained(tokenizer_dir)):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert ids[-1] == EOS_ID and MASK_ID in ids
        assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|mask|>"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (EOS_ID, EOS_ID, MASK_ID)
    assert len(tok) == 300
    # Training is deterministic.
    again = train_tokenizer(SNIPPETS, vocab_size=300)
    assert again.to_str() == load_tokenizer_file(tokenizer_dir).to_str()


# ----------------------------------------------------------------------------- objectives


def test_diffusion_mask_follows_the_specification_literally():
    key = jax.random.key(7)
    b, n, eps = 64, 48, 1e-3
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 50, size=(b, n)), jnp.int32)
    noisy, masked, t = T.diffusion_mask(key, tokens, 1, eps=eps, suffix_prob=0.5)
    # The same draws, spelled out.
    k_t, k_mask, k_mode, k_cut = jax.random.split(key, 4)
    want_t = eps + (1 - eps) * jax.random.uniform(k_t, (b,))
    suffix = np.asarray(jax.random.uniform(k_mode, (b,)) < 0.5)
    cut = np.asarray(jax.random.randint(k_cut, (b,), 1, n))
    u = np.asarray(jax.random.uniform(k_mask, (b, n)))
    first = np.where(suffix, cut, 1)
    want = (u < np.asarray(want_t)[:, None]) & (np.arange(n)[None] >= first[:, None])
    np.testing.assert_allclose(t, want_t)
    np.testing.assert_array_equal(masked, want)
    np.testing.assert_array_equal(noisy, np.where(want, 1, tokens))
    # What that means: position 0 is never masked; suffix rows keep their prefix clean;
    # masked positions and only those hold the mask id; both modes occur.
    assert not np.asarray(masked)[:, 0].any()
    for r in np.flatnonzero(suffix):
        assert not np.asarray(masked)[r, : cut[r]].any()
    assert ((np.asarray(noisy) == 1) == np.asarray(masked)).all()
    assert 0 < suffix.sum() < b
    # Each candidate is masked with probability t: over many positions the share follows t.
    big = jnp.zeros((4, 20000), jnp.int32) + 5
    _, m, tt = T.diffusion_mask(jax.random.key(3), big, 1, suffix_prob=0.0)
    np.testing.assert_allclose(np.asarray(m)[:, 1:].mean(1), np.asarray(tt), atol=0.015)
    _, m, _ = T.diffusion_mask(jax.random.key(3), big[:, :10], 1, suffix_prob=1.0)
    assert not np.asarray(m)[:, 0].any()


def test_diffusion_loss_reads_predictions_through_the_right_shift():
    model = init_model(tiny_config(causal=False), 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 300, size=(4, 24)), jnp.int32)
    key = jax.random.key(5)
    loss, aux = T.diffusion_loss(model, tokens, key, suffix_prob=0.5)
    noisy, masked, t = T.diffusion_mask(key, tokens, model.cfg.mask_token_id, suffix_prob=0.5)
    logits = forward_logits(model, noisy)  # Dream: output i - 1 predicts position i
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    np.testing.assert_allclose(loss, jnp.sum(ce * masked / t[:, None]) / tokens.size, rtol=1e-5)
    assert np.isfinite(float(aux["masked_ce"]))


@pytest.mark.parametrize("causal", [False, True])
def test_training_embedding_is_the_same_lookup(causal):
    model = init_model(tiny_config(causal=causal), 0)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 320, size=(2, 12)), jnp.int32)
    graphdef, state = nnx.split(model)
    trained = T.for_training(nnx.merge(graphdef, state))
    assert isinstance(trained.embed_tokens, T.MatmulEmbed)
    np.testing.assert_array_equal(forward_logits(trained, tokens), forward_logits(model, tokens))


def test_training_dropout_drops_each_branch_output_and_rescales_the_rest():
    cfg = TINY_VERIFIER.config(causal=True, vocab_size=32, max_len=32, param_dtype=jnp.float32, dtype=jnp.float32)
    graphdef, state = nnx.split(init_model(cfg, 0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 32)), jnp.float32)
    plain = nnx.merge(graphdef, state).layers[0]
    dropped = T.for_training(nnx.merge(graphdef, state), 0.25, jax.random.key(1)).layers[0]
    want, got = np.asarray(plain.mlp(x)), np.asarray(dropped.mlp(x))
    zero = got == 0
    assert 0.2 < zero.mean() < 0.3  # about the rate
    np.testing.assert_allclose(got[~zero], want[~zero] / 0.75, rtol=1e-6)
    positions = jnp.broadcast_to(jnp.arange(16), (4, 16))
    attn_want, _ = plain.self_attn(x, positions, jnp.full((4,), 16), None, 0)
    attn_got, cache = dropped.self_attn(x, positions, jnp.full((4,), 16), None, 0)
    assert cache is None and 0.2 < float(jnp.mean(attn_got == 0)) < 0.3
    kept = np.asarray(attn_got) != 0
    np.testing.assert_allclose(np.asarray(attn_got)[kept], np.asarray(attn_want)[kept] / 0.75, rtol=1e-5)
    # Without a key (evaluation), the model is the plain one.
    same = T.for_training(nnx.merge(graphdef, state), 0.25).layers[0]
    np.testing.assert_array_equal(same.mlp(x), want)


def _repeating_stream(n=6000, period=23):
    return (np.arange(n) % period + 2).astype(np.int32)  # ids 2..24, never eos or mask


@pytest.mark.parametrize("causal", [False, True])
def test_training_loss_is_finite_and_decreases(causal):
    size = TINY_VERIFIER if causal else TINY_DRAFTER
    cfg = size.config(causal=causal, vocab_size=32, max_len=32, param_dtype=jnp.float32, dtype=jnp.float32)
    settings = T.TrainSettings(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup=5, log_every=10,
                               eval_every=20, eval_windows=8, seed=0)
    stream = _repeating_stream()
    lines = []
    model, history = T.train_model(cfg, stream, stream[:256].reshape(8, 32), settings, log=lines.append)
    losses = [h["loss"] for h in history["train"]]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    assert [h["step"] for h in history["heldout"]] == [20, 40]
    assert history["heldout"][-1]["loss"] < history["heldout"][0]["loss"] * 1.05
    assert any("held-out" in line for line in lines)
    if not causal:
        assert "ce@1" in history["heldout"][-1]
    if not causal:
        return
    # Reproducible: the same seed gives the same parameters.
    again, _ = T.train_model(cfg, stream, stream[:256].reshape(8, 32), settings, log=lambda *a: None)
    np.testing.assert_array_equal(model.embed_tokens.embedding[...], again.embed_tokens.embedding[...])
    # Dropout changes the updates (its masks), still learns, and leaves held-out evaluation noiseless.
    noisy, h_drop = T.train_model(cfg, stream, stream[:256].reshape(8, 32), dataclasses.replace(settings, dropout=0.2),
                                  log=lambda *a: None)
    assert not np.array_equal(noisy.embed_tokens.embedding[...], model.embed_tokens.embedding[...])
    assert h_drop["train"][-1]["loss"] < 0.7 * h_drop["train"][0]["loss"]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="steps=0"):
        T.TrainSettings(steps=0).validate()
    with pytest.raises(ValueError, match="dropout=1"):
        T.TrainSettings(dropout=1.0).validate()
    cfg = TINY_DRAFTER.config(causal=False, vocab_size=32, max_len=32, param_dtype=jnp.float32, dtype=jnp.float32)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        T.train_model(cfg, np.arange(10, dtype=np.int32), np.zeros((0, 32), np.int32), T.TrainSettings(seq_len=32))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer_file("/nonexistent/dir")


# ----------------------------------------------------------------------------- saving and APD


@pytest.fixture(scope="module")
def pair(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    tok = load_tokenizer_file(tokenizer_dir)
    stream = corpus.token_stream([corpus.Document(f"{i}.py", s) for i, s in enumerate(SNIPPETS)], tok, EOS_ID)
    settings = T.TrainSettings(steps=30, batch_size=8, seq_len=64, lr=1e-2, warmup=5, log_every=15,
                               eval_every=15, eval_windows=4)
    for name, causal, size in (("drafter", False, TINY_DRAFTER), ("verifier", True, TINY_VERIFIER)):
        cfg = size.config(causal=causal, vocab_size=300, max_len=64, param_dtype=jnp.float32, dtype=jnp.float32)
        model, history = T.train_model(cfg, stream, corpus.chunk(stream, 64)[:4], settings, log=lambda *a: None)
        T.save_model(model, out / name, tokenizer_dir, storage_dtype="float32", extra={"history": history})
    return out


def test_saved_pair_loads_like_a_real_checkpoint_and_runs_apd(pair):
    drafter, verifier = load_model(pair / "drafter"), load_model(pair / "verifier")
    assert drafter.cfg.model_type == "dream" and not drafter.cfg.causal and drafter.cfg.mask_token_id == MASK_ID
    assert verifier.cfg.causal and verifier.cfg.tie_word_embeddings and verifier.cfg.eos_token_ids == (EOS_ID,)
    assert json.loads((pair / "drafter" / "config.json").read_text())["model_type"] == "Dream"
    tok_d, tok_v = load_tokenizer(pair / "drafter"), load_tokenizer(pair / "verifier")
    vocab = shared_vocab_size(drafter.cfg, verifier.cfg, tok_d, tok_v)
    prompts = [tok_d.encode("def fib(n):\n"), tok_d.encode("class Point:\n    def")]
    result = apd_generate(drafter, verifier, prompts, APDConfig(R=0.7, W=4, M=16, max_new_tokens=24),
                          shared_vocab=vocab)
    assert result.lengths.min() >= 1 and result.tokens_per_pass() >= 1.0
    assert all(0 <= i < vocab for seq in result.sequences() for i in seq)
    assert isinstance(tok_d.decode(result.sequences()[0]), str)
    assert "history" in json.loads((pair / "drafter" / "training.json").read_text())


def test_saved_models_match_the_pytorch_implementations(pair):
    import torch
    from transformers import Qwen2ForCausalLM

    from apd_jax.bench.torch_reference.dream import TorchDream

    tokens = np.random.default_rng(2).integers(2, 300, size=(2, 20))
    ours = forward_logits(load_model(pair / "verifier"), jnp.asarray(tokens))
    ref = Qwen2ForCausalLM.from_pretrained(pair / "verifier", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    ours = forward_logits(load_model(pair / "drafter"), jnp.asarray(tokens))
    with torch.no_grad():
        theirs = TorchDream.from_pretrained(pair / "drafter")(torch.as_tensor(tokens))[0]
    theirs = torch.cat([theirs[:, :1], theirs[:, :-1]], dim=1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_train_command_end_to_end(tmp_path):
    from apd_jax.cli import main

    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--max-files", "30", "--vocab-size", "400", "--steps", "4", "--verifier-steps", "4",
            "--batch-size", "2", "--seq-len", "128", "--log-every", "2", "--eval-every", "4", "--eval-windows", "2",
            "--warmup", "1", "--eval-prompts", "2", "--eval-max-new-tokens", "8", "--packages", "rich",
            "--stdlib-repeats", "2"]
    for name in ("drafter", "verifier"):
        argv += [f"--{name}-hidden", "32", f"--{name}-layers", "1", f"--{name}-heads", "2",
                 f"--{name}-kv-heads", "1", f"--{name}-intermediate", "32"]
    assert main(argv) == 0
    for name in ("tokenizer", "drafter", "verifier"):
        assert (out / name / "tokenizer.json").is_file()
    assert (out / "drafter" / "model.safetensors").is_file()
    report = json.loads((out / "apd_eval.json").read_text())
    assert report["tokens_per_pass"] >= 1.0 and report["prompts"] >= 1
    info = json.loads((out / "verifier" / "training.json").read_text())["corpus"]
    assert info["package_files"] >= 1 and info["packages"]["rich"].startswith("rich ")
    # The stdlib's tokens twice in the stream: the stream exceeds the unique tokens by them once.
    stdlib_tokens = info["stream_tokens"] - info["train_tokens"]
    assert 0 < stdlib_tokens < info["train_tokens"] and info["stdlib_repeats"] == 2
    assert main(argv[:3] + ["--drafter-hidden", "30", "--drafter-heads", "4"]) == 2  # a clear error, no traceback


def test_stdlib_prompts_come_from_one_side_of_the_split(tmp_path):
    from apd_jax import ASSETS_DIR

    for i in range(80):  # each file's prompt names its file
        (tmp_path / f"m{i}.py").write_text(f"name = 'm{i}.py'\n\n\ndef f(a):\n    return a\n")
    held = {f"m{i}.py" for i in range(80) if corpus.is_heldout(f"m{i}.py")}
    assert 0 < len(held) < 8  # about 3 % of the files
    tok = load_tokenizer_file(ASSETS_DIR / "drafter")

    def files(prompts: list[str]) -> set[str]:
        return {p.split("'")[1] for p in prompts}

    heldout = corpus.stdlib_prompts(tok, len(held), heldout=True, seq_len=512, root=tmp_path)
    train = corpus.stdlib_prompts(tok, 40, heldout=False, seq_len=512, root=tmp_path)
    assert files(heldout) == held and len(files(train)) == 40 and not files(train) & held
    assert train == corpus.stdlib_prompts(tok, 40, heldout=False, seq_len=512, root=tmp_path)  # seeded order
    # Training files in a seeded shuffle, not the alphabetical start of the library.
    assert files(train) != set(sorted(f"m{i}.py" for i in range(80) if f"m{i}.py" not in held)[:40])
    with pytest.raises(ValueError, match="held-out files give only"):  # each file: with and without context
        corpus.stdlib_prompts(tok, 2 * len(held) + 1, heldout=True, seq_len=512, root=tmp_path)


def test_packages_join_the_training_files_never_the_held_out(tmp_path, monkeypatch):
    root, site = tmp_path / "stdlib", tmp_path / "site"
    root.mkdir()
    names = sorted(f"m{i}.py" for i in range(80))  # the corpus's order
    for i, name in enumerate(names):  # long distinct lines, so that a copy of one is recognisable
        (root / name).write_text("".join(f"value_{i}_{j} = compute_something_long({i}, {j})\n" for j in range(6)))
    held = [n for n in names if corpus.is_heldout(n)]
    (site / "fakepkg" / "sub").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("def helper(x):\n    return x + 1\n")
    (site / "fakepkg" / "sub" / "vendored.py").write_text((root / held[0]).read_text())  # a copy of a held-out file
    monkeypatch.syspath_prepend(str(site))

    train, heldout = corpus.load_corpus(root, packages=("fakepkg",))
    paths = [d.path for d in train]
    assert [d.path for d in heldout] == held and "packages/fakepkg/__init__.py" in paths
    assert "packages/fakepkg/sub/vendored.py" not in paths  # dropped: its lines are a held-out file's
    assert [p for p in paths if not p.startswith("packages/")] == [n for n in names if n not in held]
    assert corpus.package_versions(["fakepkg"]) == {"fakepkg": ""}  # no installed distribution
    (site / "single.py").write_text("x = 1\n")
    for name, problem in (("no_such_package", "not an installed top-level package"), ("fakepkg.sub", "not an"),
                          ("single", "a single module, not a package")):
        with pytest.raises(FileNotFoundError, match=f"--packages '{name}' is {problem}"):
            corpus.load_corpus(root, packages=(name,))
    assert all(d.source == ("packages" if d.path.startswith("packages/") else "stdlib") for d in train)


def test_packages_option_expands_deps():
    from apd_jax.cli.train import _package_list

    assert _package_list("none") == ()
    assert _package_list("deps") == corpus.DEPENDENCY_PACKAGES
    assert _package_list("rich, deps,jax") == ("rich", *[n for n in corpus.DEPENDENCY_PACKAGES if n != "rich"])


# ----------------------------------------------------------------------------- memory and progress


@pytest.mark.parametrize("causal", [False, True])
def test_micro_batches_train_the_same_model(causal):
    size = TINY_VERIFIER if causal else TINY_DRAFTER
    cfg = size.config(causal=causal, vocab_size=32, max_len=32, param_dtype=jnp.float32, dtype=jnp.float32)
    stream = _repeating_stream()
    runs = []
    for micro in (1, 4):
        settings = T.TrainSettings(steps=6, batch_size=8, seq_len=32, lr=1e-2, warmup=2, log_every=3, eval_every=6,
                                   eval_windows=8, micro_batches=micro)
        runs.append(T.train_model(cfg, stream, stream[:256].reshape(8, 32), settings, log=lambda *a: None))
    (whole, h1), (parts, h4) = runs
    assert (h1["micro_batches"], h4["micro_batches"]) == (1, 4)
    # The same loss, metrics and update, up to the order of float32 sums.
    for a, b in zip(h1["train"], h4["train"]):
        for k in a.keys() - {"time_s"}:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, err_msg=k)
    for a, b in zip(jax.tree.leaves(nnx.state(whole, nnx.Param)), jax.tree.leaves(nnx.state(parts, nnx.Param))):
        np.testing.assert_allclose(b, a, atol=2e-5)


class _Program:
    """A compiled program's memory report, without compiling: `gib` GiB of temporaries."""

    def __init__(self, gib: float):
        self.gib = gib

    def memory_analysis(self):
        return SimpleNamespace(temp_size_in_bytes=int(self.gib * 2**30), argument_size_in_bytes=0,
                               output_size_in_bytes=0, alias_size_in_bytes=0)


def test_micro_batches_are_the_fewest_that_fit_or_a_clear_refusal():
    tried = []

    def compile_for(micro):
        tried.append(micro)
        return _Program(24 / micro)

    settings = T.TrainSettings(batch_size=8)
    micro, program, need = T.fit_micro_batches(compile_for, settings, free=10 * 2**30)
    assert (micro, tried, program.gib, need) == (4, [1, 2, 4], 6.0, "needs 6.0 GiB")
    assert T.fit_micro_batches(compile_for, settings, free=None)[0] == 1  # free memory unknown: no split
    with pytest.raises(ValueError, match=r"needs 3.0 GiB in micro-batches of 1 row.*of the 1.0 GiB free.*--seq-len"):
        T.fit_micro_batches(compile_for, settings, free=2**30)
    with pytest.raises(ValueError, match=r"needs 12.0 GiB .* --micro-batches 0"):
        T.fit_micro_batches(compile_for, T.TrainSettings(batch_size=8, micro_batches=2), free=10 * 2**30)
    with pytest.raises(ValueError, match="micro_batches=3 must be 0"):
        T.TrainSettings(batch_size=8, micro_batches=3).validate()


def test_progress_shows_after_the_first_step():
    cfg = TINY_VERIFIER.config(causal=True, vocab_size=32, max_len=32, param_dtype=jnp.float32, dtype=jnp.float32)
    settings = T.TrainSettings(steps=5, batch_size=4, seq_len=32, warmup=1, log_every=100, eval_every=100,
                               eval_windows=4)
    lines = []
    stream = _repeating_stream()
    _, history = T.train_model(cfg, stream, stream[:128].reshape(4, 32), settings, log=lines.append)
    assert [h["step"] for h in history["train"]] == [1, 5]
    assert [line.split("loss")[0].split() for line in lines[-2:]] == [["[model]", "step", "1"], ["[model]", "step", "5"]]
    assert "step compiled" in lines[1] and "micro-batch" in lines[1]
