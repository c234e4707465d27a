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
import pwd
import re
import sys
from pathlib import Path

import nbformat
import pytest

from lab.exercises import SWEEP_CHOICES, grade
from lab.exercises.course import (
    ASSIGNMENT,
    CODE_STUB,
    COURSE_ID,
    INSTRUCTOR_TAG,
    SOURCE,
    STUDENT,
    _nbgrader,
    generate_release,
    make_course,
    setup_exchange,
)

BIN = str(Path(sys.executable).parent)  # nbgrader's Gradebook runs `alembic` from PATH


def cells_by_id(nb) -> dict[str, nbformat.NotebookNode]:
    return {c.metadata["nbgrader"]["grade_id"]: c for c in nb.cells if "nbgrader" in c.metadata}


def without_outputs(nb) -> list[dict]:
    """Each cell as nbgrader wrote it, less what executing the notebook adds."""
    return [
        {"id": c.get("id"), "type": c.cell_type, "source": c.source, "metadata": c.metadata}
        for c in nb.cells
    ]


def answer(cell_source: str) -> str:
    """What a student who solved it writes: the solution without nbgrader's markers."""
    return "\n".join(line for line in cell_source.split("\n") if "### " not in line)


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


# The mistakes the checker tests already use, one per exercise ben gets wrong (and what the
# checker says to each: its hint must reach ben's feedback).
MISTAKES = {
    "ex1_forward_answer": (
        "def check_forward(fn):  # redefining the check changes nothing the grader runs\n"
        "    return 'passed'\n\n\n"
        "def my_forward(x, base, A, B, scaling, dropout):\n"
        "    return base(x) + dropout(x) @ A.T @ B.T\n\n\n"
        "check_forward(my_forward)"
    ),
    "ex3_count_answer": (
        "def my_count(config, targets, rank):\n"
        "    return config.n_layers * len(targets) * rank * config.d_model  # A only\n\n\n"
        "check_count(my_count)"
    ),
    "ex5_sweep_answer": 'ANSWER = "A"\ncheck_sweep_answer(ANSWER)',
    "ex6_memory_answer": (
        "FULL_BYTES = 4 * 406_784  # gradients only: AdamW's two moments forgotten\n"
        "LORA_BYTES = 4 * 8_192\ncheck_memory(FULL_BYTES, LORA_BYTES)"
    ),
    "ex7_nf4_answer": (
        "LEVELS = torch.tensor(lab.NF4_LEVELS)\n\n\n"
        "def my_quantize(block):\n"
        "    absmax = block.max()\n"
        "    return (block[:, None] / absmax - LEVELS).abs().argmin(dim=1), absmax\n\n\n"
        "def my_dequantize(codes, absmax):\n"
        "    return LEVELS[codes.long()] * absmax\n\n\n"
        "check_nf4(my_quantize, my_dequantize)"
    ),
    "ex9a_lr_prediction_answer": (
        "LORA_LR = 3e-3  # full fine-tuning's own\ncheck_lr_prediction(LORA_LR)"
    ),
    "ex10b_shift_targets_answer": (
        'TARGETS = ("q_proj", "v_proj")\nRANK = 18\ncheck_shift_targets(TARGETS, RANK)'
    ),
}
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


def test_every_exercise_heading_states_the_points_its_graded_cells_carry():
    nb = nbformat.read(SOURCE, as_version=4)
    headed, points = {}, {}
    for cell in nb.cells:
        m = re.match(r"## Exercise (\d+): .* \((\d+) points?, (\d+) min\)", cell.source)
        if cell.cell_type == "markdown" and m:
            headed[int(m.group(1))] = int(m.group(2))
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            number = int(re.match(r"ex(\d+)", meta["grade_id"]).group(1))
            points[number] = points.get(number, 0) + meta["points"]
            assert "from lab.exercises import grade" in cell.source
            assert re.search(r'^grade\("check_\w+"', cell.source, re.M), cell.source
    assert sorted(headed) == list(range(1, 11))
    assert headed == points
    assert sum(points.values()) == 20


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


