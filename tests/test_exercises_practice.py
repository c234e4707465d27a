"""Exercises 9 (the best LoRA learning rate) and 10 (which layers under a budget): the right
answers pass, each typical mistake gets the hint that names it, hostile answers are feedback,
and no wrong answer passes. A small synthetic grid stands in for the shipped one, whose own
checks come last."""

from __future__ import annotations

import math

import pytest
import torch
from test_bad_input_exercises import assert_not_yet, assert_passed, exits

import lab
from lab import exercises as ex
from lab import practice
from lab.exercises import practice as ex_practice
from lab.sweeps import SHORT_TARGETS, SweepPoint, SweepResult

FULL_BEST, LORA_BEST = 1e-3, 1e-2  # the synthetic grid's best rates: exactly 10x apart


def fake(point: SweepPoint, accuracy: float | None, loss: float = 1.0) -> SweepResult:
    """A made-up result; accuracy None: diverged (held-out loss nan, accuracy 0)."""
    diverged = accuracy is None
    return SweepResult(
        point=point, losses=[2.0, loss], train_eval=None, trainable_parameters=18_432,
        heldout={"loss": math.nan if diverged else loss, "accuracy": accuracy or 0.0, "n": 512},
        total_parameters=400_000, memory=None, wall_seconds=1.0, tokens_per_second=1.0,
        device="cpu", date="", diverged=diverged,
    )  # fmt: skip


def peaked(point: SweepPoint, best: float, top: float) -> SweepResult:
    """Accuracy `top` at lr `best`, falling 0.15 per half-decade away; diverged at lr 0.1."""
    if point.lr >= 0.1:
        return fake(point, None)
    steps = abs(math.log10(point.lr / best)) * 2
    return fake(point, max(0.0, top - 0.15 * steps), loss=0.2 + 0.3 * steps)


SHIFT_ACCURACY = {"q,v": 0.30, "attention": 0.35, "MLP": 0.90, "all-linear": 0.95}  # by name
ATTENTION_BEST = max(SHIFT_ACCURACY[n] for n in practice.LAYER_SETS if n in ("q,v", "attention"))


def synthetic_grid() -> list[SweepResult]:
    """One result per point of the two experiments (they share sort_desc's all-linear r4 runs)."""
    out: dict[SweepPoint, SweepResult] = {}
    for p in practice.lr_points():
        if p.is_full:
            out[p] = peaked(p, FULL_BEST, 0.80)
        else:
            out[p] = peaked(p, 3e-3 if p.rslora else LORA_BEST, 0.90)
    for p in practice.layer_points():
        if p.is_full:
            out[p] = peaked(p, 3e-4, 0.97)
        elif p.task == "shift":
            name = next(
                n for n, (t, _) in practice.LAYER_SETS.items() if tuple(sorted(t)) == p.targets
            )
            out[p] = peaked(p, 1e-2, SHIFT_ACCURACY[name])
        else:
            out.setdefault(p, peaked(p, LORA_BEST, 0.8))
    for p in practice.layer_long_points():  # the runs exercise 10 cites: one per target set
        name = next(n for n, (t, _) in practice.LAYER_SETS.items() if tuple(sorted(t)) == p.targets)
        out[p] = peaked(p, p.lr, SHIFT_ACCURACY[name])
    return list(out.values())


GRID = synthetic_grid()


def find_ok(results):
    trained = [r for r in results if not r.diverged]
    return max(trained, key=lambda r: (r.heldout["accuracy"], -r.heldout["loss"])).point.lr


# ----------------------------------------------------------------------------- 9a: predict


def test_the_checkers_are_exported_beside_the_first_eight():
    import inspect

    checks = [n for n, f in inspect.getmembers(ex, inspect.isfunction) if n.startswith("check_")]
    new = {"check_lr_prediction", "check_find_best_lr", "check_mlp_count", "check_shift_targets"}
    assert new <= set(checks) and len(checks) >= 10
    assert new <= set(ex.__all__)


@pytest.mark.parametrize("lr", [1e-2, 5e-3, 2e-2, 8e-3, torch.tensor(1e-2)])
def test_a_prediction_near_ten_times_full_fine_tuning_passes(lr):
    feedback = ex.check_lr_prediction(lr, results=GRID)
    assert_passed(feedback)
    assert "0.001" in feedback.message and "10x" in feedback.message


def test_the_evidence_shows_full_fine_tuning_alone():
    text = ex.lr_evidence(GRID)
    assert "best: lr 0.001 (held-out accuracy 0.80)" in text and "diverged" in text
    assert "rank" not in text  # LoRA's own rates are part (b)'s to find


PREDICTION_WRONG = [
    (1e-3, "full fine-tuning's own best rate"),
    (1.1e-3, "full fine-tuning's own best rate"),
    (1e-4, "divided by 10"),
    (3e-4, "lower than full fine-tuning's best"),
    (1e-5, "lower than full fine-tuning's best"),
    (1e-1, "about 100x"),
    (6e-2, "about 100x"),
    (3e-3, "too small a step up"),
    (4e-2, "too large a step up"),
    (10, "is it the ratio"),
    (1.0, "is it the ratio"),
]


