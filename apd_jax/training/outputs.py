"""What `apd-jax train` writes, and that it replaces only what it wrote: each output directory (the
tokenizer, the drafter, the verifier) is staged beside its target and renamed into place whole,
and carries train's RECORD (its settings and corpus), without which an existing directory is a
user's and is never replaced. A model is saved in the Hugging Face layout, so that it loads as a
real checkpoint does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from apd_jax.checkpoints import export_hf, model_params
from apd_jax.models.model import Transformer
from apd_jax.text.tokenizer import TOKENIZER_FILES


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


def refuse_foreign(path: Path) -> None:
    """Raise unless train may write `path` (is_train_output), saying how to go on."""
    if not is_train_output(path):
        raise FileExistsError(f"{path} exists and was not written by `apd-jax train` (it holds no {RECORD}); "
                              "train replaces only its own outputs: move it away or choose another --out")


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A new path beside `target` to write an output at, which replaces `target` (train's own output, or
    absent) when the body succeeds; when the body fails or is interrupted it is removed and `target` is
    left as it was."""
    refuse_foreign(target)
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
    model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path, *, storage_dtype: str = "bfloat16",
    extra: dict | None = None,
) -> Path:
    """The model as a Hugging Face directory (config.json, generation_config.json,
    model.safetensors, tokenizer files), written through apd_jax.checkpoints.export_hf, and `extra`
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


def is_eval_report(path: Path) -> bool:
    """Whether `path` holds train's APD check (EVAL_FILE), which train may replace."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and {"tokens_per_pass", "samples"} <= report.keys()
