"""Plots of deployment: how long a forward takes with the adapter separate, merged or absent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .figures import (
    OKABE_ITO,
    _check_lengths,
    _empty,
    _figure,
    _label,
)

__all__ = [
    "timings",
]


def timings(
    labels: Sequence[str],
    seconds: Sequence[float],
    *,
    spreads: Sequence[tuple[float, float]] | None = None,
    title: str = "Inference time",
    unit: str = "ms",
) -> Figure:
    """Horizontal bars of times (given in seconds, shown in `unit`), values annotated.

    `spreads` gives each bar's (low, high) range in seconds, such as the quartiles of the
    timings (lab.analysis.spread) around their median: drawn as they are, so a skewed spread
    gets a longer whisker on its slow side.
    """
    scales = {"s": 1.0, "ms": 1e3, "µs": 1e6, "us": 1e6}
    if unit not in scales:
        raise ValueError(f"unit must be one of {sorted(scales)}, got {unit!r}")
    xlabel, ylabel = f"time per call ({unit})", "configuration"
    if spreads is not None and not hasattr(spreads, "__len__"):
        raise ValueError(f"spreads must be one (low, high) pair per label, got {spreads!r}")
    if spreads is None:
        _check_lengths(labels=labels, seconds=seconds)
    else:
        _check_lengths(labels=labels, seconds=seconds, spreads=spreads)
    if len(labels) == 0:
        return _empty(title, xlabel, ylabel)
    values = np.asarray(seconds, dtype=float) * scales[unit]
    err = None
    if spreads is not None:
        bounds = []
        for label, value, pair in zip(labels, seconds, spreads, strict=True):
            try:
                low, high = (float(v) for v in pair)
            except (TypeError, ValueError):  # not a pair of numbers
                low = high = math.nan
            if not (math.isfinite(low) and math.isfinite(high) and low <= value <= high):
                raise ValueError(
                    f"{label!r}: spread {pair!r} does not hold its time {value!r}: give "
                    "(low, high) seconds with low <= time <= high, such as the quartiles"
                )
            bounds.append((low, high))
        lows = np.array([low for low, _ in bounds]) * scales[unit]
        highs = np.array([high for _, high in bounds]) * scales[unit]
        err = np.vstack([values - lows, highs - values])  # whisker lengths below and above
    fig, ax = _figure((7.0, max(2.5, 1.2 + 0.45 * len(labels))))
    y = np.arange(len(labels))
    ax.barh(
        y,
        values,
        xerr=err,
        height=0.6,
        color=OKABE_ITO[0],
        edgecolor="black",
        linewidth=0.6,
        capsize=3,
    )
    reach = values if err is None else values + err[1]
    for yi, value, end in zip(y, values, reach, strict=True):
        ax.annotate(
            f"{value:.3g} {unit}",
            (end, yi),
            textcoords="offset points",
            xytext=(4, 0),
            va="center",
            fontsize=9,
        )
    finite = reach[np.isfinite(reach)]
    right = float(finite.max()) if finite.size else 0.0
    ax.set_xlim(0, right * 1.25 if right > 0 and math.isfinite(right) else 1)
    ax.set_yticks(y, [str(label) for label in labels])
    ax.invert_yaxis()  # first label on top, as read
    ax.grid(True, axis="x", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig
