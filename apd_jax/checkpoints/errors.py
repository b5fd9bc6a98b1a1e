"""CheckpointError, and a checkpoint's JSON files read so that a malformed one is such an error
naming the file (config.json, generation_config.json, the safetensors index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apd_jax.models.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


def _read_json(file: Path) -> dict:
    """A JSON object from `file`, or a CheckpointError naming the file and what is wrong."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}); restore it from the model's original files") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_config(path: str | Path, **kw: Any) -> ModelConfig:
    """ModelConfig.from_dir, with malformed JSON reported as a CheckpointError naming the file."""
    path = Path(path).expanduser()
    for name in ("config.json", "generation_config.json"):
        if (path / name).is_file():
            _read_json(path / name)
    return ModelConfig.from_dir(path, **kw)
