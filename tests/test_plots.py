"""Tests for lab/plots.py: each plot returns a labelled Figure that really shows the data."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lab import plots  # noqa: E402

MIB = 2**20


def breakdown(parameters: int, gradients: int, optimizer: int, activations: int) -> dict[str, int]:
    """A memory breakdown with an extra key that the plots must ignore."""
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "other": 123_456_789,
    }


FULL = breakdown(4 * MIB, 4 * MIB, 8 * MIB, 6 * MIB)
LORA = breakdown(4 * MIB, MIB // 4, MIB // 2, 6 * MIB)


def main_axes(fig: Figure):
    """The first Axes: the plot itself (a colorbar, if any, comes after)."""
    return fig.axes[0]


def texts(fig: Figure) -> list[str]:
    """Every text drawn on any Axes of the figure."""
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def assert_labelled(fig: Figure, unit: str | None = None) -> None:
    """A Figure with a title, both axis labels and, when given, the unit in the y label."""
    assert isinstance(fig, Figure)
    ax = main_axes(fig)
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()
    if unit is not None:
        assert unit in ax.get_ylabel()


def bar_heights(ax) -> list[float]:
    """Heights of the bars drawn on an Axes, in drawing order."""
    return [patch.get_height() for patch in ax.patches]


def lines_with_data(ax) -> list:
    """Lines that plot data (not axhline references)."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 2]


# ---------------------------------------------------------------- trainable_vs_rank


def test_trainable_vs_rank_annotates_exact_counts_and_full_line():
    fig = plots.trainable_vs_rank([1, 4, 8], [1024, 4096, 8192], full=415_232)
    assert_labelled(fig, unit="count")
    ax = main_axes(fig)
    assert ax.get_yscale() == "log"
    assert list(ax.get_lines()[0].get_ydata()) == [1024, 4096, 8192]
    assert {"1,024", "4,096", "8,192"} <= set(texts(fig))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "full fine-tuning (415,232)" in legend
    assert ax.get_lines()[1].get_ydata()[0] == 415_232


def test_trainable_vs_rank_without_full_has_one_line():
    fig = plots.trainable_vs_rank([2, 4], [10, 20])
    assert len(main_axes(fig).get_lines()) == 1


# ---------------------------------------------------------------- memory


def test_memory_vs_rank_bars_are_categories_in_mib_with_full_total():
    fig = plots.memory_vs_rank([4, 8], [LORA, LORA], full=FULL)
    assert_labelled(fig, unit="MiB")
    ax = main_axes(fig)
    # Bars are drawn category by category: parameters for both ranks, then gradients, ...
    expected = [LORA[c] / MIB for c in plots.CATEGORIES for _ in range(2)]
    assert bar_heights(ax) == pytest.approx(expected)
    full_total = sum(FULL[c] for c in plots.CATEGORIES) / MIB
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx(full_total)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "8"]


def test_memory_breakdown_annotates_totals_and_converts_to_gib():
    fig = plots.memory_breakdown({"full fine-tuning": FULL, "LoRA r=8": LORA})
    assert_labelled(fig, unit="MiB")
    lora_total = sum(LORA[c] for c in plots.CATEGORIES) / MIB
    assert f"{lora_total:,.1f} MiB" in texts(fig)
    assert len(main_axes(fig).patches) == 2 * len(plots.CATEGORIES)

    fig = plots.memory_breakdown({"full": FULL}, unit="GiB")
    assert "GiB" in main_axes(fig).get_ylabel()
    assert bar_heights(main_axes(fig))[0] == pytest.approx(FULL["parameters"] / 2**30)


def test_memory_breakdown_rejects_unknown_unit():
    with pytest.raises(ValueError, match="unit"):
        plots.memory_breakdown({"full": FULL}, unit="MB")


def test_memory_breakdown_accepts_objects_with_category_attributes():
    class Breakdown:
        parameters, gradients, optimizer, activations = MIB, 2 * MIB, 3 * MIB, 4 * MIB

    fig = plots.memory_breakdown({"measured": Breakdown()})
    assert bar_heights(main_axes(fig)) == pytest.approx([1, 2, 3, 4])


