"""Classroom exercises: each `check_*` says what is wrong with an answer, not only that it is.

A checker never raises on a wrong answer (None, a stub that raises, wrong shapes or types): it
returns a `Feedback` whose repr is "passed: ..." or "not yet: ...", so a notebook cell that ends
with the check shows it. A passing message holds no machine-dependent numbers (nbval compares it).

One module per exercise, each named for its check:
- forward_check (1), merge_check (2), count_check (3), budget_check (4), sweep_check (5),
  memory_check (6), nf4_check (7), dora_check (8);
- lr_prediction_check (9a), find_lr_check (9b) and layers_check (10), which read the shipped
  practice grid through practice_grid;
- compare: how a check compares a student's answer with the lab's;
- feedback: the verdict type and how a student's code is run;
- grading: `grade`, the one line an nbgrader hidden test runs (the same check, as a grade);
- course: an nbgrader course directory for the exercises (imports nbgrader; not loaded here);
- autograde (nbgrader's executor), submission (the worker process, from the grader's side),
  remote_function (a student's function called there), channel (the frames between the two),
  worker and sandbox: grading a submission in a sandboxed process of its own (imports nbgrader;
  not loaded here).
"""

from .budget_check import BUDGET, BUDGET_ACCURACY, BUDGET_TASK, check_budget, train_budget
from .compare import _close  # noqa: F401 (private: the tests reach it)
from .count_check import check_count
from .dora_check import _dora_case, _dora_mistakes, check_dora_forward  # noqa: F401
from .feedback import Feedback
from .find_lr_check import TRAPS, check_find_best_lr  # noqa: F401 (TRAPS: the tests reach it)
from .forward_check import RANK, SCALING, check_forward  # noqa: F401
from .grading import NotPassed, grade
from .layers_check import check_mlp_count, check_shift_targets
from .lr_prediction_check import check_lr_prediction, lr_evidence
from .memory_check import _state_bytes, check_memory  # noqa: F401
from .merge_check import check_merge
from .nf4_check import _nf4_blocks, check_nf4  # noqa: F401
from .practice_grid import LR_FACTOR, LR_RULE, SHIFT_BUDGET, SHIFT_TASK
from .sweep_check import SWEEP_ANSWER, SWEEP_CHOICES, check_sweep_answer, sweep_evidence  # noqa: F401

__all__ = [
    "BUDGET",
    "BUDGET_ACCURACY",
    "BUDGET_TASK",
    "SWEEP_CHOICES",
    "Feedback",
    "check_budget",
    "check_count",
    "check_dora_forward",
    "check_forward",
    "check_memory",
    "check_merge",
    "check_nf4",
    "check_sweep_answer",
    "train_budget",
    "sweep_evidence",
    "LR_FACTOR",
    "LR_RULE",
    "SHIFT_BUDGET",
    "SHIFT_TASK",
    "check_find_best_lr",
    "check_lr_prediction",
    "check_mlp_count",
    "check_shift_targets",
    "lr_evidence",
    "NotPassed",
    "grade",
]
