"""Tests for lab/exercises/find_lr_check.py: exercise 9b, traps and the grid."""

from __future__ import annotations

import math

import pytest
import torch
from exercise_kit import (
    GRID,
    assert_not_yet,
    assert_passed,
    exits,
    find_ok,
    stub,
)

from lab import exercises as ex
from lab import practice
from lab.exercises import find_lr_check, lr_prediction_check


def test_a_right_find_best_lr_passes_and_reports_the_measured_ratios():
    feedback = ex.check_find_best_lr(find_ok, results=GRID)
    assert_passed(feedback)
    message = feedback.message
    assert "about 10x" in message and "lr 0.001" in message
    n = len(practice.LR_RANKS)
    assert f"10x ({n} of {n} ranks within a factor 2 of 10x)" in message
    assert "the same rate at every rank" in message
    assert "0.003" in message and " 3x" in message  # rsLoRA, reported as it is


def test_other_right_answers_pass():
    def numpy_float(results):
        import numpy as np

        return np.float64(find_ok(results))

    def sorted_copy(results):  # sorts a new list: the caller's stays as given
        ranked = sorted(trained(results), key=lambda r: (-r.heldout["accuracy"], r.heldout["loss"]))
        return ranked[0].point.lr

    for fn in (numpy_float, sorted_copy, lambda rs: torch.tensor(find_ok(rs))):
        assert_passed(ex.check_find_best_lr(fn, results=GRID))
    assert_passed(ex.check_find_best_lr(find_ok, results=GRID))  # the grid is unchanged


def sorts_in_place(results):
    results.sort(key=lambda r: (r.diverged, -r.heldout["accuracy"], r.heldout["loss"]))
    return results[0].point.lr


def drops_diverged_in_place(results):
    for r in [r for r in results if r.diverged]:
        results.remove(r)
    return find_ok(results)


def clobbers(results):  # changes the results it was given after answering
    lr = find_ok(results)
    for r in results:
        r.heldout["accuracy"] = 1.0
    return lr


def nan_to_inf(results):  # "fixes" the diverged runs' nan in place
    for r in results:
        if r.diverged:
            r.heldout["loss"] = math.inf
    return find_ok(results)


def accuracy_first(results):
    return max(results, key=lambda r: (r.heldout["accuracy"], -r.heldout["loss"]))


def trained(results):
    return [r for r in results if not r.diverged]


FIND_WRONG = [
    (lambda rs: min(trained(rs), key=lambda r: r.losses[-1]).point.lr, "training loss"),
    (lambda rs: min(rs, key=lambda r: r.losses[-1]).point.lr, "training loss"),
    (lambda rs: min(trained(rs), key=lambda r: r.heldout["loss"]).point.lr, "lowest held-out loss"),
    (lambda rs: accuracy_first(rs).point.lr, "skip runs with result.diverged"),
    (lambda rs: max(rs, key=lambda r: r.heldout["accuracy"]).point.lr, "result.diverged"),
    (
        lambda rs: (
            max(trained(rs), key=lambda r: (r.heldout["accuracy"], r.heldout["loss"])).point.lr
        ),
        "ties are broken the wrong way",
    ),  # fmt: skip
    (
        lambda rs: max(trained(rs), key=lambda r: r.heldout["accuracy"]).point.lr,
        "ties are not broken",
    ),
    (
        lambda rs: sorted(trained(rs), key=lambda r: -r.heldout["accuracy"])[0].point.lr,
        "ties are not broken",
    ),
    (lambda rs: max(r.point.lr for r in rs), "the largest learning rate:"),
    (lambda rs: max(r.point.lr for r in trained(rs)), "largest learning rate that did not"),
    (lambda rs: min(r.point.lr for r in rs), "the smallest learning rate"),
    (lambda rs: rs[0].point.lr, "the first run's rate"),
    (lambda rs: rs[-1].point.lr, "the last run's rate"),
    (lambda rs: accuracy_first(trained(rs)), "the result itself"),
    (lambda rs: accuracy_first(trained(rs)).point, "the point"),
    (lambda rs: accuracy_first(trained(rs)).heldout["accuracy"], "a held-out accuracy"),
    (lambda rs: accuracy_first(trained(rs)).heldout["loss"], "a held-out loss"),
    (lambda rs: rs.index(accuracy_first(trained(rs))), "a position in the list"),
    (lambda rs: (find_ok(rs), 0.9), "returned a tuple"),
    (lambda rs: str(find_ok(rs)), "returned a str"),
    (lambda rs: None, "returned None"),
    (lambda rs: 0.5, "not one of the rates"),
    (lambda rs: True, "returned a bool"),
    (sorts_in_place, "changed the list it was given", "sorted in place"),
    (drops_diverged_in_place, "changed the list it was given", "removed or added"),
    (lambda rs: rs.append(rs[0]) or find_ok(rs[:-1]), "changed the list", "removed or added"),
    (clobbers, "changed the list it was given", "a run in it was changed"),
    (nan_to_inf, "a run in it was changed", "sorted(results, ...)"),
    (lambda rs: rs.reverse() or find_ok(rs), "sorted in place"),
    (lambda rs: rs.clear() or 1e-2, "now holds 0 of the"),
    (lambda rs: float("nan"), "not one of the rates"),
    (lambda rs: 1e-2 * (1 + 1e-3), "not one of the rates"),
    (lambda rs: {"lr": find_ok(rs)}, "returned a dict"),
    (lambda rs: [find_ok(rs)], "returned a list"),
    (lambda rs: rs, "returned a list"),
    (lambda rs: torch.tensor([find_ok(rs), 0.1]), "returned a Tensor"),
]


