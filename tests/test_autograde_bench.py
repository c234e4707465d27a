"""benchmarks/autograde.py without its timings: the two courses it compares differ in the one
setting it means to compare (the executor), and its command line refuses a bad count.

The timing run itself (four nbgrader autogrades at least) is left to `python -m
benchmarks.autograde`; tests/exercises/test_autograde.py grades the same submissions for what
they score.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from traitlets.config.loader import PyFileConfigLoader

from benchmarks import autograde as bench
from lab.exercises.course import ASSIGNMENT

ROOT = Path(__file__).resolve().parents[1]


def executor(root: Path) -> str:
    """The class name of the first autograde preprocessor the course's config sets."""
    from nbgrader.converters import Autograde

    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config()
    steps = config.Autograde.get("autograde_preprocessors")
    steps = steps or Autograde.class_traits()["autograde_preprocessors"].default()
    return steps[0].__name__


def copied_release(first: Path):
    """A stand-in for generate_release that copies the release nbgrader made in the course at
    `first` (one source gives one release): the second course costs no nbgrader process."""

    def generate_release(root: Path) -> Path:
        rel = Path("release") / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        (root / rel).parent.mkdir(parents=True)
        shutil.copyfile(first / rel, root / rel)
        return root / rel

    return generate_release


@pytest.fixture(scope="module")
def courses(tmp_path_factory):
    """Each course as bench.make makes it; nbgrader generates the first one's release."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        for mode in bench.MODES:
            root = tmp_path_factory.mktemp(mode)
            bench.make(root, mode)
            out[mode] = root
            patch.setattr(bench, "generate_release", copied_release(out[next(iter(out))]))
    return out


def test_the_two_courses_differ_only_in_the_executor(courses):
    assert executor(courses["lab"]) == "LabExecute"
    assert executor(courses["nbgrader"]) == "Execute"
    lab_config = (courses["lab"] / "nbgrader_config.py").read_text()
    nbgrader_config = (courses["nbgrader"] / "nbgrader_config.py").read_text()
    assert nbgrader_config == lab_config + bench.NBGRADER_EXECUTE


def test_each_course_holds_one_complete_submission(courses):
    import nbformat

    for root in courses.values():
        nb = nbformat.read(
            root / "submitted" / bench.STUDENT / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4
        )
        answers = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
        assert answers and not any("# your code here" in c.source for c in answers)


def test_a_repeat_count_below_one_is_refused():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.autograde", "--repeats", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--repeats 0 must be at least 1" in done.stderr
