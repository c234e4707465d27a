"""Exercise 9b: a student's find_best_lr, run against trap sweeps and then the shipped grid."""

from __future__ import annotations

import copy
import math
import numbers
import pickle
from collections.abc import Callable, Iterable, Sequence

from ..analysis import format_table
from ..engine.points import ALL_TARGETS_SORTED, SweepPoint
from ..engine.results import SweepResult
from ..practice import (
    LR_TASK,
    best_lr,
)
from .compare import _as_number
from .feedback import Feedback, _call, _no, _safe
from .practice_grid import (
    LR_FACTOR,
    LR_RULE,
    _complete_bests,
    _grid,
    _lr_sweeps,
)

__all__ = [
    "check_find_best_lr",
]


FIND_CALL = "find_best_lr(results)"
FIND_TODO = (
    "Return the learning rate (a float, result.point.lr) of the run with the best held-out "
    "accuracy (result.heldout['accuracy']), the lower held-out loss breaking ties; skip runs "
    "with result.diverged."
)


def _trap(lr: float, accuracy: float, loss: float, train_loss: float) -> SweepResult:
    """A made-up rank-4 result on LR_TASK; a nan loss makes it a diverged run (accuracy 0)."""
    diverged = math.isnan(loss)
    return SweepResult(
        point=SweepPoint(LR_TASK, 4, 16.0, targets=ALL_TARGETS_SORTED, steps=300, lr=lr),
        losses=[2.5] if diverged else [2.5, train_loss],
        heldout={"loss": loss, "accuracy": 0.0 if diverged else accuracy, "n": 512},
        train_eval=None,
        trainable_parameters=18_432,
        total_parameters=423_552,
        memory=None,
        wall_seconds=0.0,
        tokens_per_second=0.0,
        device="cpu",
        date="",
        extra={"diverged": "loss became nan"} if diverged else {},
        diverged=diverged,
    )


_NAN = math.nan
# (what the sweep is like, its runs as (lr, held-out accuracy, held-out loss, final training
# loss)); each case's best is neither its largest nor its smallest lr, nor where it is listed.
TRAPS: tuple[tuple[str, tuple[tuple[float, float, float, float], ...]], ...] = (
    (
        "a sweep whose two highest rates diverged (held-out loss nan, accuracy 0), listed "
        "first, and every trained run still at accuracy 0 (the loss decides)",
        (
            (1e-1, 0.0, _NAN, _NAN),
            (3e-2, 0.0, _NAN, _NAN),
            (1e-4, 0.0, 2.6, 2.5),
            (1e-3, 0.0, 1.9, 1.8),
            (3e-4, 0.0, 2.2, 2.0),
        ),
    ),
    (
        "a sweep, rates unsorted, where lr 3e-2 has the lowest training loss but overfits",
        (
            (3e-3, 0.80, 0.50, 0.45),
            (3e-2, 0.70, 0.90, 0.05),
            (1e-1, 0.10, 2.00, 1.50),
            (1e-2, 0.88, 0.40, 0.30),
            (1e-3, 0.60, 0.80, 0.70),
        ),
    ),
    (
        "a sweep where the best accuracy and the lowest held-out loss are different runs",
        (
            (1e-2, 0.90, 0.30, 0.25),
            (3e-2, 0.50, 1.20, 0.10),
            (3e-3, 0.92, 0.35, 0.30),
            (1e-3, 0.75, 0.60, 0.55),
        ),
    ),
    (
        "a sweep where two runs tie on accuracy (0.90), the one with the lower loss listed second",
        (
            (1e-2, 0.90, 0.50, 0.40),
            (3e-3, 0.90, 0.30, 0.35),
            (1e-3, 0.70, 0.70, 0.60),
            (3e-2, 0.60, 0.90, 0.20),
        ),
    ),
    (
        "a sweep where two runs tie on accuracy (0.95), the one with the lower loss listed first",
        (
            (3e-2, 0.95, 0.20, 0.30),
            (1e-3, 0.80, 0.50, 0.45),
            (1e-2, 0.95, 0.35, 0.25),
            (1e-1, 0.30, 1.50, 0.10),
            (3e-3, 0.85, 0.40, 0.40),
        ),
    ),
)


def _trained(case: Sequence[SweepResult]) -> list[SweepResult]:
    return [r for r in case if not r.diverged]


def _first_best(case: Sequence[SweepResult], key: Callable[[SweepResult], object]) -> float:
    return max(case, key=key).point.lr


