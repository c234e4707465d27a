"""The exercises as an nbgrader course: one assignment, generated, released and autograded.

One source notebook, ``course/lora_by_hand.ipynb`` (the answer key, for instructors only: it sits
outside ``notebooks/``, which is the students' copy), is the assignment ``lora_by_hand`` in
nbgrader's format: each answer cell marks its solution between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader puts ``# your code here`` in its place), and each exercise is
followed by a graded cell (its points in the cell's metadata and on the exercise's heading) whose
hidden test reruns the exercise's check (`lab.exercises.grade`). Cells tagged ``instructor`` (the
worked mistakes and what the checks say to them) stay in the answer key and are dropped from the
release. ``notebooks/exercises/student.ipynb`` is ``nbgrader generate_assignment``'s output,
executed (``python scripts/release_exercises.py`` rebuilds it; a test fails if the two drift).

An instructor makes a course directory with ``python -m lab.exercises.course DIR`` (private to
them: it holds the answer key and the gradebook), root sets up nbgrader's exchange once with
``python -m lab.exercises.course --exchange ROOT --instructor NAME``, and then nbgrader is used as
usual (docs/grading.md has the whole round trip). This module imports nbgrader and nbconvert:
`lab.exercises` does not load it, so students need neither.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import pwd
import subprocess
import sys
from pathlib import Path

from nbgrader.plugins import ExportPlugin
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor

from ..fileio import atomic_write_bytes, regular_file

__all__ = [
    "ASSIGNMENT",
    "CODE_STUB",
    "COURSE_ID",
    "DropInstructorCells",
    "EXCHANGE",
    "INSTRUCTOR_TAG",
    "LmsExport",
    "RestoreHiddenTests",
    "SHARED_CONFIG",
    "configure",
    "generate_release",
    "make_course",
    "restore_hidden_tests",
    "setup_exchange",
]

ASSIGNMENT = "lora_by_hand"  # nbgrader's assignment id (and the notebook's name in the course)
COURSE_ID = "lora-lab"
INSTRUCTOR_TAG = "instructor"  # cells with this tag are in the answer key only
CODE_STUB = "# your code here"  # what replaces a solution: a function body then returns None
REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "course" / f"{ASSIGNMENT}.ipynb"  # the answer key: never in the students' copy
STUDENT = REPO / "notebooks" / "exercises" / "student.ipynb"
EXCHANGE = Path("/srv/nbgrader/exchange")  # nbgrader's exchange, the docs' choice
SHARED_CONFIG = Path("/etc/jupyter/nbgrader_config.py")  # read by every user's nbgrader

CONFIG = '''\
"""nbgrader's settings for the LoRA Lab exercises (written by python -m lab.exercises.course)."""

import os
import sys

# nbgrader runs `alembic` (the gradebook's migrations) from PATH: put the folder of the Python
# running nbgrader first, so that /opt/lora-lab/.venv/bin/nbgrader works without activating.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])

from lab.exercises.course import configure, restore_hidden_tests  # noqa: E402

configure(get_config())  # noqa: F821 (nbgrader defines get_config)
restore_hidden_tests(get_config())  # noqa: F821
'''

SHARED_CONFIG_TEXT = '''\
"""nbgrader's exchange for the LoRA Lab course, read by the instructor's and every student's
nbgrader (written by python -m lab.exercises.course --exchange)."""

