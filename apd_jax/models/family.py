"""A model family described as data: its parameters (the Flax path of each, the Hugging Face
tensors it holds, their layout, its split over a device mesh), its config.json reader, checker and
writer, and its quirks (attention mask, logit shift, q/k/v bias, RoPE precision).

The converter (apd_jax.checkpoints), the sharding (sharding.py) and the model (model.py) read a
family only through this description; each family is one module (qwen2.py, llada.py) registered
in families.py. Also here: the checks of config.json fields the families' checkers share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jax.sharding import PartitionSpec as P

from apd_jax.models.layouts import Layout

MODEL = "model"  # the mesh axis of tensor parallelism (sharding.py)


@dataclasses.dataclass(frozen=True)
class Param:
    """One Flax parameter's Hugging Face tensors ("{i}" is the layer index) and layout, its
    PartitionSpec over the mesh (Flax kernels are [in, out]; P() is replicated) and the ModelConfig
    field the mesh's `model` axis must divide."""

    hf: tuple[str, ...]
    layout: Layout
    spec: P = P()
    split: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by name (its table is a dict)
class Family:
    """One family of checkpoints apd_jax runs with model.Qwen2's module.

    causal:       attention to earlier positions only (else bidirectional: a diffusion model);
    shift:        the prediction for position i is read at output i - 1 (Dream), not at i;
    qkv_bias:     the q, k and v projections have biases;
    rope_float32: queries and keys are rotated in float32 whatever the compute dtype;
    params:       Flax path ("{i}" is the layer index) -> its Param; the converter and the sharding
                  read only this table;
    problems:     config.json dict -> what keeps it from describing a model of this family;
    read:         a checked config.json dict -> ModelConfig's shape and numerics fields;
    write:        (ModelConfig, storage dtype name) -> (config.json, generation_config.json) dicts;
    vocabulary:   the tokenizer the family's checkpoints share (Qwen2.5 and Dream one, LLaDA its own).
    """

    name: str  # ModelConfig.model_type: config.json's model_type, lower-cased
    causal: bool
    shift: bool
    qkv_bias: bool
    rope_float32: bool
    params: Mapping[str, Param]
    problems: Callable[[dict], list[str]]
    read: Callable[[dict], dict[str, Any]]
    write: Callable[[Any, str], tuple[dict, dict]]
    vocabulary: str  # the tokenizer its checkpoints share: APD pairs a drafter and a verifier of one

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Family) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def param(self, path: str) -> Param:
        """The description of one Flax parameter (e.g. 'layers.3.mlp.down_proj.kernel'), layer index filled in."""
        parts = path.split(".")
        layer = parts[1] if parts[0] == "layers" and len(parts) > 1 else None
        template = ".".join(["layers", "{i}", *parts[2:]]) if layer is not None else path
        if template not in self.params:
            raise ValueError(f"parameter {path!r} is not in the {self.name} family's parameter table")
        entry = self.params[template]
        return dataclasses.replace(entry, hf=tuple(n.replace("{i}", layer or "") for n in entry.hf))

    def splits(self) -> tuple[str, ...]:
        """The ModelConfig fields the mesh's `model` axis must divide, each once."""
        return tuple(dict.fromkeys(p.split for p in self.params.values() if p.split))


# ----------------------------------------------------------------------------- shared config.json checks


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def field_problems(
    cfg: dict, *, required: Iterable[str] = (), ints: Iterable[str] = (), floats: Iterable[str] = (),
    bools: Iterable[str] = (),
) -> list[str]:
    """Each required field missing, each integer field not an integer >= 1, each float field not a
    finite number > 0, each bool field not true or false (a field that is absent or null is not checked)."""
    required = tuple(required)
    problems = [f"required field {name!r} is missing" for name in required if name not in cfg]
    for name in (*required, *ints):
        if cfg.get(name) is not None and not (is_int(cfg[name]) and cfg[name] >= 1):
            problems.append(f"{name} {cfg[name]!r} must be an integer >= 1")
    for name in floats:
        value = cfg.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            problems.append(f"{name} {value!r} must be a number > 0")
    for name in bools:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            problems.append(f"{name} {cfg[name]!r} must be true or false")
    return problems


def head_problems(hidden: int, heads: int, kv_heads: int, names: tuple[str, str, str]) -> list[str]:
    """Attention shapes that do not divide: hidden by heads, heads by KV heads (`names`: config.json's
    names of the three fields)."""
    problems = []
    if hidden % heads:
        problems.append(f"{names[0]} {hidden} is not a multiple of {names[1]} {heads}")
    if heads % kv_heads:
        problems.append(f"{names[1]} {heads} is not a multiple of {names[2]} {kv_heads}")
    return problems


def eos_field(cfg: Any) -> int | list[int] | None:
    """config.json's eos_token_id for a ModelConfig: one id, a list of them, or null."""
    return cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (list(cfg.eos_token_ids) or None)


def first_eos(cfg: Any) -> int | None:
    return cfg.eos_token_ids[0] if cfg.eos_token_ids else None
