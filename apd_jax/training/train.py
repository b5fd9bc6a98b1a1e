"""Training a small APD pair from scratch on the Python standard library (apd_jax.text.corpus).

Three directories: tokenizer/ (byte-level BPE with `<|endoftext|>` = 0 as eos and pad and
`<|mask|>` = 1, apd_jax.text.tokenizer), drafter/ (a Dream-style bidirectional model trained as
a masked diffusion LM) and verifier/ (a causal Qwen2 trained on next-token prediction), saved in
the Hugging Face layout so they load as real checkpoints do; with both, APD runs on held-out
prompts (apd_jax.evaluation.evaluate.evaluate_apd). Settings: apd_jax.training.settings.

The drafter objective (Dream / LLaDA / MDLM): t ~ U(eps, 1) per sequence; every position but
the first is masked with probability t (with probability `suffix_prob` only after a clean prefix
of random length, as APD prompts the drafter); the loss is the masked positions' cross-entropy
weighted by 1/t, over the number of tokens, read through Dream's right shift.

Any chunk of steps is one jitted `fori_loop` over a token stream on the device; a step whose
batch does not fit the free memory runs in micro-batches whose gradients add up to the batch's.
All randomness derives from `seed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from apd_jax.text import corpus
from apd_jax.checkpoints import export_hf, model_params
from apd_jax.models.config import ModelConfig, parse_dtype
from apd_jax.training.settings import PipelineSettings, TrainSettings
from apd_jax.evaluation.evaluate import evaluate_apd
from apd_jax.utils.files import write_text_atomically
from apd_jax.models.model import Qwen2, init_model, shift_right
from apd_jax.text.tokenizer import (
    EOS_ID, SPECIAL_TOKENS, TOKENIZER_FILES, load_tokenizer_file, save_tokenizer, train_tokenizer,
)

# ----------------------------------------------------------------------------- objectives


def diffusion_mask(
    key: jax.Array, tokens: jax.Array, mask_id: int, *, eps: float = 1e-3, suffix_prob: float = 0.5
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dream's forward process: (noisy tokens, masked [B, L] bool, t [B]).

    t = eps + (1 - eps) * u, u ~ U(0, 1) per row; position 0 is never masked (it is
    the first prompt token at inference, and Dream's shifted output 0 predicts it from
    itself). With probability `suffix_prob` a row keeps a clean prefix [0, cut), cut
    uniform in [1, L - 1], and only positions >= cut may be masked. Each candidate
    position is then masked independently with probability t.
    """
    b, n = tokens.shape
    k_t, k_mask, k_mode, k_cut = jax.random.split(key, 4)
    t = eps + (1.0 - eps) * jax.random.uniform(k_t, (b,))
    suffix = jax.random.uniform(k_mode, (b,)) < suffix_prob
    cut = jax.random.randint(k_cut, (b,), 1, max(n, 2))
    first = jnp.where(suffix, cut, 1)
    masked = (jax.random.uniform(k_mask, (b, n)) < t[:, None]) & (jnp.arange(n)[None, :] >= first[:, None])
    return jnp.where(masked, mask_id, tokens), masked, t


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training loss in parts, so that a batch split into micro-batches computes the same loss.

    `noise` draws the randomness of the whole batch at once ({name: [B, ...]} per-row
    inputs); `sums` adds up per-row terms over any subset of rows, "loss" among them;
    the loss is the batch's summed "loss" divided by `denominator` of its [B, L] shape,
    and `metrics` makes the other sums into averages. Calling it is the whole loss.
    """

    noise: Callable[[jax.Array, jax.Array], dict]  # (key, tokens [B, L]) -> per-row inputs
    sums: Callable[[Qwen2, dict], dict]  # (model, some rows' inputs) -> {name: summed term}
    denominator: Callable[[tuple[int, ...]], int]
    metrics: Callable[[dict, tuple[int, ...]], dict]  # (the batch's sums, [B, L]) -> metrics

    def finish(self, sums: dict, shape: tuple[int, ...]) -> tuple[jax.Array, dict]:
        return sums["loss"] / self.denominator(shape), self.metrics(sums, shape)

    def __call__(self, model: Qwen2, tokens: jax.Array, key: jax.Array) -> tuple[jax.Array, dict]:
        return self.finish(self.sums(model, self.noise(key, tokens)), tokens.shape)


def _diffusion_sums(model: Qwen2, x: dict) -> dict:
    hidden, _ = model(x["noisy"])
    logits = model.logits(shift_right(hidden))  # [B, L, V]: position i's prediction at i
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x["tokens"])
    masked = x["masked"]
    hit = (jnp.argmax(logits, -1) == x["tokens"]) & masked
    return {"loss": jnp.sum(ce * masked / x["t"][:, None]), "masked_ce": jnp.sum(ce * masked),
            "hit": jnp.sum(hit), "masked": jnp.sum(masked)}


def _diffusion_metrics(sums: dict, shape: tuple[int, ...]) -> dict:
    n_masked = jnp.maximum(sums["masked"], 1)
    return {"masked_ce": sums["masked_ce"] / n_masked, "masked_acc": sums["hit"] / n_masked}


def diffusion_objective(mask_id: int, *, eps: float = 1e-3, suffix_prob: float = 0.5) -> Objective:
    """Masked-diffusion loss: sum over masked positions of CE / t, divided by B * L."""

    def noise(key: jax.Array, tokens: jax.Array) -> dict:
        noisy, masked, t = diffusion_mask(key, tokens, mask_id, eps=eps, suffix_prob=suffix_prob)
        return {"tokens": tokens, "noisy": noisy, "masked": masked, "t": t}

    return Objective(noise, _diffusion_sums, math.prod, _diffusion_metrics)


def diffusion_loss(
    model: Qwen2, tokens: jax.Array, key: jax.Array, *, eps: float = 1e-3, suffix_prob: float = 0.5
) -> tuple[jax.Array, dict]:
    """`diffusion_objective` of the model's mask token on one batch: (loss, metrics)."""
    return diffusion_objective(model.cfg.mask_token_id, eps=eps, suffix_prob=suffix_prob)(model, tokens, key)