def test_make_course_never_overwrites_an_instructors_edit(tmp_path):
    target = make_course(tmp_path)
    data = json.loads(target.read_text())
    data["cells"][0]["source"] = "edited"
    target.write_text(json.dumps(data))
    with pytest.raises(FileExistsError, match="exists and differs"):
        make_course(tmp_path)
    assert json.loads(target.read_text())["cells"][0]["source"] == "edited"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_course(tmp_path / "other", source=tmp_path / "missing.ipynb")


# ----------------------------------------------------------------------------- the course command


def course_command(cwd: Path, *args: str, umask: int = 0o022):
    """`python -m lab.exercises.course ARGS` as an instructor runs it, in `cwd`, with `umask`."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "lab.exercises.course", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.mark.parametrize("name", ["", "  "])
def test_the_course_command_never_writes_into_the_current_folder_for_an_empty_name(tmp_path, name):
    proc = course_command(tmp_path, name)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"the course directory is {name!r}: give a folder" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_course_command_refuses_what_is_in_the_way_before_writing(tmp_path):
    (tmp_path / "c1" / "nbgrader_config.py").mkdir(parents=True)
    proc = course_command(tmp_path, "c1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nbgrader_config.py is a folder, so it cannot be nbgrader's settings file" in proc.stderr
    assert [p.name for p in (tmp_path / "c1").iterdir()] == ["nbgrader_config.py"]

    (tmp_path / "c2").mkdir()
    os.mkfifo(tmp_path / "c2" / "nbgrader_config.py")
    proc = course_command(tmp_path, "c2")
    assert proc.returncode == 1 and "is not a regular file" in proc.stderr
    assert [p.name for p in (tmp_path / "c2").iterdir()] == ["nbgrader_config.py"]

    (tmp_path / "c3" / "source").mkdir(parents=True)
    (tmp_path / "c3" / "source" / ASSIGNMENT).write_text("not a folder")
    proc = course_command(tmp_path, "c3")
    assert proc.returncode == 1 and "is in the way: the course needs a folder there" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "c3").iterdir()) == ["source"]

    (tmp_path / "c4").write_text("a file")
    proc = course_command(tmp_path, "c4")
    assert proc.returncode == 1 and "c4 is in the way" in proc.stderr
    assert (tmp_path / "c4").read_text() == "a file"


def test_the_course_is_private_to_its_instructor_whatever_the_umask(tmp_path):
    proc = course_command(tmp_path, "a/b/course", umask=0o000)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "a" / "b" / "course"
    notebook = root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    for folder in (tmp_path / "a", tmp_path / "a" / "b", root, root / "source", notebook.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert notebook.read_bytes() == SOURCE.read_bytes()
    # "." is the current folder, given on purpose; an existing folder is made private too
    (tmp_path / "open").mkdir(mode=0o755)
    proc = course_command(tmp_path / "open", ".")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o700


def test_the_course_command_refuses_a_folder_of_another_user(tmp_path):
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)  # nobody's
    else:
        theirs = Path("/usr")  # root's
    before = sorted(p.name for p in theirs.iterdir())
    proc = course_command(tmp_path, str(theirs))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{theirs} belongs to " in proc.stderr and "must be a folder of the instructor" in (
        proc.stderr
    )
    assert sorted(p.name for p in theirs.iterdir()) == before


def test_the_course_command_says_where_the_answer_key_is_when_it_is_missing(tmp_path):
    proc = course_command(tmp_path, "course", "--source", str(tmp_path / "nowhere.ipynb"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "does not exist: it is course/lora_by_hand.ipynb in a checkout" in proc.stderr
    assert "give its path with --source" in proc.stderr
    assert not (tmp_path / "course").exists()


@pytest.mark.parametrize("which", ["the student's release", "a text file"])
def test_the_course_command_refuses_a_source_that_is_not_the_answer_key(tmp_path, which):
    """The release as the source would grade every submission right: it has no hidden tests."""
    source = STUDENT if which == "the student's release" else tmp_path / "notes.ipynb"
    if which == "a text file":
        source.write_text("# not a notebook")
    proc = course_command(tmp_path, "course", "--source", str(source))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = "graded cells without hidden tests" if source == STUDENT else "is not a notebook"
    assert expected in proc.stderr, proc.stderr
    assert not (tmp_path / "course").exists()


# ------------------------------------------------------------------------ the answer key's place


def test_no_answer_key_among_the_students_notebooks():
    notebooks = SOURCE.parents[1] / "notebooks"
    assert notebooks not in SOURCE.parents
    holding = [p for p in notebooks.rglob("*.ipynb") if "BEGIN SOLUTION" in p.read_text()]
    assert not holding, f"answers in the students' folder: {holding}"
    released = nbformat.read(STUDENT, as_version=4)
    mentions = [c.source for c in released.cells if "solution" in c.source.lower()]
    assert not mentions, mentions


# ------------------------------------------------------------- nbgrader without an activated venv


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


# ----------------------------------------------------------------------- the checksum warnings


def test_only_an_edited_graded_cell_logs_that_its_checksum_changed(graded):
    logs = json.loads((graded / "autograde-logs.json").read_text())
    changed = {
        who: re.findall(r"Attribute 'checksum' for cell (\w+) has changed", log)
        for who, log in logs.items()
    }
    assert changed == {"ada": [], "ben": ["ex3_count"]}, changed
    assert "Autograding" in logs["ada"]  # the log was captured


# ------------------------------------------------------------------------------ the export


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


# ---------------------------------------------------------------------------- the exchange


def test_the_exchange_set_up_refuses_bad_input_before_changing_anything(tmp_path, monkeypatch):
    me = pwd.getpwuid(os.geteuid()).pw_name
    other = "nobody" if me != "nobody" else "root"
    exchange, config = tmp_path / "ex", tmp_path / "etc" / "nbgrader_config.py"
    cases = [
        (("relative/ex", "someone", config), ValueError, "is not an absolute path"),
        ((exchange, "no-such-user-here", config), ValueError, "there is no user 'no-such-user-"),
        ((exchange, "root", config), ValueError, "the instructor must not be root"),
        ((tmp_path / "file" / "ex", other, config), NotADirectoryError, "is in the way"),
        ((exchange, other, tmp_path / "etc"), FileExistsError, "cannot be nbgrader's shared"),
    ]
    (tmp_path / "file").write_text("a file")
    (tmp_path / "etc" / "nbgrader_config.py").mkdir(parents=True)
    for args, kind, message in cases:
        with pytest.raises(kind, match=message):
            setup_exchange(*args)
    (tmp_path / "etc" / "nbgrader_config.py").rmdir()
    config.write_text("c.Something.else = 1\n")
    with pytest.raises(FileExistsError, match="exists with other settings: add these lines"):
        setup_exchange(exchange, other, config)
    assert config.read_text() == "c.Something.else = 1\n"
    config.unlink()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        setup_exchange(exchange, other, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc", "file"]
    assert not config.exists() and not exchange.exists()


def test_the_exchange_set_up_makes_what_nbgrader_and_students_need(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a folder another user owns needs root")
    exchange, config = tmp_path / "srv" / "exchange", tmp_path / "etc" / "nbgrader_config.py"
    setup_exchange(exchange, "nobody", config)
    assert exchange.stat().st_mode & 0o7777 == 0o1777
    course = exchange / COURSE_ID
    assert course.stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert course.stat().st_mode & 0o777 == 0o755
    from traitlets.config import Config

    c = Config()
    exec(config.read_text(), {"get_config": lambda: c})  # as nbgrader reads it
    assert c.CourseDirectory.course_id == COURSE_ID and c.Exchange.root == str(exchange)
    assert config.stat().st_mode & 0o777 == 0o644
    setup_exchange(exchange, "nobody", config)  # a second run changes nothing and passes
    # a course folder someone else made first (a student posing as the course) is refused
    os.chown(course, 0, 0)
    with pytest.raises(PermissionError, match="someone made it before the instructor"):
        setup_exchange(exchange, "nobody", config)


def test_the_course_command_needs_a_folder_or_the_exchange(tmp_path):
    proc = course_command(tmp_path)
    assert proc.returncode == 2 and "give the course directory, or --exchange" in proc.stderr
    proc = course_command(tmp_path, "--exchange", str(tmp_path / "ex"))
    assert proc.returncode == 2 and "--exchange needs --instructor NAME" in proc.stderr
    proc = course_command(tmp_path, "c", "--exchange", str(tmp_path / "ex"), "--instructor", "x")
    assert proc.returncode == 2 and "sets up the exchange alone" in proc.stderr
    assert list(tmp_path.iterdir()) == []


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