@pytest.mark.parametrize(("fn", *["phrases"]), [(fn, p) for fn, *p in FIND_WRONG])
def test_a_wrong_find_best_lr_gets_the_hint_for_its_mistake(fn, phrases):
    assert_not_yet(ex.check_find_best_lr(fn, results=GRID), *phrases)


def test_a_wrong_find_best_lr_is_not_shown_which_run_is_best():
    # lr 0.1 (diverged) is returned; the best, lr 0.001, must not be named
    feedback = ex.check_find_best_lr(lambda rs: rs[0].point.lr, results=GRID)
    assert_not_yet(feedback, "you return lr 0.1 (diverged), not the best run")
    assert "0.001" not in feedback.message


def test_a_find_best_lr_right_on_the_traps_but_wrong_on_the_grid_is_caught():
    def traps_only(results):  # every trap sweep has 4 or 5 runs; the grid's have 7
        if len(results) < 6:
            return find_ok(results)
        return max(r.point.lr for r in trained(results))

    feedback = ex.check_find_best_lr(traps_only, results=GRID)
    assert_not_yet(feedback, "shipped grid's full fine-tuning sweep", "did not diverge")


@pytest.mark.parametrize(
    ("fn", "phrase"),
    [
        (stub, "still the stub"),
        (exits, "SystemExit"),
        (lambda: 1e-2, "calls it as find_best_lr(results)"),
        (lambda rs: 1 / 0, "ZeroDivisionError"),
        (None, "should be a function"),
        (1e-2, "should be a function"),
    ],
)
def test_find_best_lr_that_cannot_run_is_feedback(fn, phrase):
    assert_not_yet(ex.check_find_best_lr(fn, results=GRID), phrase)


def test_every_trap_has_a_best_that_no_simple_shortcut_finds():
    for description, runs in ex.TRAPS:
        case = [find_lr_check._trap(*run) for run in runs]
        want = practice.best_lr(case).point.lr
        lrs = [r.point.lr for r in case]
        assert want not in (max(lrs), min(lrs)), description
    for hint, mistake in find_lr_check._FIND_MISTAKES:  # each mistake fails at least one trap
        cases = [[find_lr_check._trap(*run) for run in runs] for _, runs in ex.TRAPS]
        assert any(mistake(c) != practice.best_lr(c).point.lr for c in cases), hint


def test_a_grid_without_the_lr_experiment_says_so():
    layers_only = [r for r in GRID if r.point.task == "shift"]
    assert_not_yet(ex.check_find_best_lr(find_ok, results=layers_only), "lacks the learning-rate")


def test_the_ratio_report_leaves_out_a_sweep_that_lacks_rates():
    partial = [r for r in GRID if not (r.point.rank == 4 and r.point.lr > 1e-3)]
    feedback = ex.check_find_best_lr(find_ok, results=partial)
    assert_passed(feedback)
    kept = [r for r in practice.LR_RANKS if r != 4]
    assert f"{len(kept)} of {len(kept)} ranks" in feedback.message
    assert f"({', '.join(f'r{r}' for r in kept)})" in feedback.message


def test_on_the_shipped_grid_the_right_answers_pass_and_the_wrong_do_not():
    full = lr_prediction_check._best_full(practice.load_practice_grid())[0].point.lr
    assert_passed(ex.check_lr_prediction(10 * full))
    assert_not_yet(ex.check_lr_prediction(full), "own best rate")
    assert_passed(ex.check_find_best_lr(find_ok))
    for fn, *_ in FIND_WRONG:
        assert not ex.check_find_best_lr(fn).passed
    assert_passed(ex.check_shift_targets(("up", "down"), 7))
    assert_passed(ex.check_shift_targets("all-linear", 4))
    assert_not_yet(ex.check_shift_targets(("q", "v"), 18), "attention only")
    # MLP layers within the budget, never trained: not measured, never assumed to learn shift.
    assert_not_yet(ex.check_shift_targets(("down",), 14), "not measured")
    assert_not_yet(ex.check_shift_targets(("up",), 1), "not measured")