def _ar_sums(model: Qwen2, x: dict) -> dict:
    tokens = x["tokens"]
    hidden, _ = model(tokens)
    logits = model.logits(hidden[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return {"loss": jnp.sum(ce), "correct": jnp.sum(jnp.argmax(logits, -1) == tokens[:, 1:])}


def _predicted_positions(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[1] - 1)


# Next-token cross-entropy (nats per token); no randomness.
AR_OBJECTIVE = Objective(
    noise=lambda key, tokens: {"tokens": tokens}, sums=_ar_sums, denominator=_predicted_positions,
    metrics=lambda sums, shape: {"acc": sums["correct"] / _predicted_positions(shape)},
)


def completion_metrics(model: Qwen2, tokens: jax.Array, cut: int, span: int = 8) -> dict:
    """The drafter as APD uses it: prefix [0, cut) clean, everything after masked.

    ce@1 is the cross-entropy of the first masked position (comparable to the
    verifier's next-token loss); ce@1-{span} averages the first `span` positions.
    """
    n = tokens.shape[1]
    noisy = jnp.where(jnp.arange(n)[None, :] >= cut, model.cfg.mask_token_id, tokens)
    hidden, _ = model(noisy)
    logits = model.logits(shift_right(hidden)[:, cut : cut + span])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, cut : cut + span])
    return {"ce@1": jnp.mean(ce[:, 0]), f"ce@1-{span}": jnp.mean(ce)}


# ----------------------------------------------------------------------------- training


