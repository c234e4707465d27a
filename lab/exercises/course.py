"""The exercises as an nbgrader course: one assignment, generated, released and autograded.

One source notebook, ``notebooks/exercises/solutions.ipynb``, is the assignment ``lora_by_hand``
in nbgrader's format: each answer cell marks its solution between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader puts ``# your code here`` in its place), and each exercise is
followed by a graded cell (its points in the cell's metadata and on the exercise's heading) whose
hidden test reruns the exercise's check (`lab.exercises.grade`). Cells tagged ``instructor`` (the
worked mistakes and what the checks say to them) stay in the solutions and are dropped from the
release. ``notebooks/exercises/student.ipynb`` is ``nbgrader generate_assignment``'s output,
executed (``python scripts/release_exercises.py`` rebuilds it; a test fails if the two drift).

An instructor makes a course directory with ``python -m lab.exercises.course DIR`` and then uses
nbgrader as usual there (README, "Teaching a class"). This module imports nbgrader and nbconvert:
`lab.exercises` does not load it, so students need neither.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from nbgrader.preprocessors import NbGraderPreprocessor

from ..fileio import atomic_write_bytes, regular_file

__all__ = [
    "ASSIGNMENT",
    "CODE_STUB",
    "COURSE_ID",
    "DropInstructorCells",
    "INSTRUCTOR_TAG",
    "configure",
    "generate_release",
    "make_course",
]

ASSIGNMENT = "lora_by_hand"  # nbgrader's assignment id (and the notebook's name in the course)
COURSE_ID = "lora-lab"
INSTRUCTOR_TAG = "instructor"  # cells with this tag are in the solutions only
CODE_STUB = "# your code here"  # what replaces a solution: a function body then returns None
CELL_TIMEOUT_S = 600  # per cell when autograding; exercise 4 trains for a few seconds
REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "notebooks" / "exercises" / "solutions.ipynb"
STUDENT = REPO / "notebooks" / "exercises" / "student.ipynb"

CONFIG = '''\
"""nbgrader's settings for the LoRA Lab exercises (written by python -m lab.exercises.course)."""

from lab.exercises.course import configure

configure(get_config())  # noqa: F821 (nbgrader defines get_config)
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
    c.Execute.timeout = CELL_TIMEOUT_S


def make_course(root: str | os.PathLike, source: Path = SOURCE) -> Path:
    """Write an nbgrader course directory at `root` (config + the assignment's source).

    Refuses a `root` that already holds a different source notebook, so an instructor's edits
    are never overwritten, and anything in the way (a folder named nbgrader_config.py, a file
    where a folder goes): everything is checked before anything is written. The course is
    meant to be shared (a co-instructor, a formgrader under another user), so what this writes
    is readable by all, files 644 and the folders it makes 755, whatever the umask; the lab's
    solutions are readable beside the notebooks anyway. Returns the source notebook's path.
    """
    if not str(root).strip():
        raise ValueError(
            f"the course directory is {str(root)!r}: give a folder, such as ~/lora-course "
            "(use . explicitly for the current folder)"
        )
    root, source = Path(root).expanduser(), Path(source)
    regular_file(source, "the assignment's source notebook")
    config = root / "nbgrader_config.py"
    target = root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    folders = [root, root / "source", target.parent]
    for folder in folders:
        if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is in the way: the course needs a folder there")
    for path, what in ((config, "nbgrader's settings file"), (target, "the source notebook")):
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise FileExistsError(f"{path} is {kind}, so it cannot be {what}: move it away")
    if target.exists() and target.read_bytes() != source.read_bytes():
        raise FileExistsError(
            f"{target} exists and differs from {source}: move it away, or use another directory"
        )
    missing = [f for f in (target.parent, *target.parent.parents) if not f.exists()]
    for folder in reversed(missing):  # from the outermost folder in
        folder.mkdir()
        folder.chmod(0o755)  # mkdir's mode is cut by the umask
    if not config.exists():
        atomic_write_bytes(config, CONFIG.encode())
    atomic_write_bytes(target, source.read_bytes())
    return target


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
        description="Make an nbgrader course directory holding the LoRA Lab exercises.",
    )
    parser.add_argument("directory", help="the course directory (created if absent)")
    parser.add_argument(
        "--release", action="store_true", help="also run nbgrader generate_assignment"
    )
    args = parser.parse_args(argv)
    try:
        source = make_course(args.directory)
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
