"""Plots for the lab: pure functions, plain numbers in, a matplotlib Figure out.

Figures are built with `matplotlib.figure.Figure`, never pyplot, so a notebook shows each one
exactly once (as a cell's last expression, or through `display(fig)`) and a widget can redraw
without global state. Nothing here knows about torch or training.

Colours are the Okabe-Ito palette (safe for colour-blind readers) and every series also differs by
line style, marker or hatch, so the plots still read when printed in grayscale. A function given no
data returns a Figure that says "no results yet", so widgets can draw before anything is trained.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from .memory import MIB

__all__ = [
    "CATEGORIES",
    "NO_RESULTS",
    "accuracy_heatmap",
    "accuracy_vs_lr",
    "cost_comparison",
    "dropout_effect",
    "energy_captured",
    "learn_forget",
    "loss_curves",
    "memory_breakdown",
    "memory_vs_rank",
    "savefig_bytes",
    "singular_values",
    "timings",
    "trainable_vs_rank",
    "update_size_vs_rank",
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


# ---------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------- parameters and memory


def trainable_vs_rank(
    ranks: Sequence[int],
    trainable: Sequence[int],
    full: int | None = None,
    *,
    title: str = "Trainable parameters vs rank",
) -> Figure:
    """Trainable parameter count against LoRA rank (log scale), with full fine-tuning's count."""
    xlabel, ylabel = "rank r (log2 scale)", "trainable parameters (count, log scale)"
    _check_lengths(ranks=ranks, trainable=trainable)
    if len(ranks) == 0:
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    ax.plot(ranks, trainable, label="LoRA", **_style(0))
    for r, n in zip(ranks, trainable, strict=True):
        ax.annotate(
            f"{int(n):,}",
            (r, n),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_yscale("log")
    if all(r > 0 for r in ranks):
        _rank_axis(ax, ranks)
    counts = [n for n in trainable if n > 0]
    if full is not None:
        ax.axhline(full, label=f"full fine-tuning ({int(full):,})", **REFERENCE_STYLE)
        counts.append(full)
        _legend_outside(ax)
    if counts:  # room above the top label and below the bottom point
        ax.set_ylim(min(counts) / 3, max(counts) * 4)
    ax.grid(True, which="major", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def memory_vs_rank(
    ranks: Sequence[int],
    breakdowns: Sequence[Mapping[str, int]],
    full: Mapping[str, int] | None = None,
    *,
    title: str = "Memory of one training step vs rank",
) -> Figure:
    """Stacked bars of a training step's memory (MiB) by category, one per rank."""
    xlabel, ylabel = "rank r", "memory (MiB)"
    _check_lengths(ranks=ranks, breakdowns=breakdowns)
    if len(ranks) == 0:
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    x = np.arange(len(ranks))
    totals = _stacked_bars(ax, x, breakdowns, MIB)
    top = float(totals.max())
    if full is not None:
        full_mib = _total_bytes(full) / MIB
        ax.axhline(full_mib, label=f"full fine-tuning ({full_mib:,.1f} MiB)", **REFERENCE_STYLE)
        top = max(top, full_mib)
    ax.set_xticks(x, [_fmt_number(r) for r in ranks])
    ax.set_ylim(0, top * 1.1 if top > 0 else 1)
    _legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def memory_breakdown(
    breakdowns: Mapping[str, Mapping[str, int]],
    *,
    title: str = "Memory of one training step",
    unit: str = "MiB",
) -> Figure:
    """One stacked bar per label of a training step's memory by category, totals annotated."""
    scales = {"MiB": MIB, "GiB": GIB}
    if unit not in scales:
        raise ValueError(f"unit must be one of {sorted(scales)}, got {unit!r}")
    xlabel, ylabel = "configuration", f"memory ({unit})"
    if len(breakdowns) == 0:
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    labels = list(breakdowns)
    x = np.arange(len(labels))
    totals = _stacked_bars(ax, x, [breakdowns[k] for k in labels], scales[unit])
    for xi, total in zip(x, totals, strict=True):
        ax.annotate(
            f"{total:,.1f} {unit}",
            (xi, total),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=9,
        )
    top = float(totals.max())
    ax.set_ylim(0, top * 1.3 if top > 0 else 1)
    ax.set_xticks(x, [_wrap(k) for k in labels])
    _legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def cost_comparison(
    models: Sequence[str],
    breakdowns: Sequence[Mapping[str, int]],
    *,
    title: str = "What fine-tuning has to hold in memory",
    log: bool = True,
) -> Figure:
    """Memory (GB) by category per labelled model and method: grouped on log y, else stacked."""
    xlabel = "model and method"
    ylabel = "memory (GB, log scale)" if log else "memory (GB)"
    _check_lengths(models=models, breakdowns=breakdowns)
    if len(models) == 0:
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    x = np.arange(len(models))
    totals = np.array([_total_bytes(b) / GB for b in breakdowns])
    if log:
        # Stacked bars mislead on a log axis, so each category gets its own bar in the group
        # and a black bar marks the group's total.
        width = 0.8 / len(CATEGORIES)
        values = []
        for i, category in enumerate(CATEGORIES):
            heights = np.array([_category_bytes(b, category) / GB for b in breakdowns])
            values.extend(heights[heights > 0])
            style = CATEGORY_STYLE[category]
            ax.bar(
                x - 0.4 + (i + 0.5) * width,
                heights,
                width=width,
                label=category,
                color=style["color"],
                hatch=style["hatch"],
                edgecolor="black",
                linewidth=0.6,
            )
        ax.hlines(totals, x - 0.45, x + 0.45, color="black", linewidth=2.0, label="total")
        ax.set_yscale("log")
        values.extend(totals[totals > 0])
        if values:
            ax.set_ylim(min(values) / 3, max(values) * 6)
    else:
        _stacked_bars(ax, x, breakdowns, GB)
        top = float(totals.max())
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
    for xi, total in zip(x, totals, strict=True):
        text = f"{total:,.0f} GB" if total >= 10 else f"{total:.3g} GB"
        ax.annotate(
            text,
            (xi, total),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(x, [_wrap(m) for m in models], fontsize=8)
    _legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


# ---------------------------------------------------------------- training


def loss_curves(
    curves: Mapping[str, Sequence[float]],
    *,
    smooth: int = 1,
    title: str = "Training loss",
    log: bool = True,
) -> Figure:
    """Per-step training loss, one line per label, optionally averaged over `smooth` steps."""
    if smooth < 1:
        raise ValueError(f"smooth must be a window of at least 1 step, got {smooth}")
    xlabel = "training step"
    ylabel = "loss (nats/token, log scale)" if log else "loss (nats/token)"
    if smooth > 1:
        ylabel += f", moving average of {smooth}"  # shorter runs: half their length
    if not any(len(v) for v in curves.values()):
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    for i, (label, losses) in enumerate(curves.items()):
        y = np.asarray(losses, dtype=float)
        steps = np.arange(1, len(y) + 1)
        # A run no longer than the window would shrink to one point: average over half of it.
        window = min(smooth, max(1, len(y) // 2))
        if window > 1:  # the average of steps t-window+1..t, drawn at step t
            y = np.convolve(y, np.ones(window) / window, mode="valid")
            steps = steps[window - 1 :]
        style = _style(i) | {"marker": None}
        ax.plot(steps, y, label=str(label), linewidth=1.5, **style)
    if log:
        ax.set_yscale("log")
    if len(curves) > 1:
        _legend_outside(ax)
    ax.grid(True, which="both", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def accuracy_heatmap(
    ranks: Sequence[int],
    alphas: Sequence[float],
    accuracy: Sequence[Sequence[float]],
    *,
    title: str = "Held-out accuracy over rank and alpha",
) -> Figure:
    """Held-out exact-match accuracy (fractions in [0, 1], nan = not run) as a rank x alpha grid."""
    xlabel, ylabel = "alpha", "rank r"
    if len(ranks) == 0 or len(alphas) == 0:
        return _empty(title, xlabel, ylabel)
    grid = np.asarray(accuracy, dtype=float)
    if grid.shape != (len(ranks), len(alphas)):
        raise ValueError(
            f"accuracy has shape {grid.shape}, expected (len(ranks), len(alphas)) = "
            f"({len(ranks)}, {len(alphas)}): one row per rank, one column per alpha"
        )
    percent = np.ma.masked_invalid(grid * 100)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    fig, ax = _figure()
    image = ax.imshow(percent, cmap=cmap, vmin=0, vmax=100, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="held-out accuracy (%)")
    for row in range(grid.shape[0]):
        for col in range(grid.shape[1]):
            value = grid[row, col]
            if np.isnan(value):
                text, colour = "–", "black"
            else:
                r, g, b, _ = cmap(float(np.clip(value, 0, 1)))
                text = f"{value * 100:.0f}%"
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(col, row, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(len(alphas)), [_fmt_number(a) for a in alphas])
    ax.set_yticks(range(len(ranks)), [_fmt_number(r) for r in ranks])
    _label(ax, title, xlabel, ylabel)
    return fig


def dropout_effect(
    dropouts: Sequence[float],
    train_loss: Sequence[float],
    heldout_loss: Sequence[float],
    *,
    title: str = "Adapter dropout on a small data set",
) -> Figure:
    """Final train and held-out loss against adapter dropout, the gap between them shaded."""
    xlabel, ylabel = "adapter dropout p", "loss (nats/token)"
    _check_lengths(dropouts=dropouts, train_loss=train_loss, heldout_loss=heldout_loss)
    if len(dropouts) == 0:
        return _empty(title, xlabel, ylabel)
    order = np.argsort(np.asarray(dropouts, dtype=float), kind="stable")
    p = np.asarray(dropouts, dtype=float)[order]
    train = np.asarray(train_loss, dtype=float)[order]
    heldout = np.asarray(heldout_loss, dtype=float)[order]
    fig, ax = _figure()
    ax.fill_between(
        p,
        train,
        heldout,
        color=OKABE_ITO[7],
        alpha=0.35,
        hatch="//",
        edgecolor="0.5",
        linewidth=0,
        label="generalisation gap",
    )
    ax.plot(p, train, label="train loss", **_style(0))
    ax.plot(p, heldout, label="held-out loss", **_style(1))
    _legend_outside(ax)
    ax.grid(True, alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


# ---------------------------------------------------------------- why low rank works


def update_size_vs_rank(
    ranks: Sequence[int],
    sizes: Mapping[str, Sequence[float]],
    *,
    title: str = "Size of the LoRA update vs rank",
) -> Figure:
    """Frobenius norm of ΔW against rank on log-log axes, one line per scaling rule."""
    xlabel, ylabel = "rank r (log2 scale)", "‖ΔW‖ (Frobenius norm, log scale)"
    _check_lengths(**{"ranks": ranks, **{f"sizes[{k!r}]": v for k, v in sizes.items()}})
    if len(ranks) == 0 or len(sizes) == 0:
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    for i, (label, values) in enumerate(sizes.items()):
        ax.plot(ranks, _positive(values), label=str(label), **_style(i))
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis, ax.get_ylim())  # the drawn range, margins included
    if all(r > 0 for r in ranks):
        _rank_axis(ax, ranks)
    if len(sizes) > 1:
        _legend_outside(ax)
    ax.grid(True, which="major", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def singular_values(
    spectra: Mapping[str, Sequence[float]],
    *,
    top: int = 32,
    title: str = "Singular values of the weight update",
) -> Figure:
    """The first `top` singular values of each labelled matrix, largest first, on a log y axis."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    xlabel, ylabel = "index i", "singular value σ_i (log scale)"
    if not any(len(v) for v in spectra.values()):
        return _empty(title, xlabel, ylabel)
    fig, ax = _figure()
    for i, (label, values) in enumerate(spectra.items()):
        sigma = _positive(values)[:top]
        ax.plot(np.arange(1, len(sigma) + 1), sigma, label=str(label), markersize=4, **_style(i))
    ax.set_yscale("log")
    if len(spectra) > 1:
        _legend_outside(ax)
    ax.grid(True, which="major", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


def energy_captured(
    curves: Mapping[str, Sequence[float]],
    *,
    title: str = "How much of ΔW the top-r directions capture",
) -> Figure:
    """Cumulative fraction of ‖ΔW‖² (given in [0, 1], entry k-1 for r = k) shown in percent."""
    xlabel, ylabel = "r (number of top singular directions)", "fraction of ‖ΔW‖² captured (%)"
    if not any(len(v) for v in curves.values()):
        return _empty(title, xlabel, ylabel)
    for label, values in curves.items():
        arr = np.asarray(values, dtype=float)
        if np.any(arr[~np.isnan(arr)] > 1 + 1e-6):
            raise ValueError(
                f"curve {label!r} has values above 1 (max {np.nanmax(arr):g}): give fractions in "
                "[0, 1]; they are shown in percent"
            )
    fig, ax = _figure()
    longest = 0
    for i, (label, values) in enumerate(curves.items()):
        y = np.asarray(values, dtype=float) * 100
        longest = max(longest, len(y))
        style = _style(i) | {"marker": _style(i)["marker"] if len(y) <= 40 else None}
        ax.plot(np.arange(1, len(y) + 1), y, label=str(label), markersize=4, **style)
    for level in (90, 99):
        ax.axhline(level, color="0.5", linestyle=":", linewidth=1)
        ax.annotate(
            f"{level}%",
            (1, level),
            xycoords=("axes fraction", "data"),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="0.3",
        )
    ax.set_ylim(0, 102)
    ax.set_xlim(0.5, longest + 0.5)
    if len(curves) > 1:
        _legend_outside(ax)
    ax.grid(True, alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


# ---------------------------------------------------------------- learning rate and forgetting

DIVERGED_Y = -6.0  # where a diverged run's × sits: under the 0% line, inside the axes
FULL_STYLE = {"color": "#000000", "linestyle": "--", "marker": "s"}  # full fine-tuning's curve


def _best(curve: Sequence[tuple[float, float | None]]) -> tuple[float, float] | None:
    """The (lr, accuracy) of the best trained run of a curve (ties: the lower lr), or None."""
    trained = [(lr, acc) for lr, acc in curve if acc is not None and math.isfinite(acc)]
    return max(trained, key=lambda p: (p[1], -p[0])) if trained else None


def accuracy_vs_lr(
    curves: Mapping[str, Sequence[tuple[float, float | None]]],
    full: Sequence[tuple[float, float | None]] | None = None,
    *,
    title: str = "Held-out accuracy vs learning rate",
) -> Figure:
    """Held-out accuracy (%) against learning rate (log x), one curve per label.

    Each curve is (lr, accuracy in [0, 1]) pairs, accuracy None for a run that diverged: it is
    drawn as an × at the bottom, under the 0% line. A ring marks each curve's best lr and its
    legend entry names it ('r4 (best lr 0.01)'). `full` is full fine-tuning's curve, dashed.
    """
    xlabel, ylabel = "learning rate (log scale)", "held-out accuracy (%)"
    series = {str(k): list(v) for k, v in curves.items() if len(v)}
    if full:
        series["full fine-tuning"] = list(full)
    if not series:
        return _empty(title, xlabel, ylabel)
    for label, curve in series.items():
        for item in curve:
            if len(item) != 2 or not (isinstance(item[0], int | float) and item[0] > 0):
                raise ValueError(
                    f"curve {label!r} has {item!r}: give (lr > 0, accuracy in [0, 1] or None) pairs"
                )
            if item[1] is not None and not 0 <= item[1] <= 1:
                raise ValueError(
                    f"curve {label!r} has accuracy {item[1]!r} at lr {item[0]:g}: give fractions "
                    "in [0, 1] (None: diverged); they are shown in percent"
                )
    fig, ax = _figure()
    diverged_seen = False
    for i, (label, curve) in enumerate(series.items()):
        style = FULL_STYLE if full and label == "full fine-tuning" else _style(i)
        curve = sorted(curve, key=lambda p: p[0])
        lrs = np.array([lr for lr, _ in curve], dtype=float)
        acc = np.array([np.nan if a is None else a * 100 for _, a in curve], dtype=float)
        best = _best(curve)
        text = f"{label} (best lr {best[0]:g})" if best else f"{label} (every run diverged)"
        ax.plot(lrs, acc, label=text, linewidth=1.5, markersize=5, **style)
        if best:
            ax.plot(best[0], best[1] * 100, marker="o", markersize=13, markerfacecolor="none",
                    markeredgecolor=style["color"], markeredgewidth=1.6, linestyle="none",
                    zorder=4)  # fmt: skip
        bad = lrs[np.isnan(acc)]
        if bad.size:
            diverged_seen = True
            ax.plot(bad, np.full(bad.size, DIVERGED_Y), marker="x", markersize=9,
                    markeredgewidth=2, linestyle="none", color=style["color"])  # fmt: skip
    # Legend entries for the marks (drawn as empty lines, so a legend rebuilt from the Axes, as
    # the explorer's outside legend is, keeps them).
    ax.plot([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="0.3",
            linestyle="none", label="best lr of a curve")  # fmt: skip
    if diverged_seen:
        ax.plot([], [], marker="x", markersize=8, markeredgewidth=2, color="0.3",
                linestyle="none", label="diverged (loss nan/inf)")  # fmt: skip
    _legend_outside(ax)
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xscale("log")
    every = [lr for curve in series.values() for lr, _ in curve]
    distinct = sorted(set(every))
    if len(distinct) <= 9:  # a tick at each rate tried, written as typed: 0.0003, 0.001
        ax.xaxis.set_major_locator(FixedLocator(distinct))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{lr:g}" for lr in distinct]))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        _plain_log_ticks(ax.xaxis, every)
    lo, hi = min(every), max(every)
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.set_ylim(DIVERGED_Y * 1.8, 105)
    ax.grid(True, which="major", alpha=0.3)
    _label(ax, title, xlabel, ylabel)
    return fig


FORGET_MEASURES = {
    "accuracy": ("source_accuracy", "pretraining skills kept: accuracy (%, mean)"),
    "loss": ("source_loss", "pretraining skills kept: loss (nats/token, mean)"),
}


def learn_forget(
    runs: Sequence[Mapping[str, Any]],
    *,
    measure: str = "accuracy",
    base: float | None = None,
    by_replay: bool = False,
    log: bool = False,
    title: str = "What fine-tuning learned vs what it kept",
) -> Figure:
    """One marker per run: new-task held-out accuracy (x, %) against the pretraining skills.

    `runs` are rows as lab.practice.learn_forget makes them: "learned" (new-task accuracy in
    [0, 1]), "rank" (None: full fine-tuning), "replay" (fraction), and "source_accuracy" or
    "source_loss" (the mean over copy, reverse, sort, add), which `measure` picks. LoRA ranks
    differ in colour and marker, full fine-tuning is black squares, and replay runs are hollow.
    `base` draws the base model's own level (same unit as the measure) as a reference line.
    `by_replay` draws one panel per replay share, side by side on the same x and y ranges so
    that the panels compare; `log` puts the loss on a log scale.
    """
    if measure not in FORGET_MEASURES:
        raise ValueError(f"measure must be one of {sorted(FORGET_MEASURES)}, got {measure!r}")
    if log and measure != "loss":
        raise ValueError(f"log=True needs measure='loss' (an accuracy can be 0), got {measure!r}")
    key, ylabel = FORGET_MEASURES[measure]
    if log:
        ylabel = ylabel.replace(")", ", log scale)")
    xlabel = "new task: held-out accuracy (%)"
    scale = 100.0 if measure == "accuracy" else 1.0
    if len(runs) == 0:
        return _empty(title, xlabel, ylabel)
    for row in runs:
        missing = [k for k in ("learned", "rank", "replay", key) if k not in row]
        if missing:
            raise ValueError(
                f"a run lacks {', '.join(missing)}: give rows as lab.practice.learn_forget "
                f"makes them (keys learned, rank, replay, {key}), got {dict(row)!r:.120}"
            )
    if log:
        flat = [row for row in runs if not row[key] > 0]  # a log axis cannot show them
        if flat:
            raise ValueError(
                f"log=True cannot show a loss <= 0 (or nan): {flat[0][key]!r} in "
                f"{dict(flat[0])!r:.120}; give log=False"
            )
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in runs:
        kind = (row["rank"] is None, row["rank"] or 0, row["replay"] > 0)
        groups.setdefault(kind, []).append(row)
    ranks = sorted({rank for is_full, rank, _ in groups if not is_full})
    markers = [m for m in MARKERS if m != "s"]  # squares are full fine-tuning's
    shares = sorted({row["replay"] for row in runs}) if by_replay else [None]
    if by_replay:
        fig = Figure(figsize=(4.0 * len(shares) + 2.0, 4.0), layout="constrained")
        panels = list(np.atleast_1d(fig.subplots(1, len(shares), sharex=True, sharey=True)))
    else:
        fig, ax = _figure()
        panels = [ax]
    for ax, share in zip(panels, shares, strict=True):
        for is_full, rank, replayed in sorted(groups):
            rows = [r for r in groups[is_full, rank, replayed] if share in (None, r["replay"])]
            if not rows:
                continue
            if is_full:
                colour, marker, name = "#000000", "s", "full fine-tuning"
            else:
                i = ranks.index(rank)
                colour, marker = OKABE_ITO[i % 7], markers[i % len(markers)]
                name = f"LoRA r{rank}"
            if replayed:
                name += " + replay " + "/".join(
                    f"{s:.0%}" for s in sorted({r["replay"] for r in rows})
                )
            x = [row["learned"] * 100 for row in rows]
            y = [row[key] * scale for row in rows]
            ax.scatter(x, y, s=46, marker=marker, label=name, zorder=3, linewidths=1.4,
                       edgecolors=colour, facecolors="white" if replayed else colour)  # fmt: skip
        if base is not None:
            ax.axhline(base * scale, label="base model, before fine-tuning", **REFERENCE_STYLE)
        ax.set_xlim(-4, 104)
        if measure == "accuracy":
            ax.set_ylim(-4, 104)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(xlabel)
    panels[0].set_ylabel(ylabel)
    if by_replay:
        for ax, share in zip(panels, shares, strict=True):
            ax.set_title("no replay" if share == 0 else f"{share:.0%} replay")
        fig.suptitle(title)
        # One legend for all panels, outside them: every label once, in the panels' order.
        entries: dict[str, Any] = {}
        for ax in panels:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
        fig.legend(entries.values(), entries.keys(), loc="outside right center", fontsize=8)
    else:
        panels[0].set_title(title)
        _legend_outside(panels[0])
    return fig


# ---------------------------------------------------------------- deployment


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
