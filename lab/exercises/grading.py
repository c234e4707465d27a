"""Grades from the same checks that give a student instant feedback.

The exercises notebook is also an nbgrader assignment (course/lora_by_hand.ipynb, the answer key,
is its source). Each exercise is followed by a graded cell whose hidden test is one line,
``grade("check_forward", my_forward)``: it reruns the exercise's own check, so the grade and the
feedback a student saw can never disagree. A passing check prints its verdict and the cell earns
its points; a failing one raises `NotPassed`, whose message is the checker's hint ("the scaling
is not applied: ..."), and nbgrader shows it in the graded notebook's feedback.

When nbgrader autogrades, this line does not run in the student's kernel at all:
lab.exercises.autograde runs the submission's cells in a sandboxed process of their own and runs
each hidden test in the grader's process, where `lab.exercises` is the lab's own, untouched by
anything the notebook did. In a student's notebook (the answer key run by nbval, say) it looks
the check up by name in `lab.exercises`, so a function the notebook named ``check_forward``
changes nothing it runs.
"""

from __future__ import annotations

import contextlib
import io
import warnings

from .feedback import Feedback

__all__ = ["NotPassed", "grade"]


class NotPassed(AssertionError):
    """An exercise's check did not pass: the message is its hint (a graded cell earns 0)."""


def _checks() -> dict[str, object]:
    from lab import exercises

    return {n: getattr(exercises, n) for n in exercises.__all__ if n.startswith("check_")}


def grade(check: str, *answers: object) -> None:
    """Rerun `lab.exercises.<check>` on the answers; print its verdict, raise unless it passed.

    Warnings and anything written to stderr while checking are kept out of the cell's output:
    nbgrader gives zero points to a graded cell that writes to stderr, even when it passed.
    """
    checks = _checks()
    if check not in checks:
        raise ValueError(f"grade: unknown check {check!r}; the checks are {', '.join(checks)}")
    stderr = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("ignore")
        feedback = checks[check](*answers)
    if not isinstance(feedback, Feedback):
        raise TypeError(f"grade: {check} returned {type(feedback).__name__}, not a Feedback")
    if not feedback.passed:
        raise NotPassed(str(feedback))
    print(feedback)
    # Nothing is returned: nbgrader would read a value shown by the cell as partial credit.