def make_optimizer(s: TrainSettings) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW, linear warmup then cosine decay to min_lr_ratio * lr; decay on matrices only; clipping."""
    warmup = min(s.warmup, max(s.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, s.lr, warmup_steps=max(warmup, 1), decay_steps=max(s.steps, warmup + 1), end_value=s.lr * s.min_lr_ratio
    )
    return optax.chain(
        optax.clip_by_global_norm(s.clip),
        optax.adamw(schedule, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
    ), schedule


_tree_norm = getattr(optax.tree_utils, "tree_norm", None) or optax.tree_utils.tree_l2_norm


def sample_windows(stream: jax.Array, key: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """[batch, seq_len] windows of the token stream at uniformly random offsets."""
    starts = jax.random.randint(key, (batch,), 0, stream.shape[0] - seq_len + 1)
    return jax.vmap(lambda s: jax.lax.dynamic_slice(stream, (s,), (seq_len,)))(starts)


class MatmulEmbed(nnx.Module):
    """nnx.Embed's lookup as a one-hot matmul over the same parameter: identical values, and a
    gradient that is a deterministic matmul, not a GPU scatter-add of atomics on the hot rows
    (spaces, newlines), slow and nondeterministic (BENCHMARKS.md, Moved from docstrings)."""

    def __init__(self, embed: nnx.Embed):
        self.embedding = embed.embedding  # the same Param: tied heads still read it
        self.dtype = embed.dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...].astype(self.dtype)
        return jnp.matmul(jax.nn.one_hot(ids, table.shape[0], dtype=table.dtype), table)


def _dropped_out(branch: Callable, rate: float, key: jax.Array, x: jax.Array, *args: Any) -> Any:
    """branch(x, *args) with its output (the first item of a tuple: attention's) dropped out."""
    out = branch(x, *args)
    y = out[0] if isinstance(out, tuple) else out
    keep = jax.random.bernoulli(key, 1.0 - rate, y.shape)
    y = jnp.where(keep, y / (1.0 - rate), 0).astype(y.dtype)
    return (y, *out[1:]) if isinstance(out, tuple) else y


def for_training(model: Qwen2, dropout: float = 0.0, key: jax.Array | None = None) -> Qwen2:
    """The model with its embedding lookup done as a matmul (see MatmulEmbed); same parameters.

    With `dropout` > 0 and a `key`, every layer's attention and MLP output is also dropped
    out at that rate (residual dropout), with masks drawn from `key`; the model is then
    for one traced call only (the masks are fixed in it).
    """
    if not isinstance(model.embed_tokens, MatmulEmbed):
        model.embed_tokens = MatmulEmbed(model.embed_tokens)
    if dropout > 0 and key is not None:
        for i, layer in enumerate(model.layers):
            k_attn, k_mlp = jax.random.split(jax.random.fold_in(key, i))
            layer.self_attn = functools.partial(_dropped_out, layer.self_attn, dropout, k_attn)
            layer.mlp = functools.partial(_dropped_out, layer.mlp, dropout, k_mlp)
    return model


def objective_for(cfg: ModelConfig, s: TrainSettings) -> Objective:
    if cfg.causal:
        return AR_OBJECTIVE
    return diffusion_objective(cfg.mask_token_id, eps=s.eps, suffix_prob=s.suffix_prob)


def _print(*a: Any) -> None:
    print(*a, flush=True)


def free_memory() -> int | None:
    """Bytes a new program may use: an accelerator's free allocator memory, or the host's MemAvailable."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def memory_needed(compiled: Any) -> int | None:
    """Bytes one call of a compiled program holds at its peak (XLA's buffer assignment), if it says."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


# Share of the free memory a training step may plan to use: the process grows past XLA's buffer
# assignment (allocator, the held-out evaluation; BENCHMARKS.md, Moved from docstrings).
MEMORY_HEADROOM = 0.8


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def fit_micro_batches(compile_for: Callable[[int], Any], s: TrainSettings, free: int | None) -> tuple[int, Any, str]:
    """(micro-batches, compiled step program, what it needs): s.micro_batches, or else the
    fewest (a divisor of the batch) whose program fits MEMORY_HEADROOM of `free` bytes."""
    candidates = [s.micro_batches] if s.micro_batches else [d for d in range(1, s.batch_size + 1)
                                                            if s.batch_size % d == 0]
    for micro in candidates:
        compiled = compile_for(micro)
        need = memory_needed(compiled)
        if free is None or need is None or need <= MEMORY_HEADROOM * free:
            return micro, compiled, "memory unknown" if need is None else f"needs {_gib(need)}"
    rows = s.batch_size // micro
    fix = ("use --micro-batches 0 (the fewest that fit)" if s.micro_batches
           else "lower --seq-len or the model size, or use a machine with more memory")
    raise ValueError(f"a training step of {s.batch_size} x {s.seq_len} needs {_gib(need)} in micro-batches of "
                     f"{rows} row(s), more than {MEMORY_HEADROOM:.0%} of the {_gib(free)} free on "
                     f"{jax.devices()[0].platform}: {fix}")


def train_model(
    cfg: ModelConfig,
    train_stream: np.ndarray,
    heldout: np.ndarray,
    s: TrainSettings,
    *,
    log: Callable[..., None] = _print,
    name: str = "model",
) -> tuple[Qwen2, dict]:
    """Train one model from scratch; returns it and a history of train/held-out metrics.

    heldout: [N, seq_len] windows, evaluated every eval_every steps (at most eval_windows
    of them, noise from a fixed key so that successive evaluations are comparable).
    A log line follows the first step, then every log_every steps.
    """
    s.validate()
    if len(train_stream) < s.seq_len + 1:
        raise ValueError(f"the training stream has {len(train_stream)} tokens, fewer than seq_len {s.seq_len} + 1")
    objective = objective_for(cfg, s)
    tx, schedule = make_optimizer(s)
    base = jax.random.key(s.seed)
    init_seed, data_key, eval_key = jax.random.randint(jax.random.fold_in(base, 1), (3,), 0, 2**31 - 1).tolist()
    graphdef, params = nnx.split(init_model(cfg, seed=init_seed))
    opt_state = tx.init(params)
    stream = jnp.asarray(train_stream, jnp.int32)
    data_key, eval_key = jax.random.key(data_key), jax.random.key(eval_key)
    dropout_key = jax.random.fold_in(base, 2)  # apart from the others: dropout 0 draws what it always drew
    shape = (s.batch_size, s.seq_len)

    def part_loss(p, rows, k_drop):
        # The loss of some rows scaled as in the whole batch's, so that the parts' gradients add up to its.
        sums = objective.sums(for_training(nnx.merge(graphdef, p), s.dropout, k_drop), rows)
        return sums["loss"] / objective.denominator(shape), sums

    def loss_and_grads(params, inputs, k_drop, micro):
        grad_fn = jax.value_and_grad(part_loss, has_aux=True)
        if micro == 1:
            (_, sums), grads = grad_fn(params, inputs, k_drop)
        else:
            parts = jax.tree.map(lambda a: a.reshape(micro, -1, *a.shape[1:]), inputs)

            def add_part(total, part):
                j, rows = part  # each slice its own dropout masks
                (_, sums), grads = grad_fn(params, rows, jax.random.fold_in(k_drop, j))
                return jax.tree.map(jnp.add, total, (sums, grads)), None

            first = jax.tree.map(lambda a: a[0], parts)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(grad_fn, params, first, k_drop))
            (sums, grads), _ = jax.lax.scan(add_part, (zeros[0][1], zeros[1]), (jnp.arange(micro), parts))
        return objective.finish(sums, shape), grads

    def step(stream, micro, carry, i):
        params, opt_state = carry
        k_data, k_noise = jax.random.split(jax.random.fold_in(data_key, i))
        inputs = objective.noise(k_noise, sample_windows(stream, k_data, s.batch_size, s.seq_len))
        (loss, aux), grads = loss_and_grads(params, inputs, jax.random.fold_in(dropout_key, i), micro)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {"loss": loss, "grad_norm": _tree_norm(grads), **aux}

    @functools.partial(jax.jit, static_argnames=("micro",), donate_argnums=(0, 1))
    def run_steps(params, opt_state, first, n, stream, micro):
        # Steps first .. first + n - 1, n traced: one program for every chunk length. The
        # stream is an argument, not a closure constant baked into the program.
        one = functools.partial(step, stream, micro)

        def body(j, carry):
            state, total = carry
            state, metrics = one(state, first + j)
            return state, jax.tree.map(jnp.add, total, metrics)

        shapes = jax.eval_shape(one, (params, opt_state), first)[1]
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (params, opt_state), total = jax.lax.fori_loop(0, n, body, ((params, opt_state), zeros))
        return params, opt_state, jax.tree.map(lambda x: x / n, total)

    windows = np.asarray(heldout[: s.eval_windows], np.int32)
    cut = s.seq_len // 2

    @jax.jit
    def evaluate_batch(params, batch, key):
        model = for_training(nnx.merge(graphdef, params))
        loss, aux = objective(model, batch, key)
        out = {"loss": loss, **aux}
        if not cfg.causal:
            out |= completion_metrics(model, batch, cut)
        return out

    def evaluate(params) -> dict:
        if len(windows) == 0:
            return {}
        sums: dict[str, float] = {}
        for j in range(0, len(windows), s.eval_batch):
            part = windows[j : j + s.eval_batch]
            out = evaluate_batch(params, jnp.asarray(part), jax.random.fold_in(eval_key, j))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(part)
        return {k: v / len(windows) for k, v in sums.items()}

    platform = jax.devices()[0].platform
    log(f"[{name}] {cfg.param_count() / 1e6:.2f}M parameters, {len(train_stream) / 1e6:.2f}M training tokens, "
        f"{len(windows)} held-out windows of {s.seq_len}; {s.steps} steps of {s.batch_size} x {s.seq_len} "
        f"(~{s.steps * s.batch_size * s.seq_len / len(train_stream):.1f} epochs) on {platform}; compiling the step")
    t0 = time.perf_counter()
    free = free_memory()
    micro, run, need = fit_micro_batches(
        lambda m: run_steps.lower(params, opt_state, jnp.int32(0), jnp.int32(1), stream, micro=m).compile(), s, free)
    log(f"[{name}] step compiled in {time.perf_counter() - t0:.0f}s: batch {s.batch_size} in {micro} micro-batch(es) "
        f"of {s.batch_size // micro} rows, {need} of {'unknown' if free is None else _gib(free)} free on {platform}")
    history: dict[str, list] = {"micro_batches": micro, "train": [], "heldout": []}
    start = time.perf_counter()
    done = 0
    while done < s.steps:
        # Step 1 alone, so progress shows at once; then up to each multiple of log_every.
        n = 1 if done == 0 else min(s.log_every - done % s.log_every, s.steps - done)
        params, opt_state, metrics = run(params, opt_state, jnp.int32(done), jnp.int32(n), stream)
        done += n
        metrics = {k: float(v) for k, v in metrics.items()}
        elapsed = time.perf_counter() - start
        history["train"].append({"step": done, "time_s": round(elapsed, 1), **metrics})
        line = (f"[{name}] step {done:6d}  loss {metrics['loss']:.4f}  lr {float(schedule(done)):.2e}  "
                f"gnorm {metrics['grad_norm']:.2f}  {done * s.batch_size * s.seq_len / elapsed / 1e3:.1f}k tok/s  "
                f"{elapsed:.0f}s")
        if done % s.eval_every == 0 or done == s.steps:
            ev = evaluate(params)
            history["heldout"].append({"step": done, **ev})
            line += "  | held-out " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items())
        log(line)
    model = nnx.merge(graphdef, params)
    return model, history


# ----------------------------------------------------------------------------- saving


# Written into every directory `apd-jax train` makes (the tokenizer's too): its settings and corpus;
# train replaces a directory only when it holds this record (or is empty), never a user's files.
RECORD = "training.json"
EVAL_FILE = "apd_eval.json"  # OUT/apd_eval.json: the APD check on held-out prompts


def is_train_output(path: Path) -> bool:
    """Whether train may write `path`: absent, an empty directory, or a directory holding its RECORD."""
    if not (path.exists() or path.is_symlink()):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / RECORD).is_file() or not any(path.iterdir())


def _refuse_foreign(path: Path) -> None:
    if not is_train_output(path):
        raise FileExistsError(f"{path} exists and was not written by `apd-jax train` (it holds no {RECORD}); "
                              "train replaces only its own outputs: move it away or choose another --out")


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A new path beside `target` to write an output at, which replaces `target` (train's own output, or
    absent) when the body succeeds; when the body fails or is interrupted it is removed and `target` is
    left as it was."""
    _refuse_foreign(target)
    stage = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    old = stage.with_name(stage.name + ".old")
    try:
        yield stage
        if target.exists():
            target.rename(old)
        stage.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


_STORAGE = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def save_model(
    model: Qwen2, out_dir: str | Path, tokenizer_dir: str | Path, *, storage_dtype: str = "bfloat16",
    extra: dict | None = None,
) -> Path:
    """The model as a Hugging Face directory (config.json, generation_config.json,
    model.safetensors, tokenizer files), written through checkpoint.export_hf, and `extra`
    in its RECORD; it replaces `out_dir` only when that is train's own output."""
    if storage_dtype not in _STORAGE:
        raise ValueError(f"storage dtype {storage_dtype!r} must be one of {sorted(_STORAGE)}")
    config, generation = model.cfg.to_hf_dict(storage_dtype)
    params = {k: np.asarray(v, np.float32).astype(_STORAGE[storage_dtype]) for k, v in model_params(model).items()}
    out = Path(out_dir)
    with replacing(out) as stage, tempfile.TemporaryDirectory(prefix="apd_jax_stage_") as configs:
        configs = Path(configs)
        (configs / "config.json").write_text(json.dumps(config, indent=2))
        (configs / "generation_config.json").write_text(json.dumps(generation, indent=2))
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if not src.is_file():
                raise FileNotFoundError(f"{src} not found: the tokenizer must be saved before the model")
            shutil.copy2(src, configs / name)
        export_hf(params, configs, stage)
        (stage / RECORD).write_text(json.dumps(extra or {}, indent=2))
    return out


