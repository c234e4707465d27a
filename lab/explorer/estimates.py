"""How long a Run will take: the pace of cached runs, this kernel's recent slowdown, and words
for a duration. The explorer asks before a Run estimated to take longer than CONFIRM_SECONDS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..sweeps import (
    SweepPoint,
    SweepResult,
)
from .choices import RECENT_RUNS, SECONDS_PER_STEP


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _cached_pace(results: Sequence[SweepResult]) -> Callable[[SweepPoint], float]:
    """point -> seconds per step, from the median of comparable cached runs (see estimate)."""
    rates: dict[tuple, list[float]] = {}
    for r in results:
        if r.wall_seconds > 0 and r.point.steps > 0:
            key = (r.point.is_full, r.point.batch_size)
            rates.setdefault(key, []).append(r.wall_seconds / r.point.steps)
            rates.setdefault((*key, *_flavour_key(r.point)), []).append(
                r.wall_seconds / r.point.steps
            )

    def pace(p: SweepPoint) -> float:
        key = (p.is_full, p.batch_size)
        known = rates.get((*key, *_flavour_key(p))) or rates.get(key, [])
        return _median(known) if known else SECONDS_PER_STEP * p.batch_size / 64

    return pace


def slowdown(results: Sequence[SweepResult], recent: Sequence[SweepResult]) -> float | None:
    """How many times slower than the cached runs' pace the `recent` runs trained (pure).

    Each recent run's seconds per step over what the other cached runs predict for it; the
    median of the last RECENT_RUNS of them. None without a usable recent run.
    """
    mine = [r for r in recent[-RECENT_RUNS:] if r.wall_seconds > 0 and r.point.steps > 0]
    if not mine:
        return None
    mine_points = {r.point for r in recent}
    pace = _cached_pace([r for r in results if r.point not in mine_points])
    return _median([r.wall_seconds / r.point.steps / pace(r.point) for r in mine])


def estimate_seconds(
    points: Sequence[SweepPoint],
    results: Sequence[SweepResult],
    recent: Sequence[SweepResult] = (),
) -> float:
    """How long training `points` should take, from the cached runs' seconds per step (pure).

    Each point is estimated from cached runs of the same kind (LoRA or full fine-tuning), batch
    size and flavour (DoRA's step costs more; a 4-bit base trains one by one), else of the same
    kind and batch size: their median seconds per step times the point's steps. Without such
    runs, a laptop CPU's pace (SECONDS_PER_STEP) is assumed. Cached runs were often measured on
    another machine or a quieter afternoon: `recent` runs, trained here just now, scale the
    whole estimate by how much slower (or faster) they went than that pace (`slowdown`).
    """
    mine = {r.point for r in recent}
    pace = _cached_pace([r for r in results if r.point not in mine])
    factor = slowdown(results, recent) or 1.0
    return sum(pace(p) * factor * p.steps for p in points)


def _flavour_key(point: SweepPoint) -> tuple:
    return (point.variant, point.init, point.lr_ratio, point.quant)


def format_duration(seconds: float) -> str:
    """A rough duration: 'under a second', 'about 40 s', 'about 3 min', 'about 1.5 h'."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
