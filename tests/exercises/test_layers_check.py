"""Tests for lab/exercises/layers_check.py: exercise 10, measured settings only."""

from __future__ import annotations

import math

import pytest
import torch
from exercise_kit import (
    ATTENTION_BEST,
    GRID,
    SHIFT_ACCURACY,
    assert_not_yet,
    assert_passed,
    fake,
)

import lab
from lab import exercises as ex
from lab import practice
from lab.exercises import layers_check, practice_grid
from lab.sweeps import SHORT_TARGETS


def test_the_mlp_count_by_hand():
    model = lab.load_base_model("cpu")
    lab.add_lora(model, targets=("up_proj", "down_proj"), rank=7)
    want = lab.count_parameters(model).trainable
    assert want == 17_920
    assert_passed(ex.check_mlp_count(want))
    assert_passed(ex.check_mlp_count(torch.tensor(want)))
    assert_passed(ex.check_mlp_count(float(want)))


@pytest.mark.parametrize(
    ("count", "phrase"),
    [
        (7_168, "d_model (128) on both sides"),
        (28_672, "d_ff (512) on both sides"),
        (8_960, "only A"),
        (8_960, "one block's worth"),
        (17_920 * 2, "twice the right count"),
        (2 * 7 * 128 * 2 + 2 * 7 * 512 * 2 - 1, "r * (in + out) numbers"),
        (12_345, "r * (in + out) numbers"),
        (None, "no count yet"),
        ("17920", "should be a whole number"),
        (True, "should be a whole number"),
        (17_920.5, "a whole number"),
        (math.nan, "a whole number"),
    ],
)
def test_a_wrong_mlp_count_gets_its_hint(count, phrase):
    feedback = ex.check_mlp_count(count)
    assert_not_yet(feedback, phrase)
    assert "17,920" not in feedback.message  # the one answer is never handed over


@pytest.mark.parametrize("count", [0, 1, 10**9, -1])
def test_a_wrong_mlp_count_never_shows_the_answer(count):
    feedback = ex.check_mlp_count(count)
    assert_not_yet(feedback, "than the lab counts")
    assert "17,920" not in feedback.message and "17920" not in feedback.message


@pytest.mark.parametrize(
    ("targets", "rank", "accuracy"),
    [
        (("up", "down"), 7, "0.90"),
        (("up_proj", "down_proj"), 7, "0.90"),
        ("down up", 7, "0.90"),
        ("all-linear", 4, "0.95"),
        (("q", "k", "v", "o", "up", "down"), 4, "0.95"),
    ],
)
def test_a_setting_the_grid_measured_learning_shift_passes(targets, rank, accuracy):
    feedback = ex.check_shift_targets(targets, rank, results=GRID)
    assert_passed(feedback)
    assert f"trained this very setting on shift: held-out accuracy {accuracy}" in feedback.message
    assert f"attention-only at matched parameters reached at best {ATTENTION_BEST:.2f}" in (
        feedback.message
    )


@pytest.mark.parametrize(
    ("targets", "rank"),
    [
        (("down",), 14),  # within budget, MLP included, never trained
        (("up",), 1),  # a sliver of the budget
        (("up", "down"), 6),  # the measured set at another rank
        (("up", "down"), 1),
        ("q v up", 8),
        (("v", "down"), 10),
        ("all-linear", 3),
        (("q", "k", "v", "o"), 9),  # attention only, never trained
    ],
)
def test_a_setting_the_grid_never_trained_is_not_measured_not_assumed(targets, rank):
    feedback = ex.check_shift_targets(targets, rank, results=GRID)
    assert_not_yet(feedback, "was not measured", "cannot know whether it learns shift")
    assert "expect less" not in feedback.message
    for name, (_, r) in practice.LAYER_SETS.items():  # what was measured, to choose from
        assert f"{name} r{r} {SHIFT_ACCURACY[name]:.2f}" in feedback.message


def test_a_numpy_rank_is_a_whole_number():
    import numpy as np

    assert_passed(ex.check_shift_targets(("up", "down"), np.int64(7), results=GRID))
    assert_not_yet(ex.check_shift_targets(("down",), np.int64(14), results=GRID), "not measured")


