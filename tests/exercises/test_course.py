"""Tests for lab/exercises/course.py: the course command, its folder, the exchange, the key."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import sys
from pathlib import Path

import nbformat
import pytest

from lab.exercises.course import (
    ASSIGNMENT,
    COURSE_ID,
    SOURCE,
    STUDENT,
    main,
    make_course,
    setup_exchange,
)


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


def course_command(cwd: Path, *args: str, umask: int = 0o022):
    """`python -m lab.exercises.course ARGS` as an instructor runs it, in `cwd`, with `umask`: a
    real process (its exit status, and no traceback on its stderr). One test per exit status
    (0, 1 and 2) runs it so; the rest call `course_main`, the same code in this process."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "lab.exercises.course", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )


def course_main(cwd: Path, *args: str, umask: int = 0o022):
    """`main(ARGS)` of the course command in this process, in `cwd`, with `umask`: what
    `course_command` gives (an exit status, stderr) without starting Python, torch and nbgrader
    again. An exception main does not turn into a message fails the test where it is raised."""
    import subprocess

    err = io.StringIO()
    old_cwd, old_umask = os.getcwd(), os.umask(umask)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse refuses the command line so
                code = exc.code
    finally:
        os.chdir(old_cwd)
        os.umask(old_umask)
    return subprocess.CompletedProcess(["course", *args], code, "", err.getvalue())


@pytest.mark.parametrize("name", ["", "  "])
def test_the_course_command_never_writes_into_the_current_folder_for_an_empty_name(tmp_path, name):
    proc = course_main(tmp_path, name)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"the course directory is {name!r}: give a folder" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_course_command_refuses_what_is_in_the_way_before_writing(tmp_path):
    (tmp_path / "c1" / "nbgrader_config.py").mkdir(parents=True)
    proc = course_main(tmp_path, "c1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "nbgrader_config.py is a folder, so it cannot be nbgrader's settings file" in proc.stderr
    assert [p.name for p in (tmp_path / "c1").iterdir()] == ["nbgrader_config.py"]

    (tmp_path / "c2").mkdir()
    os.mkfifo(tmp_path / "c2" / "nbgrader_config.py")
    proc = course_main(tmp_path, "c2")
    assert proc.returncode == 1 and "is not a regular file" in proc.stderr
    assert [p.name for p in (tmp_path / "c2").iterdir()] == ["nbgrader_config.py"]

    (tmp_path / "c3" / "source").mkdir(parents=True)
    (tmp_path / "c3" / "source" / ASSIGNMENT).write_text("not a folder")
    proc = course_main(tmp_path, "c3")
    assert proc.returncode == 1 and "is in the way: the course needs a folder there" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "c3").iterdir()) == ["source"]

    (tmp_path / "c4").write_text("a file")
    proc = course_main(tmp_path, "c4")
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
    proc = course_main(tmp_path / "open", ".")
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
    proc = course_main(tmp_path, str(theirs))
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
    proc = course_main(tmp_path, "course", "--source", str(source))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    expected = "graded cells without hidden tests" if source == STUDENT else "is not a notebook"
    assert expected in proc.stderr, proc.stderr
    assert not (tmp_path / "course").exists()


def test_no_answer_key_among_the_students_notebooks():
    notebooks = SOURCE.parents[1] / "notebooks"
    assert notebooks not in SOURCE.parents
    holding = [p for p in notebooks.rglob("*.ipynb") if "BEGIN SOLUTION" in p.read_text()]
    assert not holding, f"answers in the students' folder: {holding}"
    released = nbformat.read(STUDENT, as_version=4)
    mentions = [c.source for c in released.cells if "solution" in c.source.lower()]
    assert not mentions, mentions


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
    proc = course_main(tmp_path, "--exchange", str(tmp_path / "ex"))
    assert proc.returncode == 2 and "--exchange needs --instructor NAME" in proc.stderr
    proc = course_main(tmp_path, "c", "--exchange", str(tmp_path / "ex"), "--instructor", "x")
    assert proc.returncode == 2 and "sets up the exchange alone" in proc.stderr
    assert list(tmp_path.iterdir()) == []
