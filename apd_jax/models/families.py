"""The registry of model families, keyed by config.json's model_type (lower-cased): a family is
added here and in a module of its own (family.py says what it describes)."""

from __future__ import annotations

from apd_jax.models.family import Family
from apd_jax.models.llada import LLADA
from apd_jax.models.qwen2 import DREAM, QWEN2

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2, DREAM, LLADA)}
