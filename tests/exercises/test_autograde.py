"""Grades that depend only on the answers: autograding outside the submission's process.

lab.exercises.autograde runs a submission's cells in a sandboxed worker and each graded cell's
hidden test in the grader's own process. Here, submissions built from the assignment's source
(the graded cells carry their hidden tests, as nbgrader restores them) are graded directly:

- an honest half-done answer scores its exercises' points;
- the same half-done answers plus a cheat score exactly what they score without it, for every
  cheat in CHEATS (rebinding the checks, `grade`, torch.allclose, a check's helpers, builtins,
  the exercises module itself; a function that never returns; a cell that kills its process;
  frames forged on the grader's channel; tampering from inside an answer at call time; reading
  the answer key; writing the lab's grading code), and the feedback says when one tampered;
- the sandbox keeps files read-only and hides the course, the answer key and secrets, and
  grading one submission changes nothing for the next.

Each submission is graded once (a sandboxed worker each: Python, torch and the lab), and every
test that reads it shares that grading. This executor plugged into `nbgrader autograde` (an
honest complete answer's full marks, cheats and forged nbgrader metadata, the code the grader
runs, the feedback page) is tests/exercises/test_grading.py's, in one graded course.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat
import pytest
from exercise_kit import ACCEPTANCE_CHEAT, grade_id, is_graded_test, submission

import lab.exercises.grading
from lab.exercises.autograde import grade_notebook
from lab.exercises.course import SOURCE

pytestmark = pytest.mark.usefixtures("bwrap")  # every test here starts a sandboxed worker


HALF = ("ex1_forward_answer", "ex3_count_answer", "ex5_sweep_answer")  # 2 + 2 + 1 points


def points(nb) -> dict[str, float]:
    """Each graded cell's points as nbgrader counts them: none if its output holds an error
    or anything on stderr, all of them otherwise."""
    out = {}
    for cell in nb.cells:
        if is_graded_test(cell):
            failed = any(
                o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")
                for o in cell.outputs
            )
            out[grade_id(cell)] = 0.0 if failed else float(cell.metadata.nbgrader.points)
    return out


def graded_text(nb, gid: str) -> str:
    cell = next(c for c in nb.cells if grade_id(c) == gid)
    return "\n".join(
        o.get("text") or o.get("data", {}).get("text/plain") or o.get("evalue", "")
        for o in cell.outputs
    )


@pytest.fixture(scope="module")
def half():
    """The honest half-done submission, graded: the reference for every cheat."""
    nb = submission(HALF)
    grade_notebook(nb)
    return nb


def test_an_honest_half_done_answer_scores_its_exercises_and_each_hint_names_the_exercise(half):
    got = points(half)
    assert {g for g, p in got.items() if p} == {"ex1_forward", "ex3_count", "ex5_sweep"}
    assert sum(got.values()) == 5
    text = graded_text(half, "ex2_merge")
    assert text.startswith("Exercise 2: merge: not yet:"), text
    # The hint is whole in a wrapping HTML block; the error line only says where it is.
    cell = next(c for c in half.cells if grade_id(c) == "ex2_merge")
    html = next(o for o in cell.outputs if o.output_type == "display_data").data["text/html"]
    assert "pre-wrap" in html and "not yet" in html
    error = next(o for o in cell.outputs if o.output_type == "error")
    assert error.traceback == ["NotPassed: Exercise 2: merge: not yet passed (the hint is above)"]
    assert "Exercise 9(b)" in graded_text(half, "ex9b_find_best_lr")


ANSWER_IDS = [
    grade_id(c)
    for c in nbformat.read(SOURCE, as_version=4).cells
    if c.metadata.get("nbgrader", {}).get("solution")
]


CHEATS = {
    "rebinds every check, grade, torch.allclose and torch.equal": {"imports": ACCEPTANCE_CHEAT},
    "rebinds the checks' helpers and the verdict": {
        "imports": (
            "import lab.exercises.forward_check as c, lab.exercises.feedback as f\n"
            "c._close = lambda a, b: True\n"
            "f.Feedback.__str__ = lambda self: 'passed: fine'\n"
            "f.Feedback.passed = property(lambda self: True)\n"
        )
    },
    "replaces lab.exercises in sys.modules": {
        "imports": (
            "import sys, types, lab\n"
            "fake = types.ModuleType('lab.exercises')\n"
            "fake.grade = lambda *a, **k: print('passed: fine')\n"
            "sys.modules['lab.exercises'] = fake\n"
            "lab.exercises = fake\n"
        )
    },
    "rebinds builtins the checks use": {
        "ex5_sweep_answer": (
            "import builtins\n"
            "builtins.all = lambda *a, **k: True\n"
            "builtins.any = lambda *a, **k: False\n"
            "builtins.sum = lambda *a, **k: 0\n"
        )
    },
    "a function that never returns": {
        "ex2_merge_answer": "def my_merge(layer):\n    while True:\n        pass\n"
    },
    "a cell that ends its own process": {"ex2_merge_answer": "import os\nos._exit(3)\n"},
    "frames forged on the grader's channel": {
        "ex3_count_answer": (
            "import json, os, struct\n"
            "_fake = json.dumps({'values': {'ANSWER': 'D'}, 'outputs': [], 'ok': True}).encode()\n"
            "for _fd in range(3, 64):\n"
            "    try:\n"
            "        os.write(_fd, struct.pack('>I', len(_fake)) + _fake)\n"
            "    except OSError:\n"
            "        pass\n"
        )
    },
    "tampers from inside its answer when called": {
        "ex7_nf4_answer": (
            "def my_quantize(block):\n"
            "    import torch, lab.exercises.nf4_check as c\n"
            "    c._close = lambda a, b: True\n"
            "    torch.equal = lambda *a, **k: True\n"
            "    return None\n"
        )
    },
    # after each answer cell: that exercise's worked answer, read from the answer key
    "runs the answer key": {
        gid: (
            "import json\n"
            f"_key = json.load(open({str(SOURCE)!r}))\n"
            "for _cell in _key['cells']:\n"
            f"    if _cell['metadata'].get('nbgrader', {{}}).get('grade_id') == {gid!r}:\n"
            "        exec(''.join(_cell['source']))\n"
        )
        for gid in ANSWER_IDS
    },
    "a cell that never ends": {"ex6_memory_answer": "while True:\n    pass\n"},
    "asks for all the memory there is": {
        "ex6_memory_answer": "import torch\n_hog = torch.ones(2**40, dtype=torch.uint8)\n"
    },
    "fills its disk": {
        "ex6_memory_answer": (
            "import os\n"
            "with open(os.path.expanduser('~/fill'), 'wb') as _f:\n"
            "    for _ in range(2048):\n"
            "        _f.write(b'0' * 2**20)\n"
        )
    },
    "writes the lab's grading code": {
        "imports": (
            "import lab.exercises.grading as g\n"
            "open(g.__file__, 'a').write('\\ngrade = lambda *a, **k: print(\"passed\")\\n')\n"
        )
    },
}


CALL_TIMEOUT_S = 3  # a call by a check: the calls of an honest answer take well under 0.1 s
CELL_TIMEOUT_S = {  # one cell: 30 s, and 15 s where a cell never ends (then it costs the 15 s)
    name: 15 if name == "a cell that never ends" else 30 for name in CHEATS
}  # an honest cell took 5 s at most at a load average of 9 on 2 cores


def grading_code() -> str:
    return hashlib.sha256(Path(lab.exercises.grading.__file__).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cheated():
    """name -> the half-done submission with that cheat, graded (once, by the first test that
    asks): (notebook, what it rebound, the grading code's hash before, and after)."""
    graded = {}

    def grade(name: str):
        if name not in graded:
            before = grading_code()
            nb = submission(HALF, CHEATS[name])
            changed = grade_notebook(
                nb, call_timeout=CALL_TIMEOUT_S, cell_timeout=CELL_TIMEOUT_S[name]
            )
            graded[name] = nb, changed, before, grading_code()
        return graded[name]

    return grade


@pytest.mark.parametrize("name", list(CHEATS))
def test_a_cheat_scores_what_the_honest_answer_scores(name, half, cheated):
    nb, _, before, after = cheated(name)
    assert points(nb) == points(half), {g: graded_text(nb, g)[:300] for g in points(nb)}
    assert after == before, "a submission changed the lab's grading code"


def test_the_feedback_says_what_a_submission_rebound(cheated):
    nb, changed, _, _ = cheated("rebinds every check, grade, torch.allclose and torch.equal")
    for name in ("lab.exercises.check_forward", "lab.exercises.grade", "torch.allclose"):
        assert name in changed
    text = graded_text(nb, "ex1_forward")
    assert "Note: this notebook changed" in text and "torch.allclose" in text
    assert "changes no grade" in text


def test_a_function_that_never_returns_is_stopped_and_named(cheated):
    nb, _, _, _ = cheated("a function that never returns")
    text = graded_text(nb, "ex2_merge")
    assert "TimeoutError" in text and f"did not finish within {CALL_TIMEOUT_S} s" in text
