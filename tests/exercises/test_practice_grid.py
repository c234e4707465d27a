"""Tests for lab/exercises/practice_grid.py: exercises 9 and 10 on a grid that cannot be read."""

from __future__ import annotations

from exercise_kit import (
    GRID,
    assert_not_yet,
    fake,
    find_ok,
)

from lab import exercises as ex
from lab.exercises import practice_grid


def test_a_grid_without_full_fine_tuning_or_unreadable_says_so(monkeypatch):
    lora_only = [r for r in GRID if not r.point.is_full]
    assert_not_yet(ex.check_lr_prediction(1e-2, results=lora_only), "no trained full", "none found")
    diverged = [fake(r.point, None) if r.point.is_full else r for r in GRID]
    assert_not_yet(ex.check_lr_prediction(1e-2, results=diverged), "7 found, all diverged")
    assert_not_yet(ex.check_lr_prediction(1e-2, results=[]), "none found")

    def broken():
        raise ValueError("practice_grid.json: cannot read the grid file (no such file)")

    monkeypatch.setattr(practice_grid, "_shipped_grid", broken)
    assert_not_yet(ex.check_lr_prediction(1e-2), "cannot be read", "make_practice_grid")
    assert_not_yet(ex.check_find_best_lr(find_ok), "cannot be read")
    assert_not_yet(ex.check_shift_targets(("up", "down"), 7), "cannot be read")
    assert "cannot be read" in ex.lr_evidence()
