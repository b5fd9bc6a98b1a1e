"""Process-wide settings of an apd_jax run, applied before the JAX backend starts."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version


def runtime_defaults() -> None:
    """Environment defaults of an apd-jax process, set before the JAX backend starts (XLA reads
    its allocator settings then); a value the user set is kept.

    XLA_PYTHON_CLIENT_PREALLOCATE=false: by default XLA reserves 75 % of a GPU's memory with its
    first array, and that reservation alone holds gigabytes of host memory (BENCHMARKS.md); growing
    the pool as it is needed holds none. Set it to true to reserve up front.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def package_version() -> str | None:
    """apd_jax's installed version; None in a source checkout that is not pip-installed."""
    try:
        return version("apd_jax")
    except PackageNotFoundError:
        return None
