"""lab.engine.summaries: cached results as the lists lab.plots draws."""

from __future__ import annotations

import math

import pytest
from fakes import fake_result

from lab.engine.points import SweepPoint, full_point, grid
from lab.engine.summaries import accuracy_table, by_rank, dropout_series, select, trainable_counts


def test_accuracy_table_has_rows_per_rank_and_nan_where_missing():
    results = [
        fake_result(SweepPoint("sort_desc", r, alpha=a), r / 10) for r, a in [(1, 8), (4, 16)]
    ]
    table = accuracy_table(results, [1, 2, 4], [8, 16])
    assert table[0][0] == 0.1 and table[2][1] == 0.4
    assert all(math.isnan(table[i][j]) for i, j in [(0, 1), (1, 0), (1, 1), (2, 0)])


def test_by_rank_sorts_lora_results_and_skips_full():
    points = [SweepPoint("sort_desc", r) for r in (16, 1, 4)] + [full_point("sort_desc")]
    assert list(by_rank(fake_result(p) for p in points)) == [1, 4, 16]


def test_dropout_series_sorts_by_dropout_and_needs_a_train_eval():
    results = [
        fake_result(SweepPoint("sort_desc_small", 8, dropout=0.5), train_loss=0.6),
        fake_result(SweepPoint("sort_desc_small", 8, dropout=0.0), train_loss=0.1),
        fake_result(SweepPoint("sort_desc", 8, dropout=0.2)),  # no train eval: left out
    ]
    dropouts, train, heldout = dropout_series(results)
    assert dropouts == [0.0, 0.5] and train == [0.1, 0.6] and len(heldout) == 2


def test_select_filters_by_fields_and_refuses_unknown_ones():
    results = [fake_result(p) for p in grid("sort_desc", [1, 2], [8, 16])]
    assert len(select(results, rank=2)) == 2
    assert len(select(results, rank=2, alpha=8.0, targets=("v_proj", "q_proj"))) == 1
    with pytest.raises(ValueError, match="unknown SweepPoint fields"):
        select(results, colour="red")


def test_trainable_counts_are_exact():
    counts, full = trainable_counts([1, 8], ("q_proj", "v_proj"))
    layers, d, f, vocab, seq = 2, 128, 512, 64, 32  # the shipped base's shapes
    assert counts == [r * layers * 2 * (d + d) for r in (1, 8)]
    # embeddings (the head is tied), per layer q/k/v/o, up/down and two LayerNorms, final norm
    assert full == vocab * d + seq * d + layers * (4 * d * d + 2 * d * f + 4 * d) + 2 * d