def test_the_count_is_the_labs_own():
    model = lab.load_base_model("cpu")
    lab.add_lora(model, targets=("q_proj", "v_proj", "up_proj"), rank=8)
    want = lab.count_parameters(model).trainable
    feedback = ex.check_shift_targets(("q", "v", "up"), 8, results=GRID)
    assert f"({want:,} parameters)" in feedback.message and want == 18_432


def test_attention_only_gets_the_grids_numbers():
    feedback = ex.check_shift_targets(("q", "v"), 18, results=GRID)
    assert_not_yet(feedback, "accuracy 0.30 on shift in the grid, short of learning it")
    assert_not_yet(feedback, "attention only", "up_proj or down_proj")
    for name, (_, r) in practice.LAYER_SETS.items():  # every matched set's measured accuracy
        assert_not_yet(feedback, f"{name} r{r} {SHIFT_ACCURACY[name]:.2f}")
    not_measured = ex.check_shift_targets(("q", "k", "v", "o"), 9, results=GRID)
    assert_not_yet(not_measured, "not measured", "attention only")


def test_a_measured_setting_below_the_bar_does_not_pass():
    weak = [fake(r.point, 0.5, 0.9) if r.point in practice.layer_long_points() else r for r in GRID]
    for targets, rank in practice.LAYER_SETS.values():
        assert_not_yet(
            ex.check_shift_targets(targets, rank, results=weak), "0.50", "short of learning it"
        )


@pytest.mark.parametrize(
    ("targets", "rank", "cost"),
    [(("up", "down"), 8, "20,480"), ("all-linear", 5, "23,040"), (("q", "v"), 19, "19,456")],
)
def test_over_the_budget_is_refused_with_the_count(targets, rank, cost):
    feedback = ex.check_shift_targets(targets, rank, results=GRID)
    assert_not_yet(feedback, f"trains {cost} parameters", "over the budget of 18,432")


@pytest.mark.parametrize(
    ("targets", "rank", "phrase"),
    [
        ((), 0, "no choice yet"),
        (None, None, "no choice yet"),
        (("gate",), 4, "not LoRA targets here"),
        (("up", "mlp"), 4, "not LoRA targets here"),
        ((), 4, "TARGETS is empty"),
        (42, 4, "should be a tuple of names"),
        (("up",), 0, "from 1 to 128"),
        (("up",), -3, "from 1 to 128"),
        (("up",), 2.5, "from 1 to 128"),
        (("up",), True, "from 1 to 128"),
        (("up",), "4", "from 1 to 128"),
        (("up",), 129, "from 1 to 128"),
    ],
)
def test_a_choice_that_cannot_be_counted_is_refused_clearly(targets, rank, phrase):
    assert_not_yet(ex.check_shift_targets(targets, rank, results=GRID), phrase)


def test_only_a_measured_setting_that_learned_shift_ever_passes():
    names = ("q", "k", "v", "o", "up", "down")
    learned = {
        (tuple(sorted(t)), r)
        for n, (t, r) in practice.LAYER_SETS.items()
        if SHIFT_ACCURACY[n] >= practice_grid.SHIFT_LEARNED
    }
    assert len(learned) == 2  # MLP r7 and all-linear r4 in the synthetic grid
    for mask in range(1, 64):
        chosen = tuple(n for i, n in enumerate(names) if mask >> i & 1)
        full = tuple(sorted(SHORT_TARGETS[n] for n in chosen))
        for rank in (1, 4, 7, 9, 14, 18, 40):
            feedback = ex.check_shift_targets(chosen, rank, results=GRID)
            assert feedback.passed == ((full, rank) in learned), (chosen, rank)


def test_a_grid_without_the_layer_experiment_says_so():
    lr_only = [r for r in GRID if r.point.task == "sort_desc"]
    feedback = ex.check_shift_targets(("up", "down"), 7, results=lr_only)
    assert_not_yet(feedback, "lacks the which-layers experiment")


def test_the_shipped_grid_supports_exercise_ten_premise():
    """The hint tells attention-only choices they fall short: the grid must say so too."""
    rows = layers_check._layer_rows(practice.load_practice_grid())
    assert rows is not None
    attention = max(rows[n]["accuracy"] for n in rows if n in ("q,v", "attention"))
    mlp = min(rows[n]["accuracy"] for n in ("MLP", "all-linear"))
    assert mlp > attention + 0.05, rows
