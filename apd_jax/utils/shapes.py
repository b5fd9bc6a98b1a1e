"""Fixed shapes for compiled programs: sizes rounded up so new inputs rarely recompile."""

from __future__ import annotations


def pow2_bucket(n: int, least: int = 16) -> int:
    """The smallest power of two >= n, and at least `least`: a padded length that few inputs share."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())
