"""Checkpoints: Hugging Face safetensors <-> Flax parameters, and orbax save/restore.

The name mapping is one table (Flax path -> its HF tensors and their layout: fused
q/k/v and gate/up projections hold several HF tensors each). Import
streams one tensor at a time from the safetensors files (never a PyTorch model
in memory) and checks every tensor's name, shape and dtype against the model's
own abstract shapes. Outputs are written to a temporary directory and renamed
into place, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from apd_jax.config import ModelConfig
from apd_jax.model import Qwen2, abstract_model
from apd_jax.sharding import sharded_shapes

# Flax path -> (Hugging Face names, layout). "{i}" is the layer index. Layouts:
#   "same":  one tensor, stored as is;
#   "T":     one Linear weight, HF [out, in] -> Flax [in, out];
#   "qkv":   the q, k, v Linear weights (or, 1-D, their biases) -> [in, kv_heads, g + 2, head_dim]
#            (model.Attention: per KV head its g query heads, its key, its value);
#   "stack": the gate and up Linear weights -> [in, 2, intermediate] (model.MLP).
PARAM_TABLE: dict[str, tuple[tuple[str, ...], str]] = {
    "embed_tokens.embedding": (("model.embed_tokens.weight",), "same"),
    "layers.{i}.input_layernorm.weight": (("model.layers.{i}.input_layernorm.weight",), "same"),
    "layers.{i}.self_attn.qkv_proj.kernel": (
        tuple(f"model.layers.{{i}}.self_attn.{n}_proj.weight" for n in "qkv"), "qkv"
    ),
    "layers.{i}.self_attn.qkv_proj.bias": (tuple(f"model.layers.{{i}}.self_attn.{n}_proj.bias" for n in "qkv"), "qkv"),
    "layers.{i}.self_attn.o_proj.kernel": (("model.layers.{i}.self_attn.o_proj.weight",), "T"),
    "layers.{i}.post_attention_layernorm.weight": (("model.layers.{i}.post_attention_layernorm.weight",), "same"),
    "layers.{i}.mlp.gate_up_proj.kernel": (
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "stack"
    ),
    "layers.{i}.mlp.down_proj.kernel": (("model.layers.{i}.mlp.down_proj.weight",), "T"),
    "norm.weight": (("model.norm.weight",), "same"),
    "lm_head": (("lm_head.weight",), "T"),
}

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the model it claims to be."""


def _entry(path: str) -> tuple[tuple[str, ...], str]:
    """The Hugging Face names and layout of one Flax parameter (PARAM_TABLE, layer index filled in)."""
    parts = path.split(".")
    layer = parts[1] if parts[0] == "layers" else None
    template = ".".join(["layers", "{i}", *parts[2:]]) if layer is not None else path
    if template not in PARAM_TABLE:
        raise CheckpointError(f"Flax parameter {path!r} has no Hugging Face name in PARAM_TABLE")
    names, layout = PARAM_TABLE[template]
    return tuple(n.replace("{i}", layer or "") for n in names), layout


def _to_hf(layout: str, x: Any) -> list[Any]:
    """One Flax parameter as its Hugging Face tensors. Only slicing, reshapes and .T, so it
    serves numpy arrays and, under jax.eval_shape, abstract shapes alike."""
    if layout == "same":
        return [x]
    if layout == "T":
        return [x.T]
    if layout == "stack":
        return [x[:, j].T for j in range(x.shape[1])]
    g, lead = x.shape[-2] - 2, x.shape[:-3]  # "qkv": [..., kv_heads, g + 2, head_dim]
    return [part.reshape(*lead, -1).T for part in (x[..., :g, :], x[..., g, :], x[..., g + 1, :])]


def _to_flax(layout: str, tensors: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of _to_hf: Hugging Face tensors -> one Flax parameter of `shape`."""
    if layout == "same":
        return tensors[0]
    if layout == "T":
        return tensors[0].T
    if layout == "stack":
        return np.stack([t.T for t in tensors], axis=1)
    *lead, kvh, _, d = shape
    q, k, v = (t.T.reshape(*lead, kvh, -1, d) for t in tensors)
    return np.concatenate([q, k, v], axis=-2)


def expected_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat 'layers.0.mlp.down_proj.kernel' -> shape/dtype of every parameter, from the model itself."""
    _, state = nnx.split(abstract_model(cfg))
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of the model -> the shape config.json implies for it."""
    shapes = {}
    for path, want in expected_shapes(cfg).items():
        names, layout = _entry(path)
        parts = jax.eval_shape(lambda x, layout=layout: _to_hf(layout, x), want)
        shapes.update({name: tuple(part.shape) for name, part in zip(names, parts)})
    return shapes


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard files that are missing: {absent}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json with its shards "
        "(PyTorch .bin checkpoints are not read; re-save them with safe_serialization=True)"
    )


def iter_hf_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of a HF checkpoint directory, one at a time."""
    for file in _safetensors_files(Path(path)):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_params(path: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Read a HF checkpoint into flat Flax parameters (numpy), checking every tensor."""
    wanted = hf_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for name, array in iter_hf_tensors(path):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the head is the embedding; some exports store it anyway
        if name not in wanted:
            raise CheckpointError(f"unexpected tensor {name!r} in {path}: not a parameter of this {cfg.model_type} model")
        if name in tensors:
            raise CheckpointError(f"tensor {name!r} appears twice in {path}")
        if tuple(array.shape) != wanted[name]:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {tuple(array.shape)}, but config.json implies {wanted[name]}"
            )
        if array.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {array.dtype}")
        tensors[name] = array
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    params = {}
    for flax_path, want in expected_shapes(cfg).items():
        names, layout = _entry(flax_path)
        parts = [tensors.pop(name) for name in names]  # popped: each HF tensor is held only until used
        params[flax_path] = np.ascontiguousarray(_to_flax(layout, parts, want.shape), dtype=want.dtype)
    return params


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def model_from_params(cfg: ModelConfig, params: dict[str, Any]) -> Qwen2:
    """Build a model whose parameters are `params` (flat Flax paths), placed on the default device."""
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, _unflatten({k: jax.numpy.asarray(v) for k, v in params.items()}))
    return nnx.merge(graphdef, state)


def model_params(model: Qwen2) -> dict[str, np.ndarray]:
    """Flat Flax parameters of a model, as host numpy arrays."""
    _, state = nnx.split(model)
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


def load_hf(path: str | Path, *, param_dtype: Any = None, dtype: Any = None) -> Qwen2:
    """A Flax model from a Hugging Face checkpoint directory (config.json + safetensors)."""
    cfg = ModelConfig.from_dir(path, param_dtype=param_dtype, dtype=dtype)
    return model_from_params(cfg, load_hf_params(path, cfg))


def atomic_dir(out: Path, overwrite: bool):
    """A temporary sibling directory that replaces `out` only if the `with` body succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)

    class _Ctx:
        def __enter__(self) -> Path:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb) -> None:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            if out.exists():
                shutil.rmtree(out)
            self.tmp.rename(out)

    return _Ctx()


