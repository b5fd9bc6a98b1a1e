"""apd_jax's packages import only downward (docs/architecture.md), function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apd_jax"
# Lowest first: a module may import its own package and those before it.
LAYERS = ("utils", "text", "models", "checkpoints", "decoding", "evaluation", "training", "bench", "cli")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(file: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "apd_jax" else {node.module}
    return {m for m in found if m.startswith("apd_jax.")}


def test_every_import_points_down_the_layers():
    upward = []
    for file in sorted(PACKAGE.rglob("*.py")):
        module = "apd_jax." + ".".join(file.relative_to(PACKAGE).with_suffix("").parts)
        own = _layer(module)
        if own is None:
            continue
        for imported in sorted(_imports(file)):
            layer = _layer(imported)
            if layer is not None and layer > own:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)