@pytest.mark.parametrize(("lr", "phrase"), PREDICTION_WRONG)
def test_a_wrong_prediction_gets_its_own_hint(lr, phrase):
    assert_not_yet(ex.check_lr_prediction(lr, results=GRID), phrase)


def test_the_rate_the_grid_measured_passes_beside_the_published_rule():
    """On the shipped grid LoRA's best is 0.01, 3.3x full fine-tuning's 0.003 (two cells later in
    the notebook): what the data say passes, and the message puts the rule's 10x beside it."""
    full = ex_practice._best_full(practice.load_practice_grid())[0].point.lr
    sweeps = ex_practice._lr_sweeps(practice.load_practice_grid())
    measured = {practice.best_lr(s).point.lr for (rank, rs), s in sweeps.items() if rank and not rs}
    assert measured == {1e-2} and full == 3e-3  # the notebook's stored outputs say so
    feedback = ex.check_lr_prediction(1e-2)
    assert_passed(feedback)
    assert "measured best" in feedback.message and "predicts 0.03" in feedback.message
    assert "too small" not in feedback.message
    assert_passed(ex.check_lr_prediction(3e-2))  # the published rule's prediction
    assert_not_yet(ex.check_lr_prediction(1.2e-2), "near the rate the grid measured best (0.01)")
    assert_not_yet(ex.check_lr_prediction(6e-3), "too small a step up")
    assert_not_yet(ex.check_lr_prediction(3e-3), "own best rate")


@pytest.mark.parametrize("lr", [None, "1e-2", float("nan"), math.inf, -1e-2, 0, True, [1e-2]])
def test_a_prediction_that_is_not_a_rate_is_feedback(lr):
    phrase = "no prediction yet" if lr is None else "should be a positive number"
    assert_not_yet(ex.check_lr_prediction(lr, results=GRID), phrase)


def test_the_prediction_passes_exactly_within_a_factor_two_of_ten_times():
    for exponent in range(-60, 1):
        lr = 10 ** (exponent / 10)
        ratio = lr / FULL_BEST
        assert ex.check_lr_prediction(lr, results=GRID).passed == (5 <= ratio <= 20), lr


def test_a_grid_without_full_fine_tuning_or_unreadable_says_so(monkeypatch):
    lora_only = [r for r in GRID if not r.point.is_full]
    assert_not_yet(ex.check_lr_prediction(1e-2, results=lora_only), "no trained full", "none found")
    diverged = [fake(r.point, None) if r.point.is_full else r for r in GRID]
    assert_not_yet(ex.check_lr_prediction(1e-2, results=diverged), "7 found, all diverged")
    assert_not_yet(ex.check_lr_prediction(1e-2, results=[]), "none found")

    def broken():
        raise ValueError("practice_grid.json: cannot read the grid file (no such file)")

    monkeypatch.setattr(ex_practice, "_shipped_grid", broken)
    assert_not_yet(ex.check_lr_prediction(1e-2), "cannot be read", "make_practice_grid")
    assert_not_yet(ex.check_find_best_lr(find_ok), "cannot be read")
    assert_not_yet(ex.check_shift_targets(("up", "down"), 7), "cannot be read")
    assert "cannot be read" in ex.lr_evidence()


# ----------------------------------------------------------------------------- 9b: find


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


def stub(results):
    raise NotImplementedError


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
        case = [ex_practice._trap(*run) for run in runs]
        want = practice.best_lr(case).point.lr
        lrs = [r.point.lr for r in case]
        assert want not in (max(lrs), min(lrs)), description
    for hint, mistake in ex_practice._FIND_MISTAKES:  # each mistake fails at least one trap
        cases = [[ex_practice._trap(*run) for run in runs] for _, runs in ex.TRAPS]
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


# ----------------------------------------------------------------------------- 10a: count


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


# ----------------------------------------------------------------------------- 10b: choose


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
        if SHIFT_ACCURACY[n] >= ex_practice.SHIFT_LEARNED
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


# ----------------------------------------------------------------------------- the shipped grid


def test_on_the_shipped_grid_the_right_answers_pass_and_the_wrong_do_not():
    full = ex_practice._best_full(practice.load_practice_grid())[0].point.lr
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


def test_the_shipped_grid_supports_exercise_ten_premise():
    """The hint tells attention-only choices they fall short: the grid must say so too."""
    rows = ex_practice._layer_rows(practice.load_practice_grid())
    assert rows is not None
    attention = max(rows[n]["accuracy"] for n in rows if n in ("q,v", "attention"))
    mlp = min(rows[n]["accuracy"] for n in ("MLP", "all-linear"))
    assert mlp > attention + 0.05, rows