c = get_config()  # noqa: F821 (nbgrader defines get_config)
c.CourseDirectory.course_id = {course_id!r}
c.Exchange.root = {root!r}
'''


class DropInstructorCells(NbGraderPreprocessor):
    """Remove cells tagged ``instructor`` (runs first when nbgrader generates the release)."""

    def preprocess(self, nb, resources):
        nb.cells = [c for c in nb.cells if INSTRUCTOR_TAG not in c.metadata.get("tags", [])]
        return nb, resources


def configure(c) -> None:
    """Apply the lab's nbgrader settings to a traitlets config (an nbgrader_config.py's `c`)."""
    from nbgrader.converters import GenerateAssignment

    c.CourseDirectory.course_id = COURSE_ID
    c.ClearSolutions.code_stub = {"python": CODE_STUB}
    defaults = GenerateAssignment.class_traits()["preprocessors"].default()
    c.GenerateAssignment.preprocessors = [DropInstructorCells, *defaults]
    # Autograde runs each submission in a sandboxed process of its own and its graded cells'
    # hidden tests in nbgrader's, so that no submission can decide its own grade.
    from .autograde import CELL_TIMEOUT_S, configure_autograde

    configure_autograde(c)
    c.Execute.timeout = int(CELL_TIMEOUT_S)  # nbgrader validate's kernel: the autograder's limit


class RestoreHiddenTests(NbGraderPreprocessor):
    """Put each graded cell's hidden tests back where the submission holds the released cell.

    nbgrader records a locked cell's checksum with its hidden tests in (`SaveCells` runs before
    `ClearHiddenTests` when it generates the release), so every released graded cell, untouched
    or not, differs from the record, and `OverwriteCells` logs "Attribute 'checksum' for cell ...
    has changed!" for each while it restores the source. This runs just before `OverwriteCells`
    and restores, silently, only the cells whose source is exactly what the release gave the
    student: a cell the student edited (a real tamper) is left to `OverwriteCells`, which still
    logs it and restores it.
    """

    def preprocess(self, nb, resources):
        from nbgrader.api import Gradebook, MissingEntry

        info = resources["nbgrader"]
        strip = ClearHiddenTests(parent=self)  # the same delimiters the release used
        with Gradebook(info["db_url"]) as gb:
            for cell in nb.cells:
                meta = cell.metadata.get("nbgrader", {})
                if not meta.get("grade_id"):
                    continue
                try:
                    recorded = gb.find_source_cell(
                        meta["grade_id"], info["notebook"], info["assignment"]
                    )
                except MissingEntry:
                    continue  # OverwriteCells says so
                if not recorded.locked:
                    continue
                released = cell.copy()
                released.source = recorded.source
                strip._remove_hidden_test_region(released)
                if cell.source == released.source:
                    cell.source = recorded.source
        return nb, resources


def restore_hidden_tests(c) -> None:
    """Run `RestoreHiddenTests` just before nbgrader's `OverwriteCells` when autograding."""
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import OverwriteCells

    chosen = c.Autograde.get("sanitize_preprocessors")
    steps = list(chosen or Autograde.class_traits()["sanitize_preprocessors"].default())
    steps = [s for s in steps if s is not RestoreHiddenTests]
    steps.insert(steps.index(OverwriteCells), RestoreHiddenTests)
    c.Autograde.sanitize_preprocessors = steps


def _refuse_in_the_way(folders: list[Path], files: list[tuple[Path, str]]) -> None:
    for folder in folders:
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is in the way: the course needs a folder there")
    for path, what in files:
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise FileExistsError(
                f"{path} is {kind}, so it cannot be {what}: move it away, or give another path"
            )


def make_course(root: str | os.PathLike, source: Path = SOURCE) -> Path:
    """Write an nbgrader course directory at `root` (config + the assignment's source).

    Refuses a `root` that already holds a different source notebook, so an instructor's edits
    are never overwritten, a `root` owned by someone else, and anything in the way (a folder
    named nbgrader_config.py, a file where a folder goes): everything is checked before anything
    is written. The course holds the answer key, and nbgrader later puts the gradebook and every
    submission in it, so it is private: `root` and every folder this makes are mode 700 (only
    the instructor who runs this can enter it), whatever the umask; a co-instructor gets it
    through a group (docs/grading.md). Returns the source notebook's path.
    """
    if not str(root).strip():
        raise ValueError(
            f"the course directory is {str(root)!r}: give a folder, such as ~/lora-course "
            "(use . explicitly for the current folder)"
        )
    root, source = Path(root).expanduser(), Path(source)
    try:
        regular_file(source, "the assignment's source notebook (the answer key)")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc}: it is course/{ASSIGNMENT}.ipynb in a checkout of the lab (a copy made for "
            "students leaves it out); give its path with --source"
        ) from None
    _check_answer_key(source)
    config = root / "nbgrader_config.py"
    target = root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    _refuse_in_the_way(
        [root, root / "source", target.parent],
        [(config, "nbgrader's settings file"), (target, "the source notebook")],
    )
    if root.is_dir() and root.stat().st_uid != os.geteuid():
        owner = _user_name(root.stat().st_uid)
        raise PermissionError(
            f"{root} belongs to {owner}: the course must be a folder of the instructor who runs "
            "this (it is made private to them)"
        )
    if target.exists() and target.read_bytes() != source.read_bytes():
        raise FileExistsError(
            f"{target} exists and differs from {source}: move it away, or use another directory"
        )
    missing = [f for f in (target.parent, *target.parent.parents) if not f.exists()]
    for folder in reversed(missing):  # from the outermost folder in
        folder.mkdir()
        folder.chmod(0o700)  # mkdir's mode is cut by the umask, never widened
    root.chmod(0o700)  # an existing folder too: the gradebook and submissions go in it
    if not config.exists():
        atomic_write_bytes(config, CONFIG.encode())
    atomic_write_bytes(target, source.read_bytes())
    return target


def _check_answer_key(source: Path) -> None:
    """Refuse a source that is not an nbgrader answer key: not a notebook, no graded cells, or
    graded cells without their hidden tests (a student's release given by mistake, which would
    grade every submission as right)."""
    import nbformat

    try:
        nb = nbformat.reads(source.read_text(encoding="utf-8"), as_version=4)
    except Exception as exc:  # nbformat raises several kinds for a file that is not a notebook
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"{source} is not a notebook ({reason})") from None
    graded = [
        c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code"
    ]
    if not graded:
        raise ValueError(
            f"{source} has no graded cells: it is not the assignment's nbgrader source"
        )
    bare = [
        c.metadata.nbgrader.get("grade_id", "?")
        for c in graded
        if "BEGIN HIDDEN TESTS" not in c.source
    ]
    if bare:
        raise ValueError(
            f"{source} has graded cells without hidden tests ({', '.join(bare)}): it looks like a "
            f"student's release, not the answer key (course/{ASSIGNMENT}.ipynb)"
        )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def setup_exchange(
    root: str | os.PathLike, instructor: str, shared_config: str | os.PathLike = SHARED_CONFIG
) -> list[Path]:
    """Set up nbgrader's exchange for the course (as root, once): what it made or checked.

    - `root` (e.g. /srv/nbgrader/exchange), mode 1777 as nbgrader requires: every student's
      `nbgrader submit` writes there; the sticky bit keeps anyone from removing another's files;
    - `root`/lora-lab, owned by `instructor`, mode 755: made now so that no student can make it
      first and pose as the course (with 1777 above it, anyone could);
    - `shared_config` (e.g. /etc/jupyter/nbgrader_config.py), mode 644: the course id and the
      exchange's root, read by the instructor's and every student's nbgrader.

    Refuses, before changing anything: a relative path, an unknown or root instructor, a file
    where a folder goes, a course folder someone else owns, a config that exists with other
    content (it may hold the machine's own settings: merge the lines by hand).
    """
    root, shared_config = Path(root), Path(shared_config)
    for path, what, example in (
        (root, "the exchange's root", EXCHANGE),
        (shared_config, "the shared config", SHARED_CONFIG),
    ):
        if not path.is_absolute():
            raise ValueError(f"{what} {str(path)!r} is not an absolute path, such as {example}")
    try:
        user = pwd.getpwnam(instructor)
    except KeyError:
        raise ValueError(f"there is no user {instructor!r} to own the course's exchange") from None
    if user.pw_uid == 0:
        raise ValueError("the instructor must not be root: nbgrader runs students' code as them")
    course = root / COURSE_ID
    _refuse_in_the_way(
        [*reversed(root.parents), root, course, *reversed(shared_config.parents)],
        [(shared_config, "nbgrader's shared settings file")],
    )
    if course.is_dir() and course.stat().st_uid != user.pw_uid:
        raise PermissionError(
            f"{course} belongs to {_user_name(course.stat().st_uid)}, not {instructor}: someone "
            "made it before the instructor; remove it (after a look inside), then rerun this"
        )
    text = SHARED_CONFIG_TEXT.format(course_id=COURSE_ID, root=str(root))
    if shared_config.exists() and shared_config.read_text(errors="replace") != text:
        raise FileExistsError(
            f"{shared_config} exists with other settings: add these lines to it by hand "
            f"(nothing was changed):\n{text}"
        )
    if os.geteuid() != 0:
        raise PermissionError(
            "setting up the exchange needs root (it makes a folder every user can write, and "
            f"writes {shared_config}): run it with sudo and the venv's python"
        )
    for folder in [*reversed(root.parents), root]:
        if not folder.exists():
            folder.mkdir()
            folder.chmod(0o755)
    root.chmod(0o1777)  # rwx for all, sticky
    if not course.exists():
        course.mkdir()
    os.chown(course, user.pw_uid, user.pw_gid)
    course.chmod(0o755)
    if not shared_config.exists():
        for folder in reversed(shared_config.parents):
            if not folder.exists():
                folder.mkdir()
                folder.chmod(0o755)
        atomic_write_bytes(shared_config, text.encode())
    return [root, course, shared_config]


class LmsExport(ExportPlugin):
    """nbgrader's grades as one row per student, for a learning platform's grade import.

    `nbgrader export --exporter=lab.exercises.course.LmsExport --to grades-lms.csv` writes the
    columns Username (the student's login: nbgrader's student id), Email address, First name,
    Last name, then one column per assignment holding its score after any late penalty. A
    student with no submission gets an empty cell, which a platform's import leaves as it was.
    Names and emails come from the gradebook: `nbgrader db student import students.csv` first.
    The file is written with proper CSV quoting (a name with a comma stays one cell), atomically.
    """

    def export(self, gradebook) -> None:
        from nbgrader.api import MissingEntry

        dest = Path(self.to or "grades-lms.csv")
        names = [
            a.name
            for a in gradebook.assignments
            if not self.assignment or a.name in self.assignment
        ]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["Username", "Email address", "First name", "Last name", *names])
        for student in sorted(gradebook.students, key=lambda s: s.id):
            if self.student and student.id not in self.student:
                continue
            row = [
                student.id,
                student.email or "",
                student.first_name or "",
                student.last_name or "",
            ]
            for name in names:
                try:
                    sub = gradebook.find_submission(name, student.id)
                except MissingEntry:
                    row.append("")
                    continue
                penalty = sub.late_submission_penalty or 0.0
                row.append(f"{max(0.0, sub.score - penalty):g}")
            writer.writerow(row)
        atomic_write_bytes(dest, out.getvalue().encode())
        self.log.info("Exported grades of %d assignment(s) to %s", len(names), dest)


def generate_release(root: Path, timeout: float = 300) -> Path:
    """Run ``nbgrader generate_assignment`` in the course at `root`; the released notebook."""
    root = Path(root)
    _nbgrader(root, "generate_assignment", ASSIGNMENT, "--force", timeout=timeout)
    release = root / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    if not release.is_file():
        raise RuntimeError(f"nbgrader generate_assignment wrote no {release}")
    return release


def _nbgrader(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an nbgrader command in the course directory; raise with its output if it fails."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # nbgrader runs `alembic` (its database migrations) from PATH: the one beside this Python,
    # even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"nbgrader {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.exercises.course",
        description="Make an nbgrader course directory holding the LoRA Lab exercises (as the "
        "instructor), or set up nbgrader's exchange for the course (as root, --exchange).",
    )
    parser.add_argument(
        "directory", nargs="?", help="the course directory (created if absent; private to you)"
    )
    parser.add_argument(
        "--source",
        default=str(SOURCE),
        help=f"the answer key, the assignment's nbgrader source (default: {SOURCE})",
    )
    parser.add_argument(
        "--release", action="store_true", help="also run nbgrader generate_assignment"
    )
    parser.add_argument(
        "--exchange",
        metavar="ROOT",
        help=f"as root: make nbgrader's exchange at ROOT (e.g. {EXCHANGE}) and the shared config",
    )
    parser.add_argument("--instructor", help="with --exchange: the instructor's user name")
    parser.add_argument(
        "--shared-config",
        default=str(SHARED_CONFIG),
        help=f"with --exchange: where the course id and exchange go (default: {SHARED_CONFIG})",
    )
    args = parser.parse_args(argv)
    if args.exchange is None and args.directory is None:
        parser.error("give the course directory, or --exchange ROOT --instructor NAME (as root)")
    if args.exchange is not None and (args.directory is not None or args.release):
        parser.error("--exchange sets up the exchange alone: make the course in another run")
    if args.exchange is not None and not args.instructor:
        parser.error("--exchange needs --instructor NAME: the user who will own the course")
    try:
        if args.exchange is not None:
            for path in setup_exchange(args.exchange, args.instructor, args.shared_config):
                print(f"ready: {path}")
            return 0
        source = make_course(args.directory, Path(args.source))
        print(f"source: {source}")
        if args.release:
            print(f"release: {generate_release(source.parents[2])}")
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"next: cd {args.directory} && nbgrader generate_assignment {ASSIGNMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
