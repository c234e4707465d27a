"""Grades that depend only on the answers: autograding outside the submission's process.

lab.exercises.autograde runs a submission's cells in a sandboxed worker and each graded cell's
hidden test in the grader's own process. Here, submissions built from the assignment's source
(the graded cells carry their hidden tests, as nbgrader restores them) are graded directly:

- an honest complete answer scores full marks and an honest half-done one its exercises' points;
- the same half-done answers plus a cheat score exactly what they score without it, for every
  cheat in CHEATS (rebinding the checks, `grade`, torch.allclose, a check's helpers, builtins,
  the exercises module itself; a function that never returns; a cell that kills its process;
  frames forged on the grader's channel; tampering from inside an answer at call time; reading
  the answer key; writing the lab's grading code), and the feedback says when one tampered;
- the sandbox keeps files read-only and hides the course, the answer key and secrets, and
  grading one submission changes nothing for the next;
- the channel refuses malformed frames from the worker by name, without running anything.

The whole nbgrader round trip with this executor plugged in is tests/exercises/test_grading.py's.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import nbformat
import pytest

import lab.exercises.grading
from lab.exercises.autograde import grade_notebook
from lab.exercises.course import SOURCE, STUDENT

pytestmark = pytest.mark.usefixtures("bwrap")  # every test here starts a sandboxed worker


ROOT = Path(__file__).resolve().parents[2]


HALF = ("ex1_forward_answer", "ex3_count_answer", "ex5_sweep_answer")  # 2 + 2 + 1 points


def _gid(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def _is_test(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def _answer(source: str) -> str:
    return "\n".join(line for line in source.split("\n") if "### " not in line)


def submission(solved: tuple[str, ...] | str = (), cheats: dict[str, str] | None = None):
    """The released notebook as nbgrader hands it to autograde: its graded cells' hidden tests
    restored from the source; the answers in `solved` ("all" for every one) filled in from the
    answer key; each cheat's code appended to the cell with that grade id ("imports" is the
    first cell)."""
    key = {_gid(c): c for c in nbformat.read(SOURCE, as_version=4).cells if _gid(c)}
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        gid = _gid(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if gid is None:
            continue
        if _is_test(cell):
            cell.source = key[gid].source
        elif solved == "all" or gid in solved:
            cell.source = _answer(key[gid].source)
        if cheats and gid in cheats:
            cell.source += "\n\n" + cheats[gid]
    return nb


def points(nb) -> dict[str, float]:
    """Each graded cell's points as nbgrader counts them: none if its output holds an error
    or anything on stderr, all of them otherwise."""
    out = {}
    for cell in nb.cells:
        if _is_test(cell):
            failed = any(
                o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")
                for o in cell.outputs
            )
            out[_gid(cell)] = 0.0 if failed else float(cell.metadata.nbgrader.points)
    return out


def graded_text(nb, gid: str) -> str:
    cell = next(c for c in nb.cells if _gid(c) == gid)
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


def test_an_honest_complete_answer_scores_full_marks():
    nb = submission("all")
    changed = grade_notebook(nb)
    got = points(nb)
    total = sum(c.metadata.nbgrader.points for c in nb.cells if _is_test(c))
    assert sum(got.values()) == total, {
        g: graded_text(nb, g)[:300] for g, p in got.items() if not p
    }
    assert changed == []
    assert "Exercise 1: the forward pass: passed" in graded_text(nb, "ex1_forward")


def test_an_honest_half_done_answer_scores_its_exercises_and_each_hint_names_the_exercise(half):
    got = points(half)
    assert {g for g, p in got.items() if p} == {"ex1_forward", "ex3_count", "ex5_sweep"}
    assert sum(got.values()) == 5
    text = graded_text(half, "ex2_merge")
    assert text.startswith("Exercise 2: merge: not yet:"), text
    # The hint is whole in a wrapping HTML block; the error line only says where it is.
    cell = next(c for c in half.cells if _gid(c) == "ex2_merge")
    html = next(o for o in cell.outputs if o.output_type == "display_data").data["text/html"]
    assert "pre-wrap" in html and "not yet" in html
    error = next(o for o in cell.outputs if o.output_type == "error")
    assert error.traceback == ["NotPassed: Exercise 2: merge: not yet passed (the hint is above)"]
    assert "Exercise 9(b)" in graded_text(half, "ex9b_find_best_lr")


ANSWER_IDS = [
    _gid(c)
    for c in nbformat.read(SOURCE, as_version=4).cells
    if c.metadata.get("nbgrader", {}).get("solution")
]


ACCEPTANCE_CHEAT = """\
import torch, builtins
import lab, lab.exercises as ex
_ok = ex.Feedback(True, "looks fine")
for _n in dir(ex):
    if _n.startswith("check_"):
        setattr(ex, _n, lambda *a, **k: _ok)
