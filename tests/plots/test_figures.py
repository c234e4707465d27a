"""Tests for lab/plots/figures.py: what every plot shares (no data, lengths, legends, labels)."""

from __future__ import annotations

import numpy as np
import pytest
from plot_probes import (
    FULL,
    LORA,
    RUNS,
    assert_clear_of_data,
    assert_labelled,
    main_axes,
    texts,
)

from lab import plots

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
