"""The exercises as an nbgrader assignment: generated, released, autograded with no server.

course/lora_by_hand.ipynb (the answer key, outside the students' notebooks/) is the source;
notebooks/exercises/student.ipynb must be exactly what `nbgrader generate_assignment` releases
from it (outputs aside: the committed copy is executed for nbval), and mentions no solutions.
Autograding the answer key gives full marks; a submission with typical mistakes gets the points
of the exercises it got right, and the checker's own hint for each one it got wrong shows in the
graded notebook's feedback. Only a graded cell the student edited logs "checksum has changed".
Through `nbgrader autograde` with the lab's executor, no cheat cell and no forged nbgrader
metadata earns a point, the code run in the grader is the gradebook's, and the feedback page
names each exercise. nbgrader works in the course without an activated venv, and the export for
a learning platform has one row per student.

One course holds every submission, each autograded once (an autograde starts nbgrader, torch
and a sandboxed worker per submission): "ada" (the answer key's answers) and "ben" (typical
mistakes) by two `nbgrader autograde --student` at once, docs/grading.md's way to grade a class
in parallel; then "honest" (the release untouched) and the submissions that cheat on nbgrader's
side, in one autograde (beside it, alone, the one nbgrader stops a run of several at). Every
test reads that gradebook, its logs and its feedback pages.
tests/test_class_roundtrip.py runs the whole round trip with real accounts.
"""

from __future__ import annotations

import csv
import html
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from exercise_kit import ACCEPTANCE_CHEAT, MISTAKES, answer, cells_by_id, grade_id, submission

from lab.exercises import SWEEP_CHOICES, grade
from lab.exercises.course import (
    ASSIGNMENT,
    CODE_STUB,
    INSTRUCTOR_TAG,
    SOURCE,
    STUDENT,
    LmsExport,
    _nbgrader,
    generate_release,
    make_course,
)

BIN = str(Path(sys.executable).parent)  # nbgrader's Gradebook runs `alembic` from PATH


