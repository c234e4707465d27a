"""What every plot shares: palette and styles, an empty figure, labels, legend, PNG bytes."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

__all__ = [
    "CATEGORIES",
    "FIGSIZE",
    "NO_RESULTS",
    "savefig_bytes",
]


FIGSIZE = (7.0, 4.0)  # fits a 1280x800 screen next to JupyterLab's side bar
NO_RESULTS = "no results yet"
GIB = 2**30
GB = 1e9

# Okabe & Ito (2008): distinguishable with every common form of colour blindness.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

# Memory categories, bottom to top in stacked bars; other keys of a breakdown are ignored.
CATEGORIES = ("parameters", "gradients", "optimizer", "activations")
CATEGORY_STYLE = {
    "parameters": {"color": "#0072B2", "hatch": ""},
    "gradients": {"color": "#E69F00", "hatch": "//"},
    "optimizer": {"color": "#009E73", "hatch": ".."},
    "activations": {"color": "#CC79A7", "hatch": "xx"},
}
REFERENCE_STYLE = {"color": "#444444", "linestyle": "--", "linewidth": 1.2}


def _figure(figsize: tuple[float, float] = FIGSIZE) -> tuple[Figure, Axes]:
    """A new constrained-layout Figure with one Axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _label(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    """Set an Axes' title and axis labels."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def _empty(title: str, xlabel: str, ylabel: str) -> Figure:
    """A labelled Figure that says there is nothing to plot yet."""
    fig, ax = _figure()
    _label(ax, title, xlabel, ylabel)
    ax.text(
        0.5,
        0.5,
        NO_RESULTS,
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="0.4",
        fontsize=14,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _check_lengths(**named: Sequence[Any]) -> None:
    """Raise ValueError unless every named sequence has the same length."""
    lengths = {name: len(values) for name, values in named.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"lengths differ: {detail}; give one value per entry")


def _legend_outside(ax: Axes) -> None:
    """The Axes' legend to the right of the plot, where it cannot cover a curve, point or bar.

    Constrained layout shrinks the plot to make room, so the legend stays inside the Figure.
    """
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8)


def _style(i: int) -> dict[str, Any]:
    """Colour, line style and marker of the i-th series, distinct in colour and in grayscale."""
    return {
        "color": OKABE_ITO[i % 7],  # the yellow is kept for fills only: too light for lines
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
    }


def _category_bytes(breakdown: Mapping[str, int] | Any, category: str) -> int:
    """Bytes of one category, from a mapping or an object with that attribute (MemoryBreakdown)."""
    if isinstance(breakdown, Mapping):
        value = breakdown.get(category, 0)
    else:
        value = getattr(breakdown, category, 0)
    return int(value or 0)


def _total_bytes(breakdown: Mapping[str, int] | Any) -> int:
    """Sum of the plotted categories (other keys are ignored)."""
    return sum(_category_bytes(breakdown, c) for c in CATEGORIES)


def _fmt_number(x: float) -> str:
    """A tick label: integers without a decimal point, others in short form."""
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


def _rank_axis(ax: Axes, ranks: Sequence[int], axis: str = "x") -> None:
    """Log2 scale with a tick at each rank given, labelled with the plain number."""
    set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
    target = ax.xaxis if axis == "x" else ax.yaxis
    set_scale("log", base=2)
    ticks = sorted(set(ranks))
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FixedFormatter([_fmt_number(r) for r in ticks]))
    target.set_minor_locator(NullLocator())


def _plain_log_ticks(target: Any, values: Iterable[float]) -> None:
    """Ticks of a log axis at 1, 2, 5 x 10^k inside a range, labelled as plain numbers.

    Matplotlib's default on a range under one decade is minor ticks written 2×10⁻¹, 3×10⁻¹, ...
    crowded and hard to read; here they read 0.2, 0.5, 1, 2. Over more than 3 decades, only
    the powers of ten are kept (and 3 x 10^k is added under 1.5 decades).
    """
    arr = np.asarray([v for v in values if np.isfinite(v) and v > 0], dtype=float)
    if arr.size == 0:
        return
    lo, hi = float(arr.min()), float(arr.max())
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    decades = math.log10(hi / lo)
    steps = (1, 2, 3, 5) if decades <= 1.5 else (1, 2, 5) if decades <= 3 else (1,)
    candidates = sorted(m * 10.0**k for k in range(first, last + 1) for m in steps)
    ticks = [t for t in candidates if lo / 1.001 <= t <= hi * 1.001]
    if len(ticks) < 2:  # a narrow range: the nearest candidates either side too
        below = [t for t in candidates if t < lo / 1.001][-1:]
        above = [t for t in candidates if t > hi * 1.001][:1]
        ticks = below + ticks + above
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    target.set_minor_locator(NullLocator())


def _positive(values: Sequence[float]) -> np.ndarray:
    """As floats, with values a log axis cannot show (<= 0) replaced by nan."""
    arr = np.asarray(values, dtype=float)
    return np.where(arr > 0, arr, np.nan)


def _stacked_bars(ax: Axes, x: np.ndarray, breakdowns: Sequence[Any], scale: float) -> np.ndarray:
    """One stacked bar per breakdown at x, categories bottom to top; returns the totals."""
    bottom = np.zeros(len(x))
    for category in CATEGORIES:
        heights = np.array([_category_bytes(b, category) / scale for b in breakdowns])
        style = CATEGORY_STYLE[category]
        ax.bar(
            x,
            heights,
            bottom=bottom,
            width=0.6,
            label=category,
            color=style["color"],
            hatch=style["hatch"],
            edgecolor="black",
            linewidth=0.6,
        )
        bottom = bottom + heights
    return bottom


def _wrap(label: str, width: int = 16) -> str:
    """Break a long tick label over lines."""
    return "\n".join(textwrap.wrap(str(label), width, break_on_hyphens=False)) or str(label)


def savefig_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a Figure, for updating an ipywidgets Image without flicker."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
