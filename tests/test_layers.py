"""apd_jax's packages import only downward (docs/architecture.md) and no module imports itself back
through others, function-level imports included (ast.walk sees every import statement)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "apd_jax"
# Lowest first: a module may import its own package and those before it.
LAYERS = ("utils", "text", "models", "checkpoints", "decoding", "evaluation", "training", "bench", "cli")


def _name(file: Path) -> str:
    """The module a file holds (a package's __init__.py holds the package)."""
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(file): file for file in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _imports(module: str) -> set[str]:
    """The apd_jax modules `module` imports: `from P import x` imports the module P.x where there is
    one, else P (its __init__); relative imports resolved. A module's parent packages, which Python
    runs before it, are not counted: a package's __init__ may import its own modules."""
    file = MODULES[module]
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:
                base = ".".join([package.rsplit(".", node.level - 1)[0]] + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycle through each back edge a depth-first search of `graph` meets, as the modules along
    it, first and last the same; none: the graph has no cycle."""
    cycles: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        path.append(module)
        for imported in sorted(graph[module]):
            if imported in path:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return cycles


def test_every_import_points_down_the_layers():
    upward = []
    for module in MODULES:
        own = _layer(module)
        if own is None:
            continue
        for imported in sorted(_imports(module)):
            layer = _layer(imported)
            if layer is not None and layer > own:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back():
    cycles = _cycles({module: _imports(module) for module in MODULES})
    assert not cycles, "import cycles (each module imports the next):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycles_are_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({**graph, "c": {"d"}}) == []
