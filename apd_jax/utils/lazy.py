"""Packages whose public names are imported on first use (a PEP 562 module `__getattr__`), so that
importing the package stays cheap and a caller loads only the modules it uses."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, public: dict[str, tuple[str, ...]], namespace: dict[str, Any]
               ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(names, `__getattr__`, `__dir__`) for `package`, whose `public` maps module -> names it exports;
    a name looked up once is kept in the package's `namespace` (its globals())."""
    module_of = {name: module for module, names in public.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(namespace["__all__"])

    return list(module_of), __getattr__, __dir__
