"""Tests for lab/plots/cost_plots.py: trainable parameters and memory, drawn as they are."""

from __future__ import annotations

import pytest
from plot_probes import (
    FULL,
    LORA,
    MIB,
    assert_labelled,
    bar_heights,
    main_axes,
    texts,
)

from lab import plots


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