# Copied alongside the weights so a converted directory is self-contained.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json",
)


def _copy_configs(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def convert_hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """HF checkpoint directory -> out_dir/{config.json, params/ (orbax)}; dtypes as stored."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = ModelConfig.from_dir(hf_dir)
    params = load_hf_params(hf_dir, cfg)
    with atomic_dir(out_dir, overwrite) as tmp:
        _copy_configs(hf_dir, tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), _unflatten(params))
    return out_dir


def load_orbax(
    ckpt_dir: str | Path, *, param_dtype: Any = None, dtype: Any = None, mesh: Mesh | None = None
) -> Qwen2:
    """Restore a model saved by convert_hf_to_orbax (or save_orbax).

    Given a mesh, every device reads only its own shard of each parameter (apd_jax.sharding's
    rules): no full copy of the model lands on one device.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "params").is_dir():
        raise CheckpointError(f"{ckpt_dir} is not an apd_jax checkpoint: {ckpt_dir / 'params'} is missing")
    stored = ModelConfig.from_dir(ckpt_dir)
    shapes = expected_shapes(stored)
    target = _unflatten(shapes if mesh is None else sharded_shapes(shapes, stored, mesh))
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata((ckpt_dir / "params").absolute()).item_metadata
        saved = {".".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(metadata)[0]}
        if saved != set(shapes):
            raise CheckpointError(
                f"{ckpt_dir} does not hold this apd_jax's parameters: unexpected {sorted(saved - set(shapes))[:4]}, "
                f"missing {sorted(set(shapes) - saved)[:4]}. A checkpoint saved before the fused q/k/v and gate/up "
                "projections must be converted again from its Hugging Face directory (apd-jax convert hf-to-flax)"
            )
        restored = ckptr.restore((ckpt_dir / "params").absolute(), target)
    flat = {".".join(map(str, k)): v for k, v in _flatten(restored)}
    cfg = ModelConfig.from_dir(ckpt_dir, param_dtype=param_dtype, dtype=dtype)
    return model_from_params(cfg, {k: v.astype(cfg.param_dtype) for k, v in flat.items()})


def _flatten(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def save_orbax(model: Qwen2, out_dir: str | Path, hf_config: dict, *, overwrite: bool = False) -> Path:
    """Save a model's parameters with orbax beside its HF config.json."""
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp / "params").absolute(), _unflatten(model_params(model)))
    return Path(out_dir)


def export_hf(
    params: dict[str, np.ndarray], config_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Flat Flax parameters -> HF safetensors + config.json (copied from config_dir)."""
    config_dir = Path(config_dir)
    cfg = ModelConfig.from_dir(config_dir)
    expected = expected_shapes(cfg)
    if set(params) != set(expected):
        raise CheckpointError(
            f"parameters do not match {config_dir / 'config.json'}: "
            f"missing {sorted(set(expected) - set(params))[:8]}, unexpected {sorted(set(params) - set(expected))[:8]}"
        )
    tensors = {}
    for path, array in params.items():
        names, layout = _entry(path)
        tensors.update({name: np.ascontiguousarray(t) for name, t in zip(names, _to_hf(layout, array))})
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        _copy_configs(config_dir, tmp)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)


def convert_orbax_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """apd_jax orbax checkpoint -> HF directory, dtypes as stored."""
    return export_hf(model_params(load_orbax(ckpt_dir)), ckpt_dir, out_dir, overwrite=overwrite)


def load_model(path: str | Path, *, param_dtype: Any = None, dtype: Any = None) -> Qwen2:
    """An apd_jax (orbax) directory or a Hugging Face directory, whichever `path` is."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    if (path / "params").is_dir():
        return load_orbax(path, param_dtype=param_dtype, dtype=dtype)
    return load_hf(path, param_dtype=param_dtype, dtype=dtype)


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer saved beside a checkpoint."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json); copy the model's tokenizer files "
            "there, or pass token ids with --ids"
        )
    return AutoTokenizer.from_pretrained(path)
