"""Training one model from scratch on a token stream (train_model): AdamW with warmup and cosine
decay, the model as trained (embedding lookup as a matmul, residual dropout), and each step's batch
fitted to the free memory.

Any chunk of steps is one jitted `fori_loop` over the token stream on the device; a step whose
batch does not fit the free memory runs in micro-batches whose gradients add up to the batch's
(the objectives are sums in parts, apd_jax.training.objectives). All randomness derives from the
settings' `seed`.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer, init_model
from apd_jax.training.objectives import completion_metrics, objective_for
from apd_jax.training.settings import TrainSettings


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


def for_training(model: Transformer, dropout: float = 0.0, key: jax.Array | None = None) -> Transformer:
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


def print_flushed(*a: Any) -> None:
    """The default log: each line flushed at once, so that a log file or a pipe shows progress as it comes."""
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
    log: Callable[..., None] = print_flushed,
    name: str = "model",
) -> tuple[Transformer, dict]:
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
        if cfg.is_diffusion:  # Dream or LLaDA: also the drafter as APD prompts it
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
