"""Tests for lab/plots/training_plots.py: loss curves, the accuracy heatmap, dropout's effect."""

from __future__ import annotations

import math

import numpy as np
import pytest
from plot_probes import (
    assert_labelled,
    main_axes,
    texts,
)

from lab import plots


def test_loss_curves_short_run_still_draws_a_curve():
    fig = plots.loss_curves({"LoRA": [4.0, 3.0, 2.5, 2.0, 1.8, 1.5]}, smooth=20, log=False)
    line = main_axes(fig).get_lines()[0]
    assert len(line.get_xdata()) == 4  # window clamped to 3 of 6 steps: 4 averaged points
    assert line.get_ydata()[0] == pytest.approx((4.0 + 3.0 + 2.5) / 3)


def test_loss_curves_one_line_per_label_and_smoothing():
    curves = {"LoRA": [3.0, 2.0, 1.0, 0.5], "full": [3.0, 1.0, 0.5, 0.25]}
    fig = plots.loss_curves(curves)
    assert_labelled(fig, unit="nats/token")
    ax = main_axes(fig)
    assert len(ax.get_lines()) == 2
    assert list(ax.get_lines()[0].get_ydata()) == curves["LoRA"]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "training step"

    smoothed = plots.loss_curves({"LoRA": [4.0, 2.0, 2.0, 0.0]}, smooth=2, log=False)
    line = main_axes(smoothed).get_lines()[0]
    assert list(line.get_ydata()) == pytest.approx([3.0, 2.0, 1.0])
    assert list(line.get_xdata()) == [2, 3, 4]
    assert main_axes(smoothed).get_legend() is None


def test_loss_curves_rejects_bad_window():
    with pytest.raises(ValueError, match="smooth"):
        plots.loss_curves({"a": [1.0]}, smooth=0)


def test_accuracy_heatmap_shows_the_grid_in_percent():
    grid = [[0.1, 0.875], [math.nan, 1.0]]
    fig = plots.accuracy_heatmap([4, 8], [8, 16.5], grid)
    assert_labelled(fig)
    ax = main_axes(fig)
    shown = ax.get_images()[0].get_array()
    assert np.ma.getmaskarray(shown).tolist() == [[False, False], [True, False]]
    assert shown.filled(np.nan) == pytest.approx(np.array(grid) * 100, nan_ok=True)
    assert ax.get_xlabel() == "alpha"
    assert ax.get_ylabel() == "rank r"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16.5"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["4", "8"]
    assert {"10%", "88%", "–", "100%"} <= set(texts(fig))
    assert "held-out accuracy (%)" in fig.axes[1].get_ylabel()


def test_accuracy_heatmap_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        plots.accuracy_heatmap([4, 8], [1, 2, 3], [[0.1, 0.2], [0.3, 0.4]])


def test_dropout_effect_draws_both_losses_and_the_gap():
    fig = plots.dropout_effect([0.0, 0.1, 0.3], [0.2, 0.3, 0.5], [0.9, 0.6, 0.7])
    assert_labelled(fig, unit="nats/token")
    ax = main_axes(fig)
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.2, 0.3, 0.5], [0.9, 0.6, 0.7]]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "generalisation gap" in legend
    assert ax.get_xlabel() == "adapter dropout p"
