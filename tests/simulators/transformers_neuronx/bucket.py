"""TNx's bucket rules: buckets are given as lists here (vLLM always passes lists)."""

from __future__ import annotations

import bisect


def as_buckets(name: str, value) -> list[int]:
    if not isinstance(value, list) or not value:
        raise TypeError(f"{name} must be a non-empty list of ints here, got {value!r}")
    if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in value):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return sorted(value)


def find(buckets: list[int], size: int) -> int:
    """The smallest bucket >= size; the largest one when size exceeds them all."""
    return buckets[bisect.bisect_left(buckets, size, hi=len(buckets) - 1)]
