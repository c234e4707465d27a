"""Tests for lab/plots/spectra_plots.py: update size by rank, singular values, energy."""

from __future__ import annotations

import numpy as np
import pytest
from plot_probes import (
    assert_labelled,
    lines_with_data,
    main_axes,
)

from lab import plots


def test_update_size_vs_rank_is_log_log_one_line_per_rule():
    sizes = {"alpha/r": [1.0, 0.5, 0.25], "alpha/sqrt(r)": [1.0, 1.0, 1.0]}
    fig = plots.update_size_vs_rank([1, 4, 16], sizes)
    assert_labelled(fig, unit="Frobenius")
    ax = main_axes(fig)
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert len(ax.get_lines()) == 2
    assert list(ax.get_lines()[0].get_ydata()) == sizes["alpha/r"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]


def test_singular_values_keeps_the_top_values():
    spectra = {"full": list(np.linspace(10, 1, 50)), "LoRA": [3.0, 2.0, 1.0]}
    fig = plots.singular_values(spectra, top=8)
    assert_labelled(fig, unit="σ_i")
    ax = main_axes(fig)
    assert ax.get_yscale() == "log"
    assert [len(line.get_ydata()) for line in ax.get_lines()] == [8, 3]
    assert list(ax.get_lines()[0].get_xdata()) == list(range(1, 9))


def test_energy_captured_shows_percent_and_rejects_percent_input():
    fig = plots.energy_captured({"full": [0.5, 0.8, 0.95, 1.0], "LoRA": [0.7, 1.0, 1.0, 1.0]})
    assert_labelled(fig, unit="%")
    ax = main_axes(fig)
    assert len(lines_with_data(ax)) == 2
    assert list(lines_with_data(ax)[0].get_ydata()) == pytest.approx([50, 80, 95, 100])
    with pytest.raises(ValueError, match="fractions"):
        plots.energy_captured({"full": [50.0, 80.0]})


@pytest.mark.parametrize(
    ("values", "ticks"),
    [
        ([2.13, 1.47, 0.75, 0.26], ["0.3", "0.5", "1", "2"]),
        ([0.004, 0.01, 0.05, 0.3], ["0.005", "0.01", "0.02", "0.05", "0.1", "0.2"]),
        ([1.0, 1.02, 1.04, 1.05], ["0.5", "1", "2"]),
        ([1e-6, 1e-4, 1e-2, 1.0], ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1", "1"]),
    ],
)
def test_update_size_vs_rank_has_plain_y_ticks(values, ticks):
    fig = plots.update_size_vs_rank([1, 2, 4, 8], {"alpha/r": values})
    ax = main_axes(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == ticks
    assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))  # no 3×10⁻¹ clutter
