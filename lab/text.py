"""Words and numbers for messages: counts with their noun, and byte sizes, written one way."""

from __future__ import annotations

import math

__all__ = ["format_bytes", "plural"]


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 point', '3 points', '1,200 points' (`many`: the plural when it is not word + 's')."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def format_bytes(n: float, decimal: bool = False) -> str:
    """A size in the unit that suits it.

    Binary units (memory): 512 -> '512 B', 12.3 * 2**20 -> '12.3 MiB'. With `decimal`, the
    1000s that file sizes are quoted in: '512 B', '33.8 KB', '75.5 MB', '350 GB'.
    """
    if decimal:
        if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(n) or n < 0:
            raise ValueError(f"n={n!r}: expected a finite number of bytes >= 0")
        if n < 1000:
            return f"{int(n)} B"
        for unit in ("KB", "MB", "GB", "TB", "PB"):
            n /= 1000
            if n < 999.95 or unit == "PB":
                return f"{n:,.1f} {unit}" if n < 100 else f"{n:,.0f} {unit}"
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")
