"""Classroom exercises: each `check_*` says what is wrong with an answer, not only that it is.

A checker never raises on a wrong answer (None, a stub that raises, wrong shapes or types): it
returns a `Feedback` whose repr is "passed: ..." or "not yet: ...", so a notebook cell that ends
with the check shows it. A passing message holds no machine-dependent numbers (nbval compares it).

- core: exercises 1 to 8 (forward, merge, counting, a budget, a sweep, memory, NF4, DoRA);
- practice: exercises 9 and 10 (the best learning rate; which layers under a budget), read
  from the shipped practice grid;
- feedback: the verdict type and how a student's code is run;
- grading: `grade`, the one line an nbgrader hidden test runs (the same check, as a grade);
- course: an nbgrader course directory for the exercises (imports nbgrader; not loaded here).
"""

from .core import *  # noqa: F403
from .core import (  # noqa: F401 (private: the tests reach these)
    RANK,
    SCALING,
    SWEEP_ANSWER,
    _close,
    _dora_case,
    _dora_mistakes,
    _nf4_blocks,
    _state_bytes,
)
from .core import __all__ as _core_all
from .grading import NotPassed, grade
from .practice import *  # noqa: F403
from .practice import TRAPS  # noqa: F401
from .practice import __all__ as _practice_all

__all__ = [*_core_all, *_practice_all, "NotPassed", "grade"]