ex.grade = lambda *a, **k: print("passed")
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
"""


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


@pytest.mark.parametrize("name", list(CHEATS))
def test_a_cheat_scores_what_the_honest_answer_scores(name, half):
    grading_code = hashlib.sha256(Path(lab.exercises.grading.__file__).read_bytes()).hexdigest()
    nb = submission(HALF, CHEATS[name])
    grade_notebook(nb, call_timeout=5, cell_timeout=30)  # short, for the ones that never end
    assert points(nb) == points(half), {g: graded_text(nb, g)[:300] for g in points(nb)}
    after = hashlib.sha256(Path(lab.exercises.grading.__file__).read_bytes()).hexdigest()
    assert after == grading_code, "a submission changed the lab's grading code"


def test_the_feedback_says_what_a_submission_rebound():
    nb = submission(HALF, {"imports": ACCEPTANCE_CHEAT})
    changed = grade_notebook(nb)
    for name in ("lab.exercises.check_forward", "lab.exercises.grade", "torch.allclose"):
        assert name in changed
    text = graded_text(nb, "ex1_forward")
    assert "Note: this notebook changed" in text and "torch.allclose" in text
    assert "changes no grade" in text


def test_a_function_that_never_returns_is_stopped_and_named():
    nb = submission(HALF, CHEATS["a function that never returns"])
    grade_notebook(nb, call_timeout=3)
    text = graded_text(nb, "ex2_merge")
    assert "TimeoutError" in text and "did not finish within 3 s" in text


def _forged_cell(grade_id: str, **meta) -> dict:
    return nbformat.v4.new_code_cell(
        "print('passed: everything')\n",
        metadata={
            "nbgrader": {
                "grade": True,
                "solution": False,
                "locked": True,
                "grade_id": grade_id,
                "points": 20,
                "schema_version": 3,
                **meta,
            }
        },
    )


@pytest.fixture(scope="module")
def through_nbgrader(tmp_path_factory):
    """nbgrader autograde on the released notebook: honest (unanswered) and four cheats."""
    from lab.exercises.course import ASSIGNMENT, _nbgrader, generate_release, make_course

    root = tmp_path_factory.mktemp("course")
    make_course(root)
    release = generate_release(root)

    def released():
        return nbformat.read(release, as_version=4)

    subs = {"honest": released()}
    nb = released()
    nb.cells.insert(1, nbformat.v4.new_code_cell(ACCEPTANCE_CHEAT))
    subs["rebinds"] = nb
    nb = released()  # a cell of its own claiming to be a graded test worth 20 points
    nb.cells.insert(1, _forged_cell("my_own_test"))
    subs["forged-test"] = nb
    nb = released()  # a graded test cell relabelled as an answer, its hidden test replaced
    for cell in nb.cells:
        if _gid(cell) == "ex1_forward":
            cell.metadata.nbgrader.update(solution=True, locked=False)
            cell.source = "print('passed')"
    subs["relabelled"] = nb
    nb = released()  # a second cell with a graded test's id, before the real one
    nb.cells.insert(1, _forged_cell("ex3_count", points=2))
    subs["duplicate-id"] = nb
    for student, notebook in subs.items():
        path = root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(notebook, path)
    refused = {}
    for student in subs:
        try:
            _nbgrader(root, "autograde", ASSIGNMENT, "--student", student, "--force", timeout=900)
        except RuntimeError as exc:  # nbgrader itself refuses a notebook it cannot validate
            refused[student] = str(exc)
    return root, list(subs), refused


def test_through_nbgrader_no_cheat_or_forged_cell_earns_a_point(through_nbgrader):
    import os

    from nbgrader.api import Gradebook

    from lab.exercises.course import ASSIGNMENT

    root, students, refused = through_nbgrader
    assert "honest" not in refused and "rebinds" not in refused, refused
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission(ASSIGNMENT, s).score for s in students if s not in refused}
    print("scores", scores, "refused by nbgrader", sorted(refused))
    assert scores == dict.fromkeys(scores, scores["honest"]), scores


def test_the_code_run_in_the_grader_is_the_gradebooks_whatever_the_submission_says(
    through_nbgrader,
):

    from lab.exercises.autograde import LabExecute
    from lab.exercises.course import ASSIGNMENT, SOURCE

    root = through_nbgrader[0]
    nb = submission()
    for cell in nb.cells:
        if _gid(cell) == "ex1_forward":
            cell.source = "import os\nos.system('touch /tmp/owned')"
            cell.metadata.nbgrader.update(solution=True, points=99)
    resources = {
        "nbgrader": {
            "db_url": f"sqlite:///{root / 'gradebook.db'}",
            "notebook": ASSIGNMENT,
            "assignment": ASSIGNMENT,
        }
    }
    tests = LabExecute().recorded_tests(nb, resources)
    key = {_gid(c): c.source for c in nbformat.read(SOURCE, as_version=4).cells if _gid(c)}
    assert {_gid(nb.cells[i]): src for i, src in tests.items()} == {
        gid: key[gid] for gid in key if gid in {_gid(nb.cells[i]) for i in tests}
    }
    assert len(tests) == 12
    cell = next(c for c in nb.cells if _gid(c) == "ex1_forward")
    assert cell.metadata.nbgrader.solution is False and cell.metadata.nbgrader.points == 2


def test_the_feedback_page_names_each_exercise_and_shows_each_hint_whole(through_nbgrader):
    from lab.exercises.course import ASSIGNMENT, _nbgrader

    root = through_nbgrader[0]
    _nbgrader(root, "generate_feedback", ASSIGNMENT, "--student", "honest", "--force")
    page = (root / "feedback" / "honest" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    toc = page[page.index('id="toc"') : page.index("</ol>", page.index('id="toc"'))]
    names = re.findall(r'<a href="#(ex\w+)">([^<]+)</a>: 0.0 of', toc)
    assert [n for _, n in names][:2] == ["Exercise 1: the forward pass", "Exercise 2: merge"]
    assert (
        "ex9b_find_best_lr",
        "Exercise 9(b): the best learning rate, predicted then found",
    ) in names
    assert len(names) == 12 and "Test cell" not in page
    # Each hint in a block that wraps, whole; the error line only points at it.
    assert "Exercise 3: count trainable parameters: not yet:" in page
    assert page.count("white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere") == 12