@pytest.mark.parametrize("log", [True, False])
def test_cost_comparison_shows_gigabytes(log):
    models = ["GPT-3 full", "GPT-3 LoRA r=4"]
    big = {k: v * 10_000 for k, v in FULL.items()}
    fig = plots.cost_comparison(models, [big, LORA], log=log)
    assert_labelled(fig, unit="GB")
    ax = main_axes(fig)
    assert ax.get_yscale() == ("log" if log else "linear")
    heights = bar_heights(ax)
    assert len(heights) == len(models) * len(plots.CATEGORIES)
    # Both layouts draw one category at a time across the models, in CATEGORIES order.
    expected = [b[c] / 1e9 for c in plots.CATEGORIES for b in (big, LORA)]
    assert heights == pytest.approx(expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GPT-3 full", "GPT-3 LoRA r=4"]


# ---------------------------------------------------------------- training


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


# ---------------------------------------------------------------- why low rank works


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


# ---------------------------------------------------------------- deployment


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


# ---------------------------------------------------------------- shared behaviour

MISMATCHED = {
    "trainable_vs_rank": lambda: plots.trainable_vs_rank([1, 2, 4], [1, 2]),
    "memory_vs_rank": lambda: plots.memory_vs_rank([1, 2], [LORA]),
    "cost_comparison": lambda: plots.cost_comparison(["a", "b"], [FULL]),
    "dropout_effect": lambda: plots.dropout_effect([0.0, 0.1], [1.0, 2.0], [1.0]),
    "update_size_vs_rank": lambda: plots.update_size_vs_rank([1, 2], {"alpha/r": [1.0]}),
    "timings": lambda: plots.timings(["a"], [1.0, 2.0]),
    "timings_spreads": lambda: plots.timings(["a"], [1.0], spreads=[(0.5, 1.5), (1, 2)]),
}


@pytest.mark.parametrize("call", MISMATCHED.values(), ids=MISMATCHED.keys())
def test_mismatched_lengths_raise_naming_the_lengths(call):
    with pytest.raises(ValueError, match=r"has \d+.*has \d+"):
        call()


EMPTY = {
    "trainable_vs_rank": lambda: plots.trainable_vs_rank([], [], full=100),
    "memory_vs_rank": lambda: plots.memory_vs_rank([], []),
    "memory_breakdown": lambda: plots.memory_breakdown({}),
    "cost_comparison": lambda: plots.cost_comparison([], []),
    "loss_curves": lambda: plots.loss_curves({}),
    "loss_curves_empty_series": lambda: plots.loss_curves({"LoRA": []}),
    "accuracy_heatmap": lambda: plots.accuracy_heatmap([], [], []),
    "dropout_effect": lambda: plots.dropout_effect([], [], []),
    "update_size_vs_rank": lambda: plots.update_size_vs_rank([], {}),
    "singular_values": lambda: plots.singular_values({}),
    "energy_captured": lambda: plots.energy_captured({}),
    "timings": lambda: plots.timings([], []),
}


@pytest.mark.parametrize("call", EMPTY.values(), ids=EMPTY.keys())
def test_empty_input_says_no_results_yet(call):
    fig = call()
    assert_labelled(fig)
    assert plots.NO_RESULTS in texts(fig)


def test_savefig_bytes_is_png():
    fig = plots.trainable_vs_rank([1, 2], [10, 20])
    assert plots.savefig_bytes(fig, dpi=30).startswith(b"\x89PNG\r\n\x1a\n")


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


# ---------------------------------------------------------------- learning rate and forgetting

LR_CURVES = {
    "r1": [(1e-3, 0.2), (1e-2, 0.5), (1e-1, None)],
    "r4": [(1e-2, 0.9), (1e-3, 0.4), (3e-2, 0.9)],  # unsorted; a tie: the lower lr is best
}
FULL_LR_CURVE = [(1e-4, 0.7), (1e-3, 0.95), (1e-2, None)]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_accuracy_vs_lr_is_log_x_in_percent_and_names_each_best_lr():
    fig = plots.accuracy_vs_lr(LR_CURVES, FULL_LR_CURVE, title="Accuracy vs lr (α/r)")
    assert_labelled(fig, unit="%")
    ax = main_axes(fig)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate (log scale)"
    assert ax.get_title() == "Accuracy vs lr (α/r)"
    legend = legend_texts(ax)
    assert "r1 (best lr 0.01)" in legend and "r4 (best lr 0.01)" in legend
    assert "full fine-tuning (best lr 0.001)" in legend
    assert "best lr of a curve" in legend and "diverged (loss nan/inf)" in legend
    curves = {line.get_label(): line for line in ax.get_lines()}
    r4 = curves["r4 (best lr 0.01)"]
    assert list(r4.get_xdata()) == [1e-3, 1e-2, 3e-2]  # sorted by lr
    assert list(r4.get_ydata()) == pytest.approx([40, 90, 90])
    assert curves["full fine-tuning (best lr 0.001)"].get_linestyle() == "--"
    rings = [ln for ln in ax.get_lines() if ln.get_marker() == "o" and ln.get_markersize() == 13]
    assert sorted((float(r.get_xdata()[0]), float(r.get_ydata()[0])) for r in rings) == [
        (1e-3, pytest.approx(95)), (1e-2, pytest.approx(50)), (1e-2, pytest.approx(90)),
    ]  # fmt: skip
    crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x" and len(ln.get_xdata())]
    assert sorted(float(x) for ln in crosses for x in ln.get_xdata()) == [1e-2, 1e-1]
    assert all(y < 0 for ln in crosses for y in ln.get_ydata())  # at the bottom, under 0%
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["0.0001", "0.001", "0.01", "0.03", "0.1"]


def test_accuracy_vs_lr_without_divergence_has_no_diverged_entry_and_refuses_percent():
    fig = plots.accuracy_vs_lr({"r8": [(1e-3, 0.5), (1e-2, 0.6)]})
    assert "diverged (loss nan/inf)" not in legend_texts(main_axes(fig))
    assert "full fine-tuning" not in " ".join(legend_texts(main_axes(fig)))
    with pytest.raises(ValueError, match=r"curve 'r8' has accuracy 60 at lr 0.01: give fractions"):
        plots.accuracy_vs_lr({"r8": [(1e-2, 60)]})
    with pytest.raises(ValueError, match=r"curve 'r8' has \(0, 0.5\): give \(lr > 0"):
        plots.accuracy_vs_lr({"r8": [(0, 0.5)]})
    every = plots.accuracy_vs_lr({"r8": [(1e-1, None)]})
    assert legend_texts(main_axes(every))[0] == "r8 (every run diverged)"


RUNS = [
    {"learned": 0.5, "rank": 4, "replay": 0.0, "source_accuracy": 0.3, "source_loss": 2.0},
    {"learned": 0.7, "rank": 4, "replay": 0.05, "source_accuracy": 0.8, "source_loss": 1.0},
    {"learned": 0.8, "rank": 16, "replay": 0.0, "source_accuracy": 0.2, "source_loss": 3.0},
    {"learned": 0.9, "rank": None, "replay": 0.0, "source_accuracy": 0.05, "source_loss": 5.0},
    {"learned": 0.95, "rank": None, "replay": 0.05, "source_accuracy": 0.6, "source_loss": 1.5},
]


def test_learn_forget_marks_ranks_full_and_replay_apart():
    fig = plots.learn_forget(RUNS, base=0.98, title="Learned vs kept (α/r)")
    assert_labelled(fig, unit="%")
    ax = main_axes(fig)
    assert ax.get_xlabel() == "new task: held-out accuracy (%)"
    assert "pretraining skills" in ax.get_ylabel() and "mean" in ax.get_ylabel()
    legend = legend_texts(ax)
    assert legend == [
        "LoRA r4", "LoRA r4 + replay 5%", "LoRA r16", "full fine-tuning",
        "full fine-tuning + replay 5%", "base model, before fine-tuning",
    ]  # fmt: skip
    by_label = dict(zip(legend, ax.collections, strict=False))
    assert by_label["LoRA r4"].get_offsets().tolist() == [[50.0, 30.0]]
    assert by_label["full fine-tuning + replay 5%"].get_offsets().tolist() == [[95.0, 60.0]]
    hollow = matplotlib.colors.to_rgba("white")
    for label, points in by_label.items():
        assert (tuple(points.get_facecolor()[0]) == hollow) == ("replay" in label), label
    full = by_label["full fine-tuning"]
    assert tuple(full.get_facecolor()[0]) == matplotlib.colors.to_rgba("black")
    markers = {label: c.get_paths()[0].vertices.tolist() for label, c in by_label.items()}
    assert markers["LoRA r16"] != markers["full fine-tuning"]  # told apart in grayscale too
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx(98)


def test_learn_forget_by_loss_and_bad_rows():
    fig = plots.learn_forget(RUNS, measure="loss")
    ax = main_axes(fig)
    assert "nats/token" in ax.get_ylabel()
    assert ax.collections[0].get_offsets().tolist() == [[50.0, 2.0]]
    with pytest.raises(ValueError, match=r"measure must be one of \['accuracy', 'loss'\]"):
        plots.learn_forget(RUNS, measure="kl")
    with pytest.raises(ValueError, match=r"a run lacks replay, source_accuracy"):
        plots.learn_forget([{"learned": 0.5, "rank": 4}])
    empty = plots.learn_forget([])
    assert plots.NO_RESULTS in texts(empty)
    assert plots.NO_RESULTS in texts(plots.accuracy_vs_lr({}))


def test_learn_forget_by_replay_compares_panels_on_one_y_range_with_one_outside_legend():
    fig = plots.learn_forget(RUNS, measure="loss", by_replay=True, log=True, title="Learn, forget")
    first, second = fig.axes
    assert [first.get_title(), second.get_title()] == ["no replay", "5% replay"]
    assert fig.get_suptitle() == "Learn, forget"
    assert first.get_ylim() == second.get_ylim() and first.get_xlim() == second.get_xlim()
    assert first.get_yscale() == "log" and "log scale" in first.get_ylabel()
    # The no-replay runs reach 5 nats, the replay runs only 1.5: one range shows both.
    assert first.get_ylim()[1] >= 5.0 and second.get_ylim()[1] >= 5.0
    assert first.get_legend() is None and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "LoRA r4", "LoRA r16", "full fine-tuning", "LoRA r4 + replay 5%",
        "full fine-tuning + replay 5%",
    ]  # fmt: skip
    assert_clear_of_data(fig)
    with pytest.raises(ValueError, match=r"log=True needs measure='loss'"):
        plots.learn_forget(RUNS, log=True)
    with pytest.raises(ValueError, match=r"log=True cannot show a loss <= 0 \(or nan\): 0.0"):
        plots.learn_forget([RUNS[0] | {"source_loss": 0.0}], measure="loss", log=True)
    with pytest.raises(ValueError, match=r"spreads must be one \(low, high\) pair per label"):
        plots.timings(["a"], [0.01], spreads=5)


