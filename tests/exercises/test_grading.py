"""The exercises as an nbgrader assignment: generated, released, autograded with no server.

course/lora_by_hand.ipynb (the answer key, outside the students' notebooks/) is the source;
notebooks/exercises/student.ipynb must be exactly what `nbgrader generate_assignment` releases
from it (outputs aside: the committed copy is executed for nbval), and mentions no solutions.
Autograding the answer key gives full marks; a submission with typical mistakes gets the points
of the exercises it got right, and the checker's own hint for each one it got wrong shows in the
graded notebook's feedback. Only a graded cell the student edited logs "checksum has changed".
The course folder is private, nbgrader works there without an activated venv, the exchange set-up
refuses bad input, and the export for a learning platform has one row per student.
tests/test_class_roundtrip.py runs the whole round trip with real accounts.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from exercise_kit import MISTAKES, answer, cells_by_id

from lab.exercises import SWEEP_CHOICES, grade
from lab.exercises.course import (
    ASSIGNMENT,
    CODE_STUB,
    INSTRUCTOR_TAG,
    SOURCE,
    STUDENT,
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


@pytest.fixture(scope="module")
def graded(course):
    """Two submissions autograded: all right ("ada") and typical mistakes ("ben")."""
    root, release = course
    source = cells_by_id(nbformat.read(SOURCE, as_version=4))
    solved = nbformat.read(release, as_version=4)
    for gid, cell in cells_by_id(solved).items():
        if cell.metadata["nbgrader"]["solution"]:
            cell.source = answer(source[gid].source)
    mistakes = nbformat.read(release, as_version=4)
    answers = {gid: answer(c.source) for gid, c in source.items() if c.metadata.nbgrader.solution}
    for gid, cell in cells_by_id(mistakes).items():
        if gid in MISTAKES:
            cell.source = MISTAKES[gid]
        elif gid in answers:
            cell.source = answers[gid]
        elif gid == "ex3_count":  # tampering with a graded cell: nbgrader restores it
            cell.source = "pass"
    logs = {}
    for student, nb in (("ada", solved), ("ben", mistakes)):
        path = root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, path)
        done = _nbgrader(
            root, "autograde", ASSIGNMENT, "--student", student, "--force", timeout=900
        )
        logs[student] = done.stdout + done.stderr
    (root / "autograde-logs.json").write_text(json.dumps(logs))
    _nbgrader(root, "generate_feedback", ASSIGNMENT, "--force", timeout=300)
    return root


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


def test_the_answer_key_gets_full_marks(graded):
    result = scores(graded, "ada")
    assert result["max"] == 20
    assert result["total"] == 20, {k: v for k, v in result.items() if v == 0}


def test_typical_mistakes_get_the_points_of_what_is_right(graded):
    result = scores(graded, "ben")
    zero = {k for k, v in result.items() if k not in ("total", "max") and v == 0}
    assert zero == WRONG
    assert result["total"] == 20 - 12  # exercises 1, 3, 5, 6, 7 (2+2+1+2+3) and 9a, 10b


def test_the_feedback_shows_each_checkers_own_hint(graded):
    page = html.unescape(
        (graded / "feedback" / "ben" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    )
    for hint in (
        "the scaling is not applied",  # exercise 1, though ben redefined check_forward
        "but this block's largest magnitude is negative",  # exercise 7: absmax = block.max()
        "NotPassed",  # the graded cell's error, which nbgrader shows with the hint
    ):
        assert hint in page, hint
    ada = (graded / "feedback" / "ada" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    assert "NotPassed" not in ada and html.unescape(ada).count("passed: ") >= 12


def test_grade_refuses_an_unknown_check_and_passes_what_the_check_passes():
    with pytest.raises(ValueError, match="unknown check 'check_nothing'; the checks are"):
        grade("check_nothing")
    letter = next(iter(SWEEP_CHOICES))
    with pytest.raises(AssertionError, match="not yet"):
        grade("check_sweep_answer", letter if letter != "D" else "A")
    assert grade("check_sweep_answer", "D") is None


def test_nbgrader_by_its_full_path_works_in_a_course_without_the_venv_on_path(course):
    """nbgrader runs `alembic` from PATH: the course's config puts the venv's folder there."""
    import subprocess

    root, _ = course
    env = {k: v for k, v in os.environ.items() if k not in ("PATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run(
        [str(Path(BIN) / "nbgrader"), "db", "student", "list"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alembic" not in proc.stderr


def test_only_an_edited_graded_cell_logs_that_its_checksum_changed(graded):
    logs = json.loads((graded / "autograde-logs.json").read_text())
    changed = {
        who: re.findall(r"Attribute 'checksum' for cell (\w+) has changed", log)
        for who, log in logs.items()
    }
    assert changed == {"ada": [], "ben": ["ex3_count"]}, changed
    assert "Autograding" in logs["ada"]  # the log was captured


def test_the_lms_export_has_one_row_per_student_with_names_quoted(graded):
    import csv

    (graded / "students.csv").write_text(
        'id,first_name,last_name,email\nada,Ada,"Lovelace, Countess",ada@example.org\n'
        "cy,Cy,Unsubmitted,cy@example.org\n"
    )
    _nbgrader(graded, "db", "student", "import", "students.csv")
    out = graded / "lms" / "grades.csv"
    _nbgrader(graded, "export", "--exporter=lab.exercises.course.LmsExport", f"--to={out}")
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["Username"] for r in rows] == ["ada", "ben", "cy"]
    by = {r["Username"]: r for r in rows}
    assert by["ada"][ASSIGNMENT] == "20" and by["ben"][ASSIGNMENT] == "8"
    assert by["cy"][ASSIGNMENT] == ""  # never submitted: the platform keeps what it has
    assert by["ada"]["Last name"] == "Lovelace, Countess"
    assert by["ada"]["Email address"] == "ada@example.org" and by["ben"]["Email address"] == ""
    # a folder where the file goes is refused, and nothing is left half-written
    (graded / "lms" / "taken").mkdir()
    with pytest.raises(RuntimeError, match="it is a directory"):
        _nbgrader(graded, "export", "--exporter=lab.exercises.course.LmsExport",
                  f"--to={graded / 'lms' / 'taken'}")  # fmt: skip


def errors_in(root: Path, student: str) -> dict[str, str]:
    """The graded cells of an autograded submission that ended in an error, with the error."""
    nb = nbformat.read(root / "autograded" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", 4)
    return {
        gid: f"{out.get('ename')}: {out.get('evalue', '')[:300]}"
        for gid, cell in cells_by_id(nb).items()
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    }


def test_two_autogrades_at_once_share_the_gradebook(graded):
    """docs/grading.md's way to grade a class in parallel: one `autograde --student` each."""
    import subprocess

    env = dict(os.environ, PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "nbgrader", "autograde", ASSIGNMENT, "--student", s, "--force"],
            cwd=graded,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for s in ("ada", "ben")
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
    ada, ben = scores(graded, "ada"), scores(graded, "ben")
    load = os.getloadavg()
    assert ada["total"] == 20, (load, errors_in(graded, "ada"))
    assert ben["total"] == 8, (load, errors_in(graded, "ben"))