# ----------------------------------------------------------------------------- the whole pipeline


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return parse_dtype(name)


def trains_tokenizer(p: PipelineSettings) -> bool:
    """The tokenizer is trained when asked for or when OUT/tokenizer has none."""
    return p.retrain_tokenizer or p.which == "tokenizer" or not (Path(p.out) / "tokenizer" / "tokenizer.json").is_file()


def check_settings(p: PipelineSettings) -> None:
    """Before any work: the settings, and that every output this run writes is absent or train's own."""
    if p.which not in ("tokenizer", "drafter", "verifier", "both"):
        raise ValueError(f"--which {p.which!r} must be one of tokenizer, drafter, verifier, both")
    if p.stdlib_repeats < 1:
        raise ValueError(f"--stdlib-repeats {p.stdlib_repeats} must be >= 1")
    least_vocab = 256 + len(SPECIAL_TOKENS)  # train_tokenizer's bytes and special tokens
    if trains_tokenizer(p) and p.vocab_size < least_vocab:
        raise ValueError(f"--vocab-size {p.vocab_size} must be >= {least_vocab} (256 bytes + special tokens)")
    if p.eval_prompts > 0 and p.eval_max_new_tokens < 1:
        raise ValueError(f"--eval-max-new-tokens {p.eval_max_new_tokens} must be >= 1 (or --eval-prompts 0)")
    out = Path(p.out)
    models = [name for name in ("drafter", "verifier") if p.which in (name, "both")]
    for name in (["tokenizer"] if trains_tokenizer(p) else []) + models:
        _refuse_foreign(out / name)
    report = out / EVAL_FILE
    if p.eval_prompts > 0 and report.exists() and not _is_eval_report(report):
        raise FileExistsError(f"{report} exists and is not the APD check of `apd-jax train`: move it away, choose "
                              "another --out, or pass --eval-prompts 0")


