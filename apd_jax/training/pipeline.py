"""`apd-jax train`'s pipeline: a small APD pair trained from scratch on the Python standard library
(apd_jax.text.corpus), then checked with APD.

Three directories: tokenizer/ (byte-level BPE with `<|endoftext|>` = 0 as eos and pad and
`<|mask|>` = 1, apd_jax.text.tokenizer), drafter/ (a Dream-style bidirectional model trained as
a masked diffusion LM, apd_jax.training.objectives) and verifier/ (a causal Qwen2 trained on
next-token prediction), saved in the Hugging Face layout (apd_jax.training.outputs); with both,
APD runs on held-out prompts (apd_jax.evaluation.evaluate.evaluate_apd). The `llada` job instead
writes llada/: a small model in LLaDA's layout (a LLaDA checkpoint: config.json in OLMo's fields,
the same tokenizer) trained with the drafter's masked-diffusion objective, read without Dream's
shift, for LLaDA's block decoder (`apd-jax generate --decoder llada`). Settings:
apd_jax.training.settings.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apd_jax.evaluation.evaluate import evaluate_apd
from apd_jax.models.config import ModelConfig, ModelSize, parse_dtype
from apd_jax.models.llada import LLADA
from apd_jax.text import corpus
from apd_jax.text.tokenizer import EOS_ID, SPECIAL_TOKENS, load_tokenizer_file, save_tokenizer, train_tokenizer
from apd_jax.training.loop import print_flushed, train_model
from apd_jax.training.outputs import EVAL_FILE, RECORD, is_eval_report, refuse_foreign, replacing, save_model
from apd_jax.training.settings import JOBS, PipelineSettings, models_trained
from apd_jax.utils.files import write_text_atomically


def compute_dtype(name: str) -> Any:
    """The activation dtype --dtype names: "auto" is float32 on CPU and bfloat16 on an accelerator."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return parse_dtype(name)


def trains_tokenizer(p: PipelineSettings) -> bool:
    """The tokenizer is trained when asked for or when OUT/tokenizer has none."""
    return p.retrain_tokenizer or p.which == "tokenizer" or not (Path(p.out) / "tokenizer" / "tokenizer.json").is_file()


def check_settings(p: PipelineSettings) -> None:
    """Before any work: the settings, and that every output this run writes is absent or train's own."""
    if p.which not in JOBS:
        raise ValueError(f"--which {p.which!r} must be one of {', '.join(JOBS)}")
    if p.stdlib_repeats < 1:
        raise ValueError(f"--stdlib-repeats {p.stdlib_repeats} must be >= 1")
    least_vocab = 256 + len(SPECIAL_TOKENS)  # train_tokenizer's bytes and special tokens
    if trains_tokenizer(p) and p.vocab_size < least_vocab:
        raise ValueError(f"--vocab-size {p.vocab_size} must be >= {least_vocab} (256 bytes + special tokens)")
    if p.eval_prompts > 0 and p.eval_max_new_tokens < 1:
        raise ValueError(f"--eval-max-new-tokens {p.eval_max_new_tokens} must be >= 1 (or --eval-prompts 0)")
    out = Path(p.out)
    for name in (["tokenizer"] if trains_tokenizer(p) else []) + models_trained(p.which):
        refuse_foreign(out / name)
    report = out / EVAL_FILE
    if p.eval_prompts > 0 and report.exists() and not is_eval_report(report):
        raise FileExistsError(f"{report} exists and is not the APD check of `apd-jax train`: move it away, choose "
                              "another --out, or pass --eval-prompts 0")


def job_config(name: str, size: ModelSize, **kw: Any) -> ModelConfig:
    """The config a job trains: the verifier a causal Qwen2, the drafter a Dream model, llada a LLaDA
    model (bidirectional, untied head, no q/k/v bias, read without a shift), with the tokenizer's ids."""
    cfg = size.config(causal=name == "verifier", **kw)
    return cfg.replace(family=LLADA) if name == "llada" else cfg


def run_pipeline(p: PipelineSettings, log: Callable[..., None] = print_flushed) -> dict:
    """Tokenizer (if absent or asked for), then the drafter and/or the verifier and APD acceptance, or the
    LLaDA-shaped model."""
    check_settings(p)
    out = Path(p.out)
    t0 = time.perf_counter()
    train_docs, heldout_docs = corpus.load_corpus(p.stdlib, packages=p.packages,
                                                  heldout_fraction=p.heldout_fraction, max_files=p.max_files)
    root = p.stdlib or corpus.stdlib_root()
    from_packages = [d for d in train_docs if d.source == "packages"]
    from_stdlib = [d for d in train_docs if d.source == "stdlib"]
    info = {
        "corpus_root": str(root), "python": platform.python_version(),
        "packages": corpus.package_versions(p.packages), "package_files": len(from_packages),
        "package_chars": sum(len(d.text) for d in from_packages),
        "train_files": len(train_docs), "heldout_files": len(heldout_docs),
        "train_chars": sum(len(d.text) for d in train_docs), "fingerprint": corpus.fingerprint(train_docs),
    }
    log(f"corpus {root} (Python {info['python']}) and {len(p.packages)} packages: {len(train_docs)} train "
        f"({len(from_packages)} from packages) / {len(heldout_docs)} held-out files, "
        f"{info['train_chars'] / 1e6:.1f}M characters, fingerprint {info['fingerprint']} "
        f"({time.perf_counter() - t0:.1f}s)")
    seq_len = max(p.drafter_train.seq_len, p.verifier_train.seq_len)  # the pair's context
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
    jobs = {"drafter": (p.drafter, p.drafter_train), "verifier": (p.verifier, p.verifier_train),
            "llada": (p.llada, p.llada_train)}
    for name in models_trained(p.which):
        size, settings = jobs[name]
        max_len = settings.seq_len if name == "llada" else seq_len  # the LLaDA model's context is its window
        cfg = job_config(name, size, vocab_size=vocab, max_len=max_len, param_dtype=param_dtype, dtype=dtype)
        model, history = train_model(cfg, train_stream, corpus.chunk(heldout_stream, settings.seq_len), settings,
                                     log=log, name=name)
        extra = {"settings": dataclasses.asdict(settings), "size": dataclasses.asdict(size),
                 "parameters": cfg.param_count(), "param_dtype": p.param_dtype, "compute_dtype": jnp.dtype(dtype).name,
                 "device": jax.devices()[0].device_kind, "corpus": info, "history": history}
        path = save_model(model, out / name, tok_dir, storage_dtype=p.storage_dtype, extra=extra)
        size_mb = (path / "model.safetensors").stat().st_size / 1e6
        log(f"[{name}] saved {path} ({size_mb:.1f} MB; {time.perf_counter() - t0:.0f}s since start)")
        report[name] = {"path": str(path), "mb": round(size_mb, 2), "heldout": history["heldout"][-1:]}
    if p.which != "llada" and p.eval_prompts > 0 and (out / "drafter").is_dir() and (out / "verifier").is_dir():
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