# ---------------------------------------------------------------- legends, titles, units


def drawn_points(ax) -> np.ndarray:
    """Display coordinates of what an Axes shows: line vertices and points along each segment,
    scatter points, and the corners and centres of bars, inside the Axes only."""
    points = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        points.append(xy)
        for a, b in zip(xy[:-1], xy[1:], strict=True):  # a segment can cross with no vertex in
            points.append(a + np.linspace(0, 1, 25)[:, None] * (b - a))
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=float)
        if len(offsets):
            points.append(collection.get_offset_transform().transform(offsets))
    for patch in ax.patches:
        box = patch.get_window_extent()
        xs = np.linspace(box.x0, box.x1, 5)
        ys = np.linspace(box.y0, box.y1, 5)
        points.append(np.array([(x, y) for x in xs for y in ys]))
    xy = np.concatenate([p for p in points if len(p)]) if points else np.empty((0, 2))
    inside = ax.get_window_extent()
    keep = (
        (xy[:, 0] >= inside.x0)
        & (xy[:, 0] <= inside.x1)
        & (xy[:, 1] >= inside.y0)
        & (xy[:, 1] <= inside.y1)
    )
    return xy[keep]


def assert_clear_of_data(fig: Figure) -> None:
    """No legend covers a drawn curve, point or bar, and every legend lies inside the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    page = fig.bbox
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        box = legend.get_window_extent()
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, "a legend runs off the Figure"
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, "a legend runs off the Figure"
        for ax in fig.axes:
            xy = drawn_points(ax)
            covered = (
                (xy[:, 0] > box.x0)
                & (xy[:, 0] < box.x1)
                & (xy[:, 1] > box.y0)
                & (xy[:, 1] < box.y1)
            )
            assert not covered.any(), f"the legend covers {int(covered.sum())} drawn points"


def sort_desc_curves() -> dict[str, list[float]]:
    """Notebook 05's loss curves: seven ranks and full fine-tuning from the shipped grid."""
    from lab.sweeps import by_rank, describe, load_grid_file, select

    grid = load_grid_file()
    lora = [r for r in select(grid, task="sort_desc", rslora=False, seed=0) if r.point.rank]
    at16 = by_rank(select(lora, alpha=16.0))
    curves = {describe(run.point): run.losses for run in at16.values()}
    curves["full fine-tuning"] = select(grid, task="sort_desc", rank=None)[0].losses
    return curves