# (hint, what a function with that mistake returns on a sweep), in the order they are tried.
_FIND_MISTAKES: tuple[tuple[str, Callable[[Sequence[SweepResult]], float]], ...] = (
    (
        "you ranked by the training loss (result.losses): the lowest training loss can be the "
        "run that memorised its data. The best rate is the one that generalises: rank by "
        "held-out accuracy, result.heldout['accuracy']",
        lambda c: min(_trained(c), key=lambda r: r.losses[-1]).point.lr,
    ),
    (
        "you took the lowest held-out loss: rank by held-out accuracy first, the loss only "
        "breaks ties",
        lambda c: min(_trained(c), key=lambda r: r.heldout["loss"]).point.lr,
    ),
    (
        "a diverged run came out best: skip runs with result.diverged (their held-out loss is "
        "nan, which no comparison handles) before comparing",
        lambda c: _first_best(c, lambda r: (r.heldout["accuracy"], -r.heldout["loss"])),
    ),
    (
        "ties are broken the wrong way: among runs with equal accuracy the lower held-out loss "
        "wins (sort keys: accuracy up, loss down)",
        lambda c: _first_best(_trained(c), lambda r: (r.heldout["accuracy"], r.heldout["loss"])),
    ),
    (
        "ties are not broken: among runs with equal held-out accuracy, take the one with the "
        "lower held-out loss, wherever it is listed",
        lambda c: _first_best(_trained(c), lambda r: r.heldout["accuracy"]),
    ),
    (
        "you returned the largest learning rate: compare the runs' held-out accuracies, not "
        "their rates",
        lambda c: max(r.point.lr for r in c),
    ),
    (
        "you returned the largest learning rate that did not diverge: the best rate is often "
        "below the edge of stability; compare held-out accuracies",
        lambda c: max(r.point.lr for r in _trained(c)),
    ),
    (
        "you returned the smallest learning rate: compare the runs' held-out accuracies",
        lambda c: min(r.point.lr for r in c),
    ),
    (
        "you returned the first run's rate: the results come in no particular order; compare "
        "held-out accuracies",
        lambda c: c[0].point.lr,
    ),
    (
        "you returned the last run's rate: the results are not sorted, by lr or by anything "
        "else; compare held-out accuracies",
        lambda c: c[-1].point.lr,
    ),
)


def _find_answer(answer: object, case: Sequence[SweepResult]) -> tuple[float | None, str]:
    """(the lr returned, '') or (None, what is wrong with what find_best_lr returned)."""
    answer = _as_number(answer)
    if answer is None:
        return None, f"find_best_lr returned None. {FIND_TODO}"
    if isinstance(answer, SweepResult):
        return None, "find_best_lr returned the result itself: return its rate, result.point.lr"
    if isinstance(answer, SweepPoint):
        return None, "find_best_lr returned the point: return its rate, point.lr"
    if not isinstance(answer, numbers.Real) or isinstance(answer, bool):
        return None, f"find_best_lr returned a {type(answer).__name__}; expected one float, the lr"
    lrs = sorted({r.point.lr for r in case})
    if match := [lr for lr in lrs if math.isclose(answer, lr, rel_tol=1e-6)]:
        return match[0], ""  # 1e-6: a float32 tensor of the rate is the rate
    if any(math.isclose(answer, r.heldout["accuracy"], abs_tol=1e-12) for r in case):
        return None, (
            f"find_best_lr returned {answer!r}, a held-out accuracy, not a learning rate: "
            "return the best run's result.point.lr"
        )
    if any(math.isclose(answer, r.heldout["loss"], abs_tol=1e-12) for r in case):
        return None, f"find_best_lr returned {answer!r}, a held-out loss: return result.point.lr"
    if isinstance(answer, numbers.Integral) and 0 <= answer < len(case):
        return None, (
            f"find_best_lr returned {answer!r}, a position in the list: return the run's "
            "learning rate itself, result.point.lr"
        )
    return None, (
        f"find_best_lr returned {answer!r}, which is not one of the rates in the sweep "
        f"({', '.join(f'{lr:g}' for lr in lrs)}). {FIND_TODO}"
    )


def _find_hint(answers: Sequence[float], cases: Sequence[Sequence[SweepResult]], wrong: int) -> str:
    """The mistake that explains every answer, else one that explains the first wrong one."""
    for hint, mistake in _FIND_MISTAKES:
        if all(math.isclose(a, mistake(c)) for a, c in zip(answers, cases, strict=True)):
            return hint
    case, answer = cases[wrong], answers[wrong]
    if any(r.diverged and math.isclose(r.point.lr, answer) for r in case):
        return _FIND_MISTAKES[2][0]
    for hint, mistake in _FIND_MISTAKES:
        if math.isclose(answer, mistake(case)):
            return hint
    return FIND_TODO


def _describe_run(case: Sequence[SweepResult], lr: float) -> str:
    run = next(r for r in case if math.isclose(r.point.lr, lr))
    if run.diverged:
        return f"lr {lr:g} (diverged)"
    return f"lr {lr:g} (accuracy {run.heldout['accuracy']:.2f}, loss {run.heldout['loss']:.2f})"


