"""Plots of training runs: loss curves, accuracy over rank and alpha, dropout's effect."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .figures import (
    OKABE_ITO,
    _check_lengths,
    _empty,
    _figure,
    _fmt_number,
    _label,
    _legend_outside,
    _style,
)

__all__ = [
    "accuracy_heatmap",
    "dropout_effect",
    "loss_curves",
]


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
