"""Tests for lab/plots/practice_plots.py: accuracy by learning rate, learning against forgetting."""

from __future__ import annotations

import matplotlib
import pytest
from plot_probes import (
    RUNS,
    assert_clear_of_data,
    assert_labelled,
    main_axes,
    texts,
)

from lab import plots

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
