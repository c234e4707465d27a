"""Test machinery for every pytest run in this checkout (`pytest`, or one notebook alone).

pytest loads this file whatever is collected under the repository root, so nbval's kernels,
which inherit this process's environment, never read or write a user's sweep cache (they see
only the lab's shipped default grid) and never spend time measuring batched chunk sizes
(lab.engine.calibrate), which would also write the user's cache folder, and print no line about a
busy machine (lab.threads), which would differ from the stored outputs. The sanitizer nbval
compares stored outputs through is tests/nbval/sanitize.cfg (named in pyproject.toml).

The README's test command runs the tests in parallel (pytest-xdist, one worker per core), a file
at a time on a worker (`--dist loadfile`: a notebook's cells run in order in one kernel, and a
module's expensive fixture is built once). Every test process, and every kernel or command it
starts, trains with one thread (LORA_LAB_THREADS=1, lab.threads' first rule, unless the caller set
it): two processes with a thread per core each spin against each other on a 2-core machine (a
notebook that takes 6 s alone took minutes so beside three other busy processes). The stored
outputs do not depend on it (every notebook passes strict nbval with 1 thread and with 2). The
longest files go first (LONGEST_FIRST), so that the workers end together instead of one finishing
them alone. Each notebook is checked against its stored outputs once: one that the read-only run
(tests/test_readonly.py) or the browser run (tests/browser/test_lab.py) checks is left out of
nbval's own run when that test is selected and can run.
"""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ["LORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="lora-lab-nbval-cache-")
atexit.register(shutil.rmtree, os.environ["LORA_LAB_CACHE"], ignore_errors=True)
os.environ["LORA_LAB_CALIBRATE"] = "0"
# The "machine is busy" line (lab.threads) would enter the outputs nbval compares.
os.environ["LORA_LAB_BUSY_NOTICE"] = "0"
# One thread for every process a test run starts (kernels, CLI runs, graders), serial or parallel:
# the README's command runs a worker per core, and a test starts processes beside them.
os.environ.setdefault("LORA_LAB_THREADS", "1")

# The files that take longest (a fresh clone's run, timed per test), longest first, except that
# the read-only run leads: it builds the class venv (cached) that the hub and the round trip
# reuse. Files that mostly wait (Ray's start-ups, the hub's servers and culls) alternate with
# files that compute, so that a worker's wait is the other's turn. Only the order changes.
LONGEST_FIRST = [
    "tests/test_readonly.py",  # computes: notebooks 04-06 under strict nbval as `nobody`
    "tests/engine/test_remote.py",  # waits: four Ray start-ups
    "tests/browser/test_lab.py",  # computes: the walkthrough in JupyterLab
    "tests/browser/test_hub.py",  # waits: a hub, two students, culls
    "tests/test_class_roundtrip.py",
    "tests/exercises/test_autograde.py",
    "tests/exercises/test_grading.py",
    "notebooks/07_why_low_rank.ipynb",
    "tests/browser/test_dashboard.py",
    "tests/test_bad_input_cli.py",
    "notebooks/09_what_practitioners_learned.ipynb",
    "tests/test_classroom_bench.py",
    "tests/explorer/test_widgets.py",
    "tests/engine/test_batched.py",
]


def pytest_configure(config):
    """Find the sanitizer from any folder (pyproject.toml names it relative to the root), and keep
    the collection's order when xdist hands out files: by default it hands out the files with the
    most tests first, whatever LONGEST_FIRST says (a fresh clone's run started the read-only run
    11 minutes in and ended with one worker idle for a minute)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    path = getattr(config.option, "nbval_sanitize_with", None)
    if path and not os.path.isabs(path) and not os.path.exists(path):
        config.option.nbval_sanitize_with = str(config.rootpath / path)


READ_ONLY_RUN = (
    "tests/test_readonly.py::test_the_lab_runs_from_a_read_only_copy_writing_only_under_home"
)


def read_only_run_checks(items) -> list[str]:
    """The notebooks tests/test_readonly.py runs under strict nbval (from a read-only copy, as
    user `nobody`), when it is selected and can run here (root on Linux, strace and setpriv
    installed); else none."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return []
    if shutil.which("strace") is None or shutil.which("setpriv") is None:
        return []
    for item in items:
        if item.nodeid == READ_ONLY_RUN:
            return list(item.module.NOTEBOOKS)
    return []


BROWSER_RUN = "tests/browser/test_lab.py"


def browser_run_checks(items) -> list[str]:
    """The notebooks the selected tests of tests/browser/test_lab.py run in JupyterLab and compare
    with their stored outputs as strict nbval does, when they can run here (Playwright and a
    Chromium); else none."""
    found = []
    for item in items:
        if item.nodeid.startswith(BROWSER_RUN + "::"):
            if not item.module.can_run():
                return []
            found.append(item.module.checked_by(item))
    return [path for path in found if path]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """Each notebook runs under strict nbval once; the files in LONGEST_FIRST go first.

    A notebook the read-only run checks under strict nbval (the same stored outputs, the same
    sanitizer), or the browser run in JupyterLab with its outputs compared as strict nbval does,
    is not run a second time here when that run is selected and can run.
    """
    twice = set(read_only_run_checks(items)) | set(browser_run_checks(items))
    if twice:
        root = config.rootpath
        again = [i for i in items if i.path.relative_to(root).as_posix() in twice]
        if again:
            config.hook.pytest_deselected(items=again)
            items[:] = [i for i in items if i not in again]
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def order(item):
        path = item.path.relative_to(config.rootpath).as_posix()
        return rank.get(path, len(rank))

    items.sort(key=order)  # stable: within a file, and among the rest, the order is pytest's
