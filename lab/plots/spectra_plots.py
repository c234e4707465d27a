"""Plots of why low rank works: the update's size by rank, singular values, energy captured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .figures import (
    _check_lengths,
    _empty,
    _figure,
    _label,
    _legend_outside,
    _plain_log_ticks,
    _positive,
    _rank_axis,
    _style,
)

__all__ = [
    "energy_captured",
    "singular_values",
    "update_size_vs_rank",
]


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
