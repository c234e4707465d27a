"""lab.practice: the practitioners' sweeps, the helpers that read them, and the shipped grid."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from lab import practice
from lab.sweeps import ALL_TARGETS_SORTED, SweepPoint, SweepResult, load_grid_file
from lab.tasks import PRETRAIN_TASKS


def fake(point: SweepPoint, accuracy: float, loss: float = 1.0, diverged: bool = False,
         source: float = 0.5) -> SweepResult:  # fmt: skip
    return SweepResult(
        point=point, losses=[1.0], train_eval=None, trainable_parameters=10,
        heldout={"loss": math.nan if diverged else loss, "accuracy": accuracy, "n": 512},
        total_parameters=100, memory=None, wall_seconds=1.0, tokens_per_second=1.0,
        device="cpu", date="", diverged=diverged,
        forgetting=None if diverged else {t: {"accuracy": source, "loss": 2 * source}
                                          for t in PRETRAIN_TASKS},
    )  # fmt: skip


def test_the_experiments_hold_the_points_their_findings_need():
    lr = practice.lr_points()
    assert len(practice.LR_GRID) >= 7
    ratios = [b / a for a, b in zip(practice.LR_GRID, practice.LR_GRID[1:], strict=False)]
    assert all(2.5 < r < 4 for r in ratios)  # log-spaced, half a decade apart
    full = [p for p in lr if p.is_full]
    assert sorted(p.lr for p in full) == list(practice.LR_GRID)
    for rslora, ranks, lrs in ((False, practice.LR_RANKS, practice.LR_GRID),
                               (True, practice.RSLORA_RANKS, practice.RSLORA_LRS)):  # fmt: skip
        for rank in ranks:
            got = sorted(p.lr for p in lr if p.rank == rank and p.rslora == rslora)
            assert got == list(lrs), (rank, rslora)
    assert {p.targets for p in lr if not p.is_full} == {ALL_TARGETS_SORTED}
    assert {p.alpha for p in lr if not p.is_full} == {practice.ALPHA}
    # which layers: every target set at every rate on both tasks, parameters matched
    from lab.analysis import count_lora
    from lab.base import load_base_config

    counts = [count_lora(load_base_config(), r, t)[0] for t, r in practice.LAYER_SETS.values()]
    assert max(counts) / min(counts) < 1.03
    layers = practice.layer_points()
    for task in practice.LAYER_TASKS:
        for targets, rank in practice.LAYER_SETS.values():
            names = tuple(sorted(targets))
            got = [p.lr for p in layers if (p.task, p.rank, p.targets) == (task, rank, names)]
            assert sorted(got) == list(practice.LAYER_LRS), (task, targets)
    assert all(p.replay == practice.REPLAY for p in practice.replay_points())
    everything = practice.all_points()
    assert len(everything) == len(set(everything))


def test_best_lr_takes_accuracy_then_loss_and_skips_diverged():
    p = [SweepPoint("rotate", 4, lr=lr) for lr in (1e-3, 1e-2, 1e-1, 3e-2)]
    runs = [fake(p[2], 0.0, diverged=True), fake(p[0], 0.5, 0.9), fake(p[1], 0.8, 0.4),
            fake(p[3], 0.8, 0.3)]  # fmt: skip
    assert practice.best_lr(runs).point.lr == 3e-2  # tie on accuracy: the lower loss
    assert practice.lr_curve(runs) == [(1e-3, 0.5), (1e-2, 0.8), (3e-2, 0.8), (1e-1, None)]
    with pytest.raises(ValueError, match="no trained run among 1"):
        practice.best_lr([runs[0]])
    with pytest.raises(ValueError, match="no trained run among 0"):
        practice.best_lr([])


def test_best_by_lr_groups_by_every_field_but_lr():
    settings = ((1, 1e-3, 0.2), (1, 1e-2, 0.4), (4, 1e-3, 0.9), (4, 1e-2, 0.1))
    runs = [fake(SweepPoint("rotate", r, lr=lr), acc) for r, lr, acc in settings]
    best = practice.best_by_lr(runs)
    assert sorted((b.point.rank, b.point.lr) for b in best.values()) == [(1, 1e-2), (4, 1e-3)]


def test_learn_forget_rows():
    runs = [fake(SweepPoint("rotate", 4, lr=1e-2), 0.7, source=0.25),
            fake(SweepPoint("rotate", None, lr=1e-3, replay=0.05), 0.9, source=0.75),
            fake(SweepPoint("rotate", 4, lr=1e-1), 0.0, diverged=True)]  # fmt: skip
    rows = practice.learn_forget(runs)
    assert [r["label"] for r in rows] == ["r4 lr 0.01", "full lr 0.001"]
    assert rows[0]["learned"] == 0.7 and rows[0]["source_accuracy"] == 0.25
    assert rows[0]["source_loss"] == 0.5 and rows[1]["replay"] == 0.05


@pytest.fixture(scope="module")
def shipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another base model or a malformed entry: a failure
        return practice.load_practice_grid()


def test_shipped_grid_holds_exactly_the_experiments_points(shipped):
    header = json.loads(practice.PRACTICE_GRID_PATH.read_text(encoding="utf-8"))
    assert header["steps"] == practice.STEPS
    assert header["lr_grid"] == list(practice.LR_GRID)
    assert {r.point for r in shipped} == set(practice.all_points())
    assert len(shipped) == len(practice.all_points())
    assert load_grid_file(practice.PRACTICE_GRID_PATH)[0].point == shipped[0].point


def test_every_shipped_result_carries_forgetting_or_is_marked_diverged(shipped):
    for r in shipped:
        if r.diverged:
            assert r.forgetting is None and r.extra.get("diverged")
            continue
        assert set(r.forgetting) == set(PRETRAIN_TASKS), r.point
        assert len(r.losses) == r.point.steps and math.isfinite(r.heldout["loss"])


def test_every_setting_of_the_shipped_grid_has_a_best_lr_that_trains(shipped):
    """Each sort_desc lr sweep brackets a best: some rate trains (well above the base's ~0%).

    On shift, 200 steps teach no LoRA target set whole answers (that is why the long runs
    exist); the long runs must show the finding the notebook states.
    """
    sort_desc = [r for r in shipped if r.point.task == practice.LR_TASK]
    for setting, best in practice.best_by_lr(sort_desc).items():
        assert best.heldout["accuracy"] > 0.05, setting
    long = {p: r for r in shipped for p in practice.layer_long_points() if r.point == p}
    pairs = zip(practice.LAYER_SETS, practice.layer_long_points(), strict=True)
    accuracy = {name: long[p].heldout["accuracy"] for name, p in pairs}
    assert accuracy["all-linear"] > 0.9 and accuracy["MLP"] > 0.9 and accuracy["q,v"] < 0.5
    lr_settings = {(p.rank, p.rslora) for p in practice.lr_points()}
    found = {(b.point.rank, b.point.rslora) for b in practice.best_by_lr(shipped).values()
             if b.point.task == practice.LR_TASK and b.point.replay == 0
             and b.point.targets in (ALL_TARGETS_SORTED, ())}  # fmt: skip
    assert lr_settings <= found


@pytest.mark.parametrize(
    ("results", "exc", "words"),
    [
        (None, TypeError, "results must be a list of SweepResults"),
        ("abc", TypeError, "got str"),
        ({"a": 1}, TypeError, "got dict"),
        ([1, 2], TypeError, r"results\[0\] is of type int, not a SweepResult"),
        ([SweepPoint("rotate", 4)], TypeError, "pass the results, not their points"),
    ],
)
def test_the_helpers_refuse_what_is_not_a_list_of_results(results, exc, words):
    for helper in (practice.best_lr, practice.lr_curve, practice.best_by_lr, practice.learn_forget):
        with pytest.raises(exc, match=words):
            helper(results)


def test_best_lr_and_lr_curve_refuse_mixed_settings_and_name_what_differs():
    runs = [fake(SweepPoint("rotate", r, lr=lr), 0.5) for r in (1, 4) for lr in (1e-3, 1e-2)]
    with pytest.raises(ValueError, match=r"also differ in rank: pick one setting"):
        practice.best_lr(runs)
    with pytest.raises(ValueError, match=r"matching results differ in rank, not only in lr"):
        practice.lr_curve(runs)
    assert practice.lr_curve(runs, rank=4) == [(1e-3, 0.5), (1e-2, 0.5)]
    with pytest.raises(ValueError, match=r"\['colour'\] are not SweepPoint fields; valid: \["):
        practice.lr_curve(runs, colour="red")
    with pytest.raises(ValueError, match=r"no result matches rank='4' \(the results have \[1, 4\]"):
        practice.lr_curve(runs, rank="4")
    assert practice.lr_curve([], rank=4) == []  # nothing to plot
    replayed = [*runs[:2], fake(SweepPoint("rotate", 1, lr=3e-3, replay=0.05), 0.5)]
    with pytest.raises(ValueError, match=r"also differ in replay: pick"):
        practice.best_lr(replayed)  # a field left at its default is absent from to_dict