FIGURES = {
    "trainable_vs_rank": lambda: plots.trainable_vs_rank(
        [1, 2, 4, 8, 16, 32, 64], [1024 * r for r in (1, 2, 4, 8, 16, 32, 64)], full=406_784
    ),
    "memory_vs_rank": lambda: plots.memory_vs_rank([1, 8, 64], [LORA, LORA, FULL], full=FULL),
    "memory_breakdown": lambda: plots.memory_breakdown({"full": FULL, "LoRA": LORA}),
    "cost_comparison": lambda: plots.cost_comparison(["toy, full", "toy, LoRA"], [FULL, LORA]),
    "loss_curves": lambda: plots.loss_curves(sort_desc_curves(), smooth=20),
    "dropout_effect": lambda: plots.dropout_effect(
        [0.0, 0.1, 0.3, 0.5], [0.0, 0.01, 0.02, 0.07], [1.08, 0.86, 0.65, 0.60]
    ),
    "update_size_vs_rank": lambda: plots.update_size_vs_rank(
        [1, 4, 16, 64], {"alpha/r": [1.0, 1.2, 1.1, 1.3], "alpha/sqrt(r)": [1.0, 2.4, 4.4, 10.4]}
    ),
    "singular_values": lambda: plots.singular_values(
        {"full": list(np.geomspace(3, 1e-3, 64)), "LoRA": [2, 1, 0.5, 0.3] + [1e-6] * 60}
    ),
    "energy_captured": lambda: plots.energy_captured(
        {"full": list(np.linspace(0.3, 1, 40)), "random": list(np.linspace(0.02, 1, 40))}
    ),
    "accuracy_vs_lr": lambda: plots.accuracy_vs_lr(
        {"r1": [(1e-3, 0.2), (1e-2, 0.9), (1e-1, None)], "r4": [(1e-3, 0.3), (1e-2, 0.95)]},
        full=[(1e-4, 0.5), (1e-3, 0.99)],
    ),
    "learn_forget": lambda: plots.learn_forget(RUNS, base=0.98),
    "learn_forget_by_replay": lambda: plots.learn_forget(RUNS, measure="loss", by_replay=True),
    "accuracy_heatmap": lambda: plots.accuracy_heatmap([4, 8], [8, 16], [[0.5, 0.6], [0.7, 0.8]]),
    "timings": lambda: plots.timings(["a", "b"], [0.01, 0.02]),
}


