"""Plots of what practitioners learned: accuracy by learning rate, learning against forgetting."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

from .figures import (
    MARKERS,
    OKABE_ITO,
    REFERENCE_STYLE,
    _empty,
    _figure,
    _label,
    _legend_outside,
    _plain_log_ticks,
    _style,
)

__all__ = [
    "accuracy_vs_lr",
    "learn_forget",
]


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
