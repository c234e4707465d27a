"""Exercise 5: explaining why rsLoRA lost a sweep tuned for alpha / r (a multiple choice)."""

from __future__ import annotations

import math

from ..analysis import format_table
from ..engine.cache import load_grid_file
from ..engine.summaries import select
from .feedback import Feedback, _no, _safe

__all__ = [
    "SWEEP_CHOICES",
    "check_sweep_answer",
    "sweep_evidence",
]


SWEEP_CHOICES: dict[str, tuple[str, str]] = {  # letter -> (choice, why it is right or wrong)
    "A": (
        "At rank 64 rsLoRA trains more parameters, so it overfits the training set.",
        "both rules train the same 65,536 parameters (the scaling is a number, not a "
        "parameter), and rsLoRA's training loss stays high too: it underfits, it does not overfit",
    ),
    "B": (
        "alpha / r is the better rule: one alpha and lr serve every rank, while alpha / sqrt(r) "
        "breaks down at high rank.",
        "that holds only at the alpha and lr the grid tuned for alpha / r. At one rank the rules "
        "differ only by a factor sqrt(r) in the scaling: rsLoRA at rank 64 with alpha 2 has "
        "exactly alpha / r's scaling at alpha 16 (2 / 8 = 16 / 64 = 0.25) and trains the same. "
        "Which rule looks better depends on which one alpha and lr were tuned for",
    ),
    "C": (
        "alpha / r makes ΔW grow with the rank, which is why alpha / r improves up to rank 64.",
        "alpha / r shrinks the scaling as the rank grows (2 at rank 8, 0.25 at rank 64); it "
        "improves because more rank means more capacity, at a step size that stays tame",
    ),
    "D": (
        "The comparison favours alpha / r: alpha 16 and lr 2e-2 were tuned for it. Under Adam "
        "each step moves A and B by about lr per entry whatever the gradient's scale, so ΔW's "
        "step grows with scaling x lr; at rank 64 alpha / sqrt(r) is 8 times alpha / r (2 "
        "instead of 0.25), too large a step. rsLoRA at its own tuned alpha (or lr) does "
        "comparably.",
        "with Adam the scaling acts like a learning-rate multiplier on ΔW, so each rule needs "
        "its own alpha (or lr): alpha / r keeps the step about level as the rank grows, rsLoRA "
        "needs about alpha / sqrt(r_tuned) (16 / sqrt(8) = 5.7 to match rank 8) or a smaller "
        "lr. A comparison at one rule's tuned settings says little about the other rule",
    ),
    "E": (
        "Rank 64 is more than a 128 x 128 layer can use, so rsLoRA's extra rank is thrown away.",
        "rank 64 is below min(in, out) = 128, and alpha / r at the same rank reaches 0.91: "
        "the rank itself is usable",
    ),
    "F": (
        "Adam moves A and B by about lr per step, and at rank 64 alpha / sqrt(r)'s scaling is "
        "8 times alpha / r's, so lr 2e-2 is too large a step for rsLoRA.",
        "right about the mechanism, but incomplete: a complete answer also says that the "
        "comparison depends on the alpha and lr each rule was tuned for (here alpha / r's), "
        "and how rsLoRA does at its own tuned alpha or lr",
    ),
    "G": (
        "It is seed noise: one unlucky run.",
        "the rsLoRA column falls steadily as the rank grows, and the repeated rank-8 runs agree "
        "within a couple of points: a drop of about 60 points is not noise",
    ),
}
SWEEP_ANSWER = "D"


def sweep_evidence() -> str:
    """The shipped grid on sort_desc at alpha 16: accuracy and final loss by rank, both rules."""
    results = select(load_grid_file(), task="sort_desc", alpha=16.0, dropout=0.0, seed=0)
    rows = []
    for rank in (8, 16, 32, 64):
        row: dict[str, object] = {"rank": rank}
        for rslora, label in ((False, "LoRA"), (True, "rsLoRA")):
            hits = [r for r in results if r.point.rank == rank and r.point.rslora == rslora]
            if hits:
                tail = hits[0].losses[-50:]  # the training loss where training ended
                row[f"{label} scaling"] = f"{16 / (math.sqrt(rank) if rslora else rank):.2f}"
                row[f"{label} acc"] = f"{hits[0].heldout['accuracy']:.2f}"
                row[f"{label} loss"] = f"{sum(tail) / len(tail):.2f}"
        rows.append(row)
    return format_table(rows)


@_safe
def check_sweep_answer(answer: object) -> Feedback:
    """Exercise 5: the letter of the explanation in SWEEP_CHOICES; every wrong one is explained."""
    letters = ", ".join(SWEEP_CHOICES)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return _no(f"no answer yet: set ANSWER to one letter, {letters}")
    if not isinstance(answer, str):
        return _no(f"ANSWER should be one letter in quotes, like 'A'; got {answer!r}")
    letter = answer.strip().strip(".)").strip().upper()
    if letter not in SWEEP_CHOICES:
        several = [c for c in letter if c in SWEEP_CHOICES]
        if len(several) > 1 and len(letter) <= 3 * len(several):
            return _no(f"answer one letter, the one explanation that is complete; got {answer!r}")
        return _no(f"answer one letter of {letters}; got {answer!r}")
    _, why = SWEEP_CHOICES[letter]
    if letter == SWEEP_ANSWER:
        return Feedback(True, f"{letter}: {why}.")
    return _no(f"{letter} is not it: {why}.")