def _is_eval_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"tokens_per_pass", "samples"} <= report.keys()


def run_pipeline(p: PipelineSettings, log: Callable[..., None] = _print) -> dict:
    """Tokenizer (if absent or asked for), then the drafter and/or the verifier, then APD acceptance."""
    check_settings(p)
    out = Path(p.out)
    t0 = time.perf_counter()
    train_docs, heldout_docs = corpus.load_corpus(p.stdlib, packages=p.packages,
                                                  heldout_fraction=p.heldout_fraction, max_files=p.max_files)
    root = p.stdlib or corpus.stdlib_root()
    from_packages = [d for d in train_docs if d.source == "packages"]
    from_stdlib = [d for d in train_docs if d.source == "stdlib"]
    info = {
        "corpus_root": str(root), "python": __import__("platform").python_version(),
        "packages": corpus.package_versions(p.packages), "package_files": len(from_packages),
        "package_chars": sum(len(d.text) for d in from_packages),
        "train_files": len(train_docs), "heldout_files": len(heldout_docs),
        "train_chars": sum(len(d.text) for d in train_docs), "fingerprint": corpus.fingerprint(train_docs),
    }
    log(f"corpus {root} (Python {info['python']}) and {len(p.packages)} packages: {len(train_docs)} train "
        f"({len(from_packages)} from packages) / {len(heldout_docs)} held-out files, "
        f"{info['train_chars'] / 1e6:.1f}M characters, fingerprint {info['fingerprint']} "
        f"({time.perf_counter() - t0:.1f}s)")
    seq_len = max(p.drafter_train.seq_len, p.verifier_train.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    if trains_tokenizer(p):
        tok = train_tokenizer([d.text for d in train_docs], p.vocab_size)
        with replacing(tok_dir) as stage:
            save_tokenizer(tok, stage, model_max_length=seq_len)
            (stage / RECORD).write_text(json.dumps({"vocab_size": p.vocab_size, "corpus": info}, indent=2))
        log(f"tokenizer: {tok.get_vocab_size()} tokens -> {tok_dir} ({time.perf_counter() - t0:.1f}s)")
    tok = load_tokenizer_file(tok_dir)
    report: dict = {"corpus": info, "tokenizer": str(tok_dir)}
    if p.which == "tokenizer":
        return report
    vocab = tok.get_vocab_size()
    stdlib_stream = corpus.token_stream(from_stdlib, tok, EOS_ID)
    package_stream = corpus.token_stream(from_packages, tok, EOS_ID)
    train_stream = np.concatenate([np.tile(stdlib_stream, p.stdlib_repeats), package_stream])
    heldout_stream = corpus.token_stream(heldout_docs, tok, EOS_ID)
    stdlib_tokens, unique = len(stdlib_stream), len(stdlib_stream) + len(package_stream)
    info |= {"train_tokens": int(unique), "stdlib_repeats": p.stdlib_repeats,
             "stream_tokens": int(len(train_stream)), "heldout_tokens": int(len(heldout_stream)),
             "chars_per_token": round(info["train_chars"] / max(unique, 1), 2)}
    log(f"tokens: {unique / 1e6:.2f}M train ({stdlib_tokens / 1e6:.2f}M stdlib, {p.stdlib_repeats}x in the stream of "
        f"{len(train_stream) / 1e6:.2f}M), {len(heldout_stream) / 1e3:.0f}k held-out "
        f"({info['chars_per_token']} characters per token; {time.perf_counter() - t0:.1f}s)")
    param_dtype, dtype = parse_dtype(p.param_dtype), compute_dtype(p.dtype)
    jobs = [("drafter", False, p.drafter, p.drafter_train), ("verifier", True, p.verifier, p.verifier_train)]
    for name, causal, size, settings in jobs:
        if p.which not in (name, "both"):
            continue
        cfg = size.config(causal=causal, vocab_size=vocab, max_len=seq_len, param_dtype=param_dtype, dtype=dtype)
        model, history = train_model(cfg, train_stream, corpus.chunk(heldout_stream, settings.seq_len), settings,
                                     log=log, name=name)
        extra = {"settings": dataclasses.asdict(settings), "size": dataclasses.asdict(size),
                 "parameters": cfg.param_count(), "param_dtype": p.param_dtype, "compute_dtype": jnp.dtype(dtype).name,
                 "device": jax.devices()[0].device_kind, "corpus": info, "history": history}
        path = save_model(model, out / name, tok_dir, storage_dtype=p.storage_dtype, extra=extra)
        size_mb = (path / "model.safetensors").stat().st_size / 1e6
        log(f"[{name}] saved {path} ({size_mb:.1f} MB; {time.perf_counter() - t0:.0f}s since start)")
        report[name] = {"path": str(path), "mb": round(size_mb, 2), "heldout": history["heldout"][-1:]}
    if p.eval_prompts > 0 and (out / "drafter").is_dir() and (out / "verifier").is_dir():
        prompts, max_new = corpus.apd_eval_prompts(heldout_docs, tok, p.eval_prompts, seq_len, p.eval_max_new_tokens)
        if not prompts:
            log("APD check skipped: no held-out prompt fits")
            log(f"done in {time.perf_counter() - t0:.0f}s")
            return report
        apd = evaluate_apd(out / "drafter", out / "verifier", prompts, max_new_tokens=max_new,
                           M=min(100, max_new))
        write_text_atomically(out / EVAL_FILE, json.dumps(apd, indent=2))
        log(f"APD R={apd['R']} W={apd['W']} M={apd['M']} greedy on {apd['prompts']} held-out prompts: "
            f"{apd['tokens_per_pass']:.2f} tokens/pass ({apd['tokens']} tokens, {apd['passes']} passes)")
        for sample in apd["samples"][:2]:
            log("---\n" + sample["prompt"] + sample["completion"][:400])
        report["apd"] = {k: v for k, v in apd.items() if k != "samples"}
    log(f"done in {time.perf_counter() - t0:.0f}s")
    return report