def _run_find(fn: object, case: Sequence[SweepResult]) -> tuple[float | None, Feedback | None]:
    """find_best_lr on a copy of the sweep: (lr, None), or feedback (also if it changed it)."""
    given = copy.deepcopy(list(case))
    kept, before = list(given), pickle.dumps(given)
    out, problem = _call(fn, "find_best_lr", FIND_TODO, given, call=FIND_CALL)
    if problem:
        return None, problem
    if pickle.dumps(given) != before:  # like exercises 1, 2 and 7: a caller's data stays as given
        if len(given) != len(kept):
            what = f"it now holds {len(given)} of the {len(kept)} runs (removed or added in place)"
        elif sorted(map(id, given)) == sorted(map(id, kept)) and given != kept:
            what = "its runs are in another order (sorted in place: results.sort(...))"
        else:
            what = "a run in it was changed"
        return None, _no(
            f"find_best_lr changed the list it was given: {what}. The caller's results must "
            "stay as they were: use sorted(results, ...), max(...) or a new list instead"
        )
    lr, why = _find_answer(out, case)
    return lr, _no(why) if why else None


def _ratio_report(sweeps: dict[tuple[int | None, bool], list[SweepResult]]) -> str:
    """Best LoRA lr over best full lr per rank and rule, beside the published ~10x."""
    full = best_lr(sweeps[(None, False)]).point.lr
    best = _complete_bests(sweeps)
    rows = []
    for rank in sorted({rank for rank, _ in best}):
        row: dict[str, object] = {"rank": rank}
        for rslora, label in ((False, "alpha/r"), (True, "rsLoRA")):
            lr = best.get((rank, rslora))
            row[f"{label} best lr"] = "-" if lr is None else f"{lr:g}"
            row[f"{label} / full"] = "-" if lr is None else f"{lr / full:.3g}x"
        rows.append(row)
    plain = {rank: lr for (rank, rslora), lr in best.items() if not rslora}
    if not plain:
        return format_table(rows)
    ratios = [lr / full for lr in plain.values()]
    near = sum(LR_RULE / LR_FACTOR <= q <= LR_RULE * LR_FACTOR for q in ratios)
    spread = max(plain.values()) / min(plain.values())
    lo, hi = min(ratios), max(ratios)
    span = f"{lo:.3g}x" if math.isclose(lo, hi) else f"{lo:.3g}x to {hi:.3g}x"
    moves = (
        "the same rate at every rank"
        if math.isclose(spread, 1)
        else f"best rates {spread:.3g}x apart across ranks"
    )
    return (
        f"Full fine-tuning's best on {LR_TASK}: lr {full:g}. The grid's rates are about half "
        "a decade (3x) apart, so a ratio is known to within a step of about 3.\n"
        + format_table(rows)
        + f"\nPublished (LoRA Without Regret): about 10x, and under alpha/r nearly the same rate "
        f"at every rank. Measured here under alpha/r: {span} "
        f"({near} of {len(ratios)} ranks within a factor {LR_FACTOR:g} of 10x), {moves} "
        f"({', '.join(f'r{k}' for k in sorted(plain))})."
    )


@_safe
def check_find_best_lr(fn: Callable, results: Iterable[SweepResult] | None = None) -> Feedback:
    """Exercise 9b: find_best_lr(results) -> the lr of the best held-out accuracy (ties: loss).

    Run first on TRAPS, then on every sweep of the grid's learning-rate experiment.
    """
    cases = [[_trap(*run) for run in runs] for _, runs in TRAPS]
    answers: list[float] = []
    wrong = None
    for case in cases:
        lr, problem = _run_find(fn, case)
        if problem or lr is None:
            return problem or _no(FIND_TODO)
        answers.append(lr)
        if wrong is None and not math.isclose(lr, best_lr(case).point.lr):
            wrong = len(answers) - 1
    if wrong is not None:  # which run is best is not shown: the traps are the same every time
        case = cases[wrong]
        return _no(
            f"on {TRAPS[wrong][0]}, you return {_describe_run(case, answers[wrong])}, not the "
            f"best run: {_find_hint(answers, cases, wrong)}"
        )
    grid, problem = _grid(results)
    if problem:
        return problem
    sweeps = _lr_sweeps(grid)
    if (None, False) not in sweeps or not any(k[0] for k in sweeps):
        return _no(
            "the practice grid lacks the learning-rate experiment (full fine-tuning and LoRA "
            f"on {LR_TASK}): rebuild it with scripts/make_practice_grid.py"
        )
    for (rank, rslora), sweep in sweeps.items():
        if all(r.diverged for r in sweep):
            continue  # no best to find
        lr, problem = _run_find(fn, sweep)
        if problem or lr is None:
            return problem or _no(FIND_TODO)
        want = best_lr(sweep).point.lr
        if not math.isclose(lr, want):
            name = "full fine-tuning" if rank is None else f"rank {rank}"
            name += " rsLoRA" if rslora else ""
            return _no(
                f"on the shipped grid's {name} sweep you return {_describe_run(sweep, lr)}, not "
                f"the best run: {_find_hint([lr], [sweep], 0)}"
            )
    return Feedback(
        True,
        f"find_best_lr finds the best rate on {len(TRAPS)} trap sweeps and on all "
        f"{len(sweeps)} sweeps of the shipped grid.\n" + _ratio_report(sweeps),
    )