def without_outputs(nb) -> list[dict]:
    """Each cell as nbgrader wrote it, less what executing the notebook adds."""
    return [
        {"id": c.get("id"), "type": c.cell_type, "source": c.source, "metadata": c.metadata}
        for c in nb.cells
    ]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course with the assignment generated (nbgrader's gradebook in its own folder)."""
    root = tmp_path_factory.mktemp("course")
    make_course(root)
    release = generate_release(root)
    return root, release


TOGETHER = ("ada", "ben")  # autograded by two processes at once
CHEATS = ("rebinds", "forged-test", "relabelled", "duplicate-id")  # graded beside "honest"
ALONE = ("duplicate-id",)  # nbgrader stops a run of several students at this one


def forged_cell(gid: str, **meta) -> dict:
    """A cell of the student's claiming to be a graded test worth 20 points."""
    return nbformat.v4.new_code_cell(
        "print('passed: everything')\n",
        metadata={
            "nbgrader": {
                "grade": True,
                "solution": False,
                "locked": True,
                "grade_id": gid,
                "points": 20,
                "schema_version": 3,
                **meta,
            }
        },
    )


def submissions(release: Path) -> dict[str, nbformat.NotebookNode]:
    """Each student's notebook, from the release: all right ("ada"), typical mistakes and a
    tampered graded cell ("ben"), untouched ("honest"), and honest plus a cheat on nbgrader's
    side: a cell rebinding the checks, a cell of its own marked as a graded test, a graded test
    relabelled as an answer, a second cell with a graded test's id."""

    def released():
        return nbformat.read(release, as_version=4)

    source = cells_by_id(nbformat.read(SOURCE, as_version=4))
    answers = {gid: answer(c.source) for gid, c in source.items() if c.metadata.nbgrader.solution}
    subs = {"ada": released(), "ben": released(), "honest": released()}
    for gid, cell in cells_by_id(subs["ada"]).items():
        if cell.metadata["nbgrader"]["solution"]:
            cell.source = answers[gid]
    for gid, cell in cells_by_id(subs["ben"]).items():
        if gid in MISTAKES:
            cell.source = MISTAKES[gid]
        elif gid in answers:
            cell.source = answers[gid]
        elif gid == "ex3_count":  # tampering with a graded cell: nbgrader restores it
            cell.source = "pass"
    subs["rebinds"] = nb = released()
    nb.cells.insert(1, nbformat.v4.new_code_cell(ACCEPTANCE_CHEAT))
    subs["forged-test"] = nb = released()
    nb.cells.insert(1, forged_cell("my_own_test"))
    subs["relabelled"] = nb = released()  # its hidden test replaced
    for cell in nb.cells:
        if grade_id(cell) == "ex1_forward":
            cell.metadata.nbgrader.update(solution=True, locked=False)
            cell.source = "print('passed')"
    subs["duplicate-id"] = nb = released()  # before the real one
    nb.cells.insert(1, forged_cell("ex3_count", points=2))
    assert set(subs) == {*TOGETHER, "honest", *CHEATS}
    return subs


@dataclass
class Graded:
    root: Path
    logs: dict[str, str]  # each autograde's: ada's, ben's, duplicate-id's, "rest" (the others)
    returncodes: dict[str, int]
    refused: dict[str, str]  # student -> the line of nbgrader's that refused their notebook


def autograde(root: Path, *args: str) -> subprocess.Popen:
    """`nbgrader autograde` started in the course (its output: stdout), as the docs run it:
    one training thread each, since they share the cores (docs/grading.md)."""
    env = dict(os.environ, PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
    env.setdefault("LORA_LAB_THREADS", "1")
    return subprocess.Popen(
        [sys.executable, "-m", "nbgrader", "autograde", ASSIGNMENT, *args],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def graded(course):
    """Every submission autograded, and the feedback pages of ada, ben and honest generated."""
    root, release = course
    for student, nb in submissions(release).items():
        path = root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, path)
    logs, returncodes = {}, {}
    together = {s: autograde(root, "--student", s) for s in TOGETHER}
    for student, proc in together.items():
        logs[student], _ = proc.communicate(timeout=900)
        returncodes[student] = proc.returncode
    # The others in one run, where nbgrader goes on past a notebook it refuses and names the
    # student, except the one it stops a whole run at ("an old version of the nbgrader metadata
    # format"): that one runs alone, beside it, and a failed run is its refusal.
    runs = {
        "rest": autograde(
            root, f"--CourseDirectory.student_id_exclude={','.join(TOGETHER + ALONE)}"
        ),
        **{s: autograde(root, "--student", s) for s in ALONE},
    }
    for name, proc in runs.items():
        logs[name], _ = proc.communicate(timeout=900)
        returncodes[name] = proc.returncode
    named = r"error processing assignment '\w+' for student '([\w-]+)'"
    refused = {m[1]: m[0] for m in re.finditer(named, logs["rest"])}
    refused.update({s: logs[s][-300:] for s in ALONE if returncodes[s] != 0})
    exclude = f"--CourseDirectory.student_id_exclude={','.join(CHEATS)}"
    _nbgrader(root, "generate_feedback", ASSIGNMENT, exclude, timeout=300)
    return Graded(root, logs, returncodes, refused)


def scores(root: Path, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    os.environ["PATH"] = os.pathsep.join([BIN, os.environ.get("PATH", "")])
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        sub = gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, student)
        result = {g.name: g.score for g in sub.grades if g.cell_type == "code"}
        result["total"] = sub.score
        result["max"] = sub.max_score
    return result


WRONG = {gid.removesuffix("_answer") for gid in MISTAKES} | {"ex3_count"}


def test_the_committed_student_notebook_is_nbgraders_release(course):
    _, release = course
    released = nbformat.read(release, as_version=4)
    committed = nbformat.read(STUDENT, as_version=4)
    assert without_outputs(committed) == without_outputs(released), (
        "notebooks/exercises/student.ipynb is not nbgrader's release of "
        "course/lora_by_hand.ipynb: run python scripts/release_exercises.py"
    )
    assert released.metadata == committed.metadata


def test_the_release_holds_no_solution_no_hidden_test_and_no_instructor_cell(course):
    _, release = course
    text = release.read_text()
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "HIDDEN TESTS", "grade("):
        assert marker not in text, marker
    source = nbformat.read(SOURCE, as_version=4)
    released = nbformat.read(release, as_version=4)
    assert not [c for c in released.cells if INSTRUCTOR_TAG in c.metadata.get("tags", [])]
    for gid, cell in cells_by_id(released).items():
        body = cells_by_id(source)[gid].source
        solution = re.findall(r"### BEGIN SOLUTION\n(.*?)\n\s*### END SOLUTION", body, re.S)
        for block in solution:
            for line in block.split("\n"):
                code = line.split("#")[0].strip()
                if len(code) > 12:  # a line of the answer, not a shared `return` or `pass`
                    assert code not in cell.source, (gid, code)
        if cell.metadata.nbgrader.solution:
            assert CODE_STUB in cell.source, gid
    n_instructor = sum(INSTRUCTOR_TAG in c.metadata.get("tags", []) for c in source.cells)
    assert len(released.cells) == len(source.cells) - n_instructor


def autograded(root: Path, student: str) -> nbformat.NotebookNode:
    return nbformat.read(root / "autograded" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", 4)


def test_the_answer_key_gets_full_marks(graded):
    result = scores(graded.root, "ada")
    assert result["max"] == 20
    assert result["total"] == 20, {k: v for k, v in result.items() if v == 0}
    # Graded outside the submission's process, which rebound nothing; each check says passed.
    assert "graded outside the submission's process" in graded.logs["ada"]
    assert "; it changed" not in graded.logs["ada"], graded.logs["ada"][-3000:]
    ex1 = cells_by_id(autograded(graded.root, "ada"))["ex1_forward"]
    assert "Exercise 1: the forward pass: passed" in "".join(o.get("text", "") for o in ex1.outputs)


def test_typical_mistakes_get_the_points_of_what_is_right(graded):
    result = scores(graded.root, "ben")
    zero = {k for k, v in result.items() if k not in ("total", "max") and v == 0}
    assert zero == WRONG
    assert result["total"] == 20 - 12  # exercises 1, 3, 5, 6, 7 (2+2+1+2+3) and 9a, 10b


def feedback_page(root: Path, student: str) -> str:
    return (root / "feedback" / student / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()


def test_the_feedback_shows_each_checkers_own_hint(graded):
    page = html.unescape(feedback_page(graded.root, "ben"))
    for hint in (
        "the scaling is not applied",  # exercise 1, though ben redefined check_forward
        "but this block's largest magnitude is negative",  # exercise 7: absmax = block.max()
        "NotPassed",  # the graded cell's error, which nbgrader shows with the hint
    ):
        assert hint in page, hint
    ada = feedback_page(graded.root, "ada")
    assert "NotPassed" not in ada and html.unescape(ada).count("passed: ") >= 12


def test_grade_refuses_an_unknown_check_and_passes_what_the_check_passes():
    with pytest.raises(ValueError, match="unknown check 'check_nothing'; the checks are"):
        grade("check_nothing")
    letter = next(iter(SWEEP_CHOICES))
    with pytest.raises(AssertionError, match="not yet"):
        grade("check_sweep_answer", letter if letter != "D" else "A")
    assert grade("check_sweep_answer", "D") is None


STUDENTS_CSV = (  # nbgrader's columns; "cy" never submitted
    'id,first_name,last_name,email\nada,Ada,"Lovelace, Countess",ada@example.org\n'
    "cy,Cy,Unsubmitted,cy@example.org\n"
)


@pytest.fixture(scope="module")
def names_imported(graded):
    """`nbgrader db student import` run by its full path, without the venv on PATH (so its
    `alembic` is found only through the course's config): the names the export reads."""
    (graded.root / "students.csv").write_text(STUDENTS_CSV)
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    return subprocess.run(
        [str(Path(BIN) / "nbgrader"), "db", "student", "import", "students.csv"],
        cwd=graded.root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_nbgrader_by_its_full_path_works_in_a_course_without_the_venv_on_path(names_imported):
    """nbgrader runs `alembic` from PATH: the course's config puts the venv's folder there."""
    proc = names_imported
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alembic" not in proc.stderr


def test_only_an_edited_graded_cell_logs_that_its_checksum_changed(graded):
    changed = {
        who: re.findall(r"Attribute 'checksum' for cell (\w+) has changed", graded.logs[who])
        for who in TOGETHER
    }
    assert changed == {"ada": [], "ben": ["ex3_count"]}, changed
    assert "Autograding" in graded.logs["ada"]  # the log was captured


def test_the_lms_export_has_one_row_per_student_with_names_quoted(graded, names_imported):
    from nbgrader.api import Gradebook

    assert names_imported.returncode == 0, names_imported.stderr
    out = graded.root / "lms" / "grades.csv"
    _nbgrader(graded.root, "export", "--exporter=lab.exercises.course.LmsExport", f"--to={out}")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    os.environ["PATH"] = os.pathsep.join([BIN, os.environ.get("PATH", "")])
    with Gradebook(f"sqlite:///{graded.root / 'gradebook.db'}") as gb:
        students = sorted(s.id for s in gb.students)
    assert {"ada", "ben", "cy", "honest"} <= set(students), students
    assert [r["Username"] for r in rows] == students  # one row each, in order
    by = {r["Username"]: r for r in rows}
    assert by["ada"][ASSIGNMENT] == "20" and by["ben"][ASSIGNMENT] == "8"
    assert by["cy"][ASSIGNMENT] == ""  # never submitted: the platform keeps what it has
    assert by["ada"]["Last name"] == "Lovelace, Countess"
    assert by["ada"]["Email address"] == "ada@example.org" and by["ben"]["Email address"] == ""
    # a folder where the file goes is refused, and nothing is left half-written (the plugin
    # nbgrader's export ran above, called here)
    (graded.root / "lms" / "taken").mkdir()
    with (
        Gradebook(f"sqlite:///{graded.root / 'gradebook.db'}") as gb,
        pytest.raises(IsADirectoryError, match="it is a directory"),
    ):
        LmsExport(to=str(graded.root / "lms" / "taken")).export(gb)
    assert sorted(p.name for p in (graded.root / "lms").iterdir()) == ["grades.csv", "taken"]
    assert not list((graded.root / "lms" / "taken").iterdir())


def errors_in(root: Path, student: str) -> dict[str, str]:
    """The graded cells of an autograded submission that ended in an error, with the error."""
    return {
        gid: f"{out.get('ename')}: {out.get('evalue', '')[:300]}"
        for gid, cell in cells_by_id(autograded(root, student)).items()
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    }


def test_two_autogrades_at_once_share_the_gradebook(graded):
    """docs/grading.md's way to grade a class in parallel: one `autograde --student` each (the
    `graded` fixture ran ada's and ben's at once)."""
    for student in TOGETHER:
        assert graded.returncodes[student] == 0, graded.logs[student][-3000:]
    ada, ben = scores(graded.root, "ada"), scores(graded.root, "ben")
    load = os.getloadavg()
    assert ada["total"] == 20, (load, errors_in(graded.root, "ada"))
    assert ben["total"] == 8, (load, errors_in(graded.root, "ben"))


# Through nbgrader autograde with the lab's executor (lab.exercises.autograde.LabExecute).


def test_through_nbgrader_no_cheat_or_forged_cell_earns_a_point(graded):
    from nbgrader.api import Gradebook

    refused = graded.refused
    assert "honest" not in refused and "rebinds" not in refused, refused
    assert set(refused) <= set(CHEATS), refused
    in_rest = set(refused) - set(ALONE)
    assert (graded.returncodes["rest"] != 0) == bool(in_rest), graded.logs["rest"][-3000:]
    os.environ["PATH"] = os.pathsep.join([BIN, os.environ["PATH"]])
    students = ["honest", *CHEATS]
    with Gradebook(f"sqlite:///{graded.root / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission(ASSIGNMENT, s).score for s in students if s not in refused}
    print("scores", scores, "refused by nbgrader", sorted(refused))
    assert scores == dict.fromkeys(scores, scores["honest"]), scores


def test_the_code_run_in_the_grader_is_the_gradebooks_whatever_the_submission_says(course):
    from lab.exercises.autograde import LabExecute

    root = course[0]
    nb = submission()
    for cell in nb.cells:
        if grade_id(cell) == "ex1_forward":
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
    key = {grade_id(c): c.source for c in nbformat.read(SOURCE, as_version=4).cells if grade_id(c)}
    assert {grade_id(nb.cells[i]): src for i, src in tests.items()} == {
        gid: key[gid] for gid in key if gid in {grade_id(nb.cells[i]) for i in tests}
    }
    assert len(tests) == 12
    cell = next(c for c in nb.cells if grade_id(c) == "ex1_forward")
    assert cell.metadata.nbgrader.solution is False and cell.metadata.nbgrader.points == 2


def test_the_feedback_page_names_each_exercise_and_shows_each_hint_whole(graded):
    page = feedback_page(graded.root, "honest")
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