@pytest.mark.parametrize("make", FIGURES.values(), ids=FIGURES.keys())
def test_no_legend_covers_the_data(make):
    assert_clear_of_data(make())


def test_the_overlap_check_catches_a_legend_inside_the_curves():
    fig = plots.loss_curves(sort_desc_curves(), smooth=20)
    ax = main_axes(fig)
    ax.legend(loc="center")  # where the curves are
    with pytest.raises(AssertionError, match="the legend covers"):
        assert_clear_of_data(fig)


# A label without a unit in brackets is a count or a pure number: these are the ones allowed.
UNITLESS = {"rank r", "alpha", "adapter dropout p", "index i", "configuration", "training step"}
UNITLESS |= {"model and method"}


@pytest.mark.parametrize("make", FIGURES.values(), ids=FIGURES.keys())
def test_every_plot_has_a_title_labelled_axes_and_units(make):
    fig = make()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert fig.get_suptitle() or all(ax.get_title() for ax in axes)
    assert all(ax.get_title() for ax in axes)
    labels = [ax.get_xlabel() for ax in axes] + [axes[0].get_ylabel()]
    labels += [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    for label in labels:
        assert label, f"an axis without a label in {[ax.get_title() for ax in axes]}"
        assert "(" in label or label in UNITLESS, f"no unit in the axis label {label!r}"
