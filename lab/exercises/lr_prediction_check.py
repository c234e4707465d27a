"""Exercise 9a: predicting LoRA's best learning rate from full fine-tuning's (about 10x)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

from ..analysis import format_table
from ..engine.results import SweepResult
from ..practice import (
    LR_TASK,
    best_lr,
)
from .compare import _as_number
from .feedback import Feedback, _no, _safe
from .practice_grid import (
    LR_FACTOR,
    LR_RULE,
    _complete_bests,
    _grid,
    _lr_sweeps,
)

__all__ = [
    "check_lr_prediction",
    "lr_evidence",
]


def _best_full(results: Sequence[SweepResult]) -> tuple[SweepResult | None, Feedback | None]:
    """Full fine-tuning's best run on LR_TASK, or feedback if the grid has none."""
    full = _lr_sweeps(results).get((None, False), [])
    trained = [r for r in full if not r.diverged]
    if not trained:
        found = f"{len(full)} found, all diverged" if full else "none found"
        return None, _no(
            f"the practice grid holds no trained full fine-tuning run on {LR_TASK} ({found}): "
            "rebuild it with scripts/make_practice_grid.py"
        )
    return best_lr(trained), None


def lr_evidence(results: Iterable[SweepResult] | None = None) -> str:
    """Full fine-tuning on sort_desc in the shipped grid: held-out accuracy and loss per lr."""
    grid, problem = _grid(results)
    if problem:
        return str(problem)
    best, problem = _best_full(grid)
    if problem or best is None:
        return str(problem)
    sweep = sorted(_lr_sweeps(grid)[(None, False)], key=lambda r: r.point.lr)
    rows = [
        {
            "lr": f"{r.point.lr:g}",
            "accuracy": "diverged" if r.diverged else f"{r.heldout['accuracy']:.2f}",
            "loss": "nan" if r.diverged else f"{r.heldout['loss']:.3f}",
        }
        for r in sweep
    ]
    return (
        f"full fine-tuning on {LR_TASK}, {best.point.steps} steps, held-out:\n"
        + format_table(rows)
        + f"\nbest: lr {best.point.lr:g} (held-out accuracy {best.heldout['accuracy']:.2f})"
    )


def _prediction_hint(ratio: float, lora_lr: float, full: float) -> str:
    """What a prediction `ratio` times full fine-tuning's best lr got wrong."""
    if lora_lr >= 1:
        return (
            f"a learning rate of {lora_lr:g} would wreck any run: is it the ratio rather than a "
            f"rate? Multiply full fine-tuning's best, {full:g}, by the rule's factor"
        )
    if 1 / 1.25 <= ratio <= 1.25:
        return (
            "that is full fine-tuning's own best rate. The rule says LoRA's best is about 10 "
            "times higher: B starts at 0 and only a low-rank slice of each weight moves, so "
            "the adapters need a larger step to change the model as much"
        )
    if math.isclose(ratio, 1 / LR_RULE, rel_tol=0.25):
        return (
            "that is full fine-tuning's rate divided by 10: the rule goes the other way, "
            "LoRA's best rate is about 10 times higher, not lower"
        )
    if ratio < 1:
        return "that is lower than full fine-tuning's best: LoRA's best rate is higher, about 10x"
    if LR_RULE**2 / LR_FACTOR <= ratio <= LR_RULE**2 * LR_FACTOR:
        return "that is about 100x: an order of magnitude too far, the rule is about 10x"
    if ratio < LR_RULE:
        return "too small a step up: the rule is about 10x"
    return "too large a step up: the rule is about 10x"


@_safe
def check_lr_prediction(lora_lr: object, results: Iterable[SweepResult] | None = None) -> Feedback:
    """Exercise 9a: LoRA's best lr, by the published rule (within LR_FACTOR of 10x full
    fine-tuning's best) or as the grid measured it (alpha / r's best rate at every rank)."""
    if lora_lr is None:
        return _no(
            "no prediction yet: set LORA_LR to the learning rate you expect to be best for "
            "LoRA, given full fine-tuning's best above"
        )
    lora_lr = _as_number(lora_lr)
    number = isinstance(lora_lr, numbers.Real) and not isinstance(lora_lr, bool)
    if not number or not math.isfinite(lora_lr) or lora_lr <= 0:
        return _no(f"LORA_LR should be a positive number, a learning rate like 1e-3: {lora_lr!r}")
    grid, problem = _grid(results)
    if problem:
        return problem
    best, problem = _best_full(grid)
    if problem or best is None:
        return problem or _no("no full fine-tuning run to compare with")
    full = best.point.lr
    ratio = lora_lr / full
    measured = _complete_bests(_lr_sweeps(grid))
    hits = [k for (k, rslora), lr in measured.items() if not rslora and math.isclose(lora_lr, lr)]
    if hits:  # what the data say is a right answer too: say how it compares with the rule
        ranks = ", ".join(str(r) for r in sorted(hits))
        return Feedback(
            True,
            f"LORA_LR = {lora_lr:g} is the rate the grid measured best for LoRA (alpha / r, "
            f"ranks {ranks}), {ratio:.3g}x full fine-tuning's best ({full:g}). The published "
            f"rule, about {LR_RULE:g}x (LoRA Without Regret), predicts {LR_RULE * full:g}: a "
            "round figure read off other models' curves, and this grid's rates are half a "
            "decade apart, so a ratio is known here only to within a step of about 3. Part (b) "
            "shows both side by side.",
        )
    if LR_RULE / LR_FACTOR <= ratio <= LR_RULE * LR_FACTOR:
        return Feedback(
            True,
            f"LORA_LR = {lora_lr:g} is {ratio:.3g}x full fine-tuning's best ({full:g}), within "
            f"a factor {LR_FACTOR:g} of the published 10x. Part (b) finds what the grid measured.",
        )
    near = [
        lr for (_, rslora), lr in measured.items() if not rslora and lr / 1.5 < lora_lr < 1.5 * lr
    ]
    hint = (
        f"near the rate the grid measured best ({near[0]:g}) but not it: give the measured rate "
        f"itself, or the published rule's prediction, about {LR_RULE:g}x"
        if near
        else _prediction_hint(ratio, float(lora_lr), full)
    )
    return _no(f"you predict {lora_lr:g}, {ratio:.3g}x full fine-tuning's best ({full:g}): {hint}")
