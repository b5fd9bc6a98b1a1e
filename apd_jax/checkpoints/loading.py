"""Loading a checkpoint: an apd_jax (orbax) or a Hugging Face directory, whichever it is, streamed onto
the default device or into each device's shard of a mesh; and the tokenizer saved beside it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from apd_jax.checkpoints.errors import _read_json, read_config
from apd_jax.checkpoints.flat import _entry, expected_shapes, model_from_params
from apd_jax.checkpoints.orbax import load_orbax, stored_quantization
from apd_jax.checkpoints.safetensors import _checked_index, _hf_placement, _param_bytes
from apd_jax.checkpoints.streaming import (
    _converter, _device_arrays, _hf_sharding, _progress, _release_host_memory, _shardings,
)
from apd_jax.models.config import ModelConfig
from apd_jax.models.model import Transformer
from apd_jax.models.quantize import check_mode
from apd_jax.models.quantize import quantize as quantized

def load_hf_params(
    path: str | Path, cfg: ModelConfig, mesh: Mesh | None = None
) -> dict[str, jax.Array]:
    """A HF checkpoint's flat Flax parameters, streamed to the device (or `mesh`) in blocks."""
    path = Path(path).expanduser()
    tensors, place = _checked_index(path, cfg), _shardings(cfg, mesh)
    shapes = expected_shapes(cfg)
    entries = {p: _entry(cfg.family, p) for p in shapes}
    parts = _device_arrays(
        _hf_placement(name, tensors[name], _hf_sharding(layout, place(p), len(shapes[p].shape)))
        for p, (names, layout) in entries.items() for name in names)
    params = {}
    with contextlib.closing(parts), _progress(
            f"loading {path.name}", sum(_param_bytes(tensors, cfg.family, p) for p in shapes)) as advance:
        for p, want in shapes.items():
            names, layout = entries[p]
            hf = [next(parts) for _ in names]
            if layout.as_stored and hf[0].dtype == want.dtype:
                params[p] = hf[0]
            else:
                params[p] = _converter(layout, tuple(want.shape), want.dtype, place(p))(*hf)
            del hf  # freed on the device once converted
            _release_host_memory()
            advance(_param_bytes(tensors, cfg.family, p))
    return params


def load_hf(path: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None) -> Transformer:
    """A Flax model from a Hugging Face checkpoint directory (config.json + safetensors),
    streamed tensor by tensor onto the default device or, given a mesh, into each device's shard."""
    cfg = read_config(path, param_dtype=param_dtype, dtype=dtype)
    return model_from_params(cfg, load_hf_params(path, cfg, mesh))


def _directory_argument(function: str, path: Any) -> Path:
    """The checkpoint directory given to `function`, `~` expanded; not a str or Path: a TypeError naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{function}(path={path!r}): expected a checkpoint directory as a str or Path, "
                        f"not {type(path).__name__}")
    return Path(path).expanduser()


def load_model(
    path: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None,
    quantize: str | None = None,
) -> Transformer:
    """An apd_jax (orbax) directory or a Hugging Face directory, whichever `path` is, streamed onto
    the default device or into each device's shard of `mesh`.

    `quantize` ('int8', 'fp8' or 'fp8-weights': apd_jax.models.quantize) gives the model 8-bit
    weights once loaded, on one device. A checkpoint converted with --quantize loads quantized
    without it."""
    path = _directory_argument("load_model", path)
    if quantize is not None:
        check_mode(quantize)
        if mesh is not None:
            raise ValueError(f"load_model(quantize={quantize!r}): a quantized model runs on one device; "
                             "drop the mesh or quantize")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"load_model: {path} is a file; expected a checkpoint directory (a Hugging Face one: config.json and "
            "*.safetensors, or an apd_jax one: config.json and params/)"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    orbax = (path / "params").is_dir()
    stored = stored_quantization(path) if orbax else None
    if quantize is not None and stored not in (None, quantize):
        raise ValueError(f"{path} holds {stored} weights (converted with --quantize {stored}): load it without "
                         f"quantize, or quantize its unquantized checkpoint with {quantize!r}")
    if orbax:
        model = load_orbax(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh)
    else:
        model = load_hf(path, param_dtype=param_dtype, dtype=dtype, mesh=mesh)
    return model if quantize is None or stored is not None else quantized(model, quantize)


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved beside a checkpoint.

    transformers does not know Dream's model_type: AutoTokenizer then falls back to a generic config
    read with PretrainedConfig.from_pretrained, which warns on every run ("You are using a model of
    type `Dream` to instantiate a model of type ``"). The same generic config, built from the dict,
    is handed over instead: the same tokenizer, no warning."""
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = _directory_argument("load_tokenizer", path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); copy the model's tokenizer files "
            "there, or pass token ids with --ids"
        )
    config = None
    if (path / "config.json").is_file():
        fields = _read_json(path / "config.json")
        config = None if fields.get("model_type") in CONFIG_MAPPING else PretrainedConfig.from_dict(fields)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    # Its warning about a text longer than model_max_length, marked as given already: apd_jax checks every
    # prompt against the caches' capacity itself and names the prompt (generation.capacity).
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer
