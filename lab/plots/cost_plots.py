"""Plots of what training costs: trainable parameters and memory, by rank and by method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..memory import MIB
from .figures import (
    CATEGORIES,
    CATEGORY_STYLE,
    GB,
    GIB,
    REFERENCE_STYLE,
    _category_bytes,
    _check_lengths,
    _empty,
    _figure,
    _fmt_number,
    _label,
    _legend_outside,
    _rank_axis,
    _stacked_bars,
    _style,
    _total_bytes,
    _wrap,
)

__all__ = [
    "cost_comparison",
    "memory_breakdown",
    "memory_vs_rank",
    "trainable_vs_rank",
]


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
