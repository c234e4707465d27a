"""Tests for lab/plots/timing_plots.py: inference times with their spreads."""

from __future__ import annotations

import numpy as np
import pytest
from plot_probes import (
    main_axes,
    texts,
)

from lab import plots


def test_timings_bars_in_milliseconds_with_values_and_spreads():
    fig = plots.timings(
        ["base", "merged"], [0.002, 0.0025], spreads=[(0.0019, 0.0021), (0.0023, 0.0027)]
    )
    ax = main_axes(fig)
    assert ax.get_title() and "ms" in ax.get_xlabel() and ax.get_ylabel()
    assert [p.get_width() for p in ax.patches] == pytest.approx([2.0, 2.5])
    assert {"2 ms", "2.5 ms"} <= set(texts(fig))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "merged"]


def whisker_ends(ax) -> list[tuple[float, float]]:
    """(left, right) end of each bar's error bar, in the axis' unit."""
    from matplotlib.container import ErrorbarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    return [(float(seg[0][0]), float(seg[1][0])) for seg in segments]


def test_timings_whiskers_end_at_the_quartiles_of_skewed_timings():
    from lab.analysis import timing_summary

    # Skewed, as a busy machine makes them: a few slow calls far above the median.
    base = [0.0278, 0.030, 0.031, 0.033, 0.0387, 0.040, 0.045, 0.090, 0.095, 0.1017]
    merged = [0.020, 0.021, 0.021, 0.022, 0.022, 0.023, 0.024, 0.060]
    summary = {"base": timing_summary(base), "merged": timing_summary(merged)}
    fig = plots.timings(
        list(summary),
        [median for _, median, _ in summary.values()],
        spreads=[(low, high) for low, _, high in summary.values()],
    )
    ends = whisker_ends(main_axes(fig))
    expected = [(low * 1e3, high * 1e3) for low, _, high in summary.values()]
    assert np.ravel(ends) == pytest.approx(np.ravel(expected))
    low, median, high = summary["base"]
    assert high - median > 2 * (median - low)  # the slow side's whisker is the longer one


@pytest.mark.parametrize(
    "spread",
    [
        (0.003, 0.004),
        (0.001, 0.0015),
        (float("nan"), 0.004),
        (0.001, float("inf")),
        (0.001,),
        0.001,
        None,
        ("a", "b"),
    ],
)
def test_timings_refuses_a_spread_that_does_not_hold_its_time(spread):
    with pytest.raises(ValueError, match=r"'base': spread .* does not hold its time 0.002"):
        plots.timings(["base"], [0.002], spreads=[spread])
