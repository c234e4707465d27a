"""Autograding where a submission cannot reach the grader: nbgrader's executor, replaced.

nbgrader's own autograde runs a submission's cells and then its hidden tests in one kernel, so a
cell that rebinds `lab.exercises.grade`, a check, `torch.allclose` or a builtin decides its own
grade. Here the two are apart:

- the submission's cells run in a worker process (lab.exercises.worker) inside a sandbox
  (lab.exercises.sandbox): files read-only, the course folder and the answer key hidden, no
  network, a time limit on every cell and every call;
- each graded cell's hidden test (``grade("check_forward", my_forward)``, as the gradebook
  recorded it from the instructor's source, whatever the submitted cell holds) runs here, in the
  grader's process, with the lab this process imported itself. The names it uses come from the
  worker as plain data, or, for a function, as a stand-in that calls the student's function in
  the worker (`RemoteFunction`). The check itself never runs where the submission's code runs.

So nothing a submission does in its own process changes a grade except its answers. What it
rebound in the lab's, torch's or builtins' modules is still reported, in the graded cells'
feedback and in the autograde log, so that an instructor sees who tried.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import html
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import nbformat
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Float, Integer

from .channel import WorkerLost
from .remote_function import RemoteFunction
from .submission import CALL_TIMEOUT_S, CELL_TIMEOUT_S, MEMORY_LIMIT, Submission

__all__ = [
    "CALL_TIMEOUT_S",
    "CELL_TIMEOUT_S",
    "LabExecute",
    "RemoteFunction",
    "Submission",
    "configure_autograde",
    "grade_notebook",
]


def _free_names(source: str) -> list[str]:
    """Names the hidden test reads but does not bind itself (nor are they builtins)."""
    tree = ast.parse(source)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
    return sorted(read - bound - set(dir(builtins)))


def run_hidden_test(source: str, submission: Submission) -> tuple[bool, str]:
    """Run a graded cell's hidden test here; (passed, what it printed or why it failed)."""
    out = io.StringIO()
    try:
        namespace: dict[str, Any] = {"__name__": "__grader__"}
        namespace.update(submission.names(_free_names(source)))
        with contextlib.redirect_stdout(out):
            exec(compile(source, "<hidden test>", "exec"), namespace)
        return True, out.getvalue().strip()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # NotPassed (the hint), or a name the notebook never defined
        from .grading import NotPassed

        if isinstance(exc, NotPassed):
            return False, str(exc)
        if isinstance(exc, NameError):
            return False, f"not yet: {exc} (run the exercise's cells before submitting)"
        return False, f"not yet: the check could not run ({type(exc).__name__}: {exc})"


def _titles(cells: list) -> dict[int, str]:
    """Each graded cell's exercise, from the heading above it ("Exercise 9(a): ...")."""
    titles, heading = {}, "this exercise"
    for i, cell in enumerate(cells):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.lstrip().startswith("#") and "Exercise" in line:
                    heading = re.sub(r"\s*\([^)]*\)\s*$", "", line.lstrip("# ").strip())
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            title = heading
            part = re.match(r"ex(\d+)([a-z])_", str(meta.get("grade_id", "")))
            if part:
                title = re.sub(
                    rf"Exercise {part[1]}\b", f"Exercise {part[1]}({part[2]})", title, count=1
                )
            titles[i] = title
    return titles


def _graded_outputs(title: str, passed: bool, text: str, changed: list[str]) -> list[dict]:
    note = ""
    if changed:
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        shown = ", ".join(changed[:6]) + more
        note = (
            f"\n\nNote: this notebook changed {shown}. Grading runs the checks in a separate "
            "process, so that changes no grade; your instructor sees this note."
        )
    message = f"{title}: {text}{note}"
    if passed:
        return [{"output_type": "stream", "name": "stdout", "text": message + "\n"}]
    style = "white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere"
    return [
        {
            "output_type": "display_data",
            "data": {
                "text/plain": message,
                "text/html": f'<div style="{style}">{html.escape(message)}</div>',
            },
            "metadata": {},
        },
        {
            "output_type": "error",
            "ename": "NotPassed",
            "evalue": f"{title}: not yet passed (the hint is above)",
            "traceback": [f"NotPassed: {title}: not yet passed (the hint is above)"],
        },
    ]


def graded_cells(nb) -> dict[int, str]:
    """The graded test cells of a notebook the instructor built, by index: their sources.

    Only for a notebook whose cells are trusted as they stand (the answer key, a test's own
    notebooks): for a submission, `LabExecute` takes each test's code from the gradebook.
    """
    return {
        i: cell.source
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        and cell.metadata.get("nbgrader", {}).get("grade")
        and not cell.metadata.get("nbgrader", {}).get("solution")
    }


def grade_notebook(
    nb,
    hide: list[str] | None = None,
    log=None,
    tests: dict[int, str] | None = None,
    **limits: Any,
) -> list[str]:
    """Run a submission's cells in a sandboxed worker and its graded cells' hidden tests here;
    write every cell's outputs into `nb`. Returns what the submission rebound (tamper notes).

    `tests` maps each graded cell's index to the code to run here for it (the gradebook's,
    never the submission's own: see LabExecute); by default, `graded_cells(nb)`. `limits`:
    Submission's cell_timeout, call_timeout and memory_limit.
    """
    tests = graded_cells(nb) if tests is None else tests
    titles = {i: t for i, t in _titles(nb.cells).items() if i in tests}
    titles.update({i: "this exercise" for i in tests if i not in titles})
    submission = Submission(hide, **limits)
    ran: list[str] = []  # cells run so far: replayed after a restart
    count = 0
    try:
        submission.start()
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            count += 1
            if not submission.alive:
                _restart(submission, ran, log)
            if i in tests:
                passed, text = run_hidden_test(tests[i], submission)
                outputs = _graded_outputs(titles[i], passed, text, submission.changed)
                cell.outputs = [nbformat.from_dict(o) for o in outputs]
                cell.execution_count = count
                if log and submission.changed:
                    log.warning("the submission changed %s", ", ".join(submission.changed))
                continue
            try:
                outputs, _ = submission.run(cell.source)
            except WorkerLost as exc:
                kind = "CellTimeoutError" if "within" in str(exc) else "WorkerLost"
                outputs = [_error(kind, str(exc))]
            else:
                ran.append(cell.source)
            cell.outputs = [nbformat.from_dict(o) for o in outputs]
            cell.execution_count = count
    finally:
        submission.stop()
    return submission.changed


def _restart(submission: Submission, ran: list[str], log) -> None:
    """A fresh worker with the cells that had run, run again (their outputs are kept as they
    were); a cell that fails to replay ends the replay there."""
    if log:
        log.warning("the submission's process stopped; restarted, replaying %d cells", len(ran))
    submission.stop()
    submission.start()
    for source in ran:
        try:
            submission.run(source)
        except WorkerLost:
            submission.stop()
            submission.start()
            break


def _error(name: str, message: str) -> dict:
    return {
        "output_type": "error",
        "ename": name,
        "evalue": f"this cell {message}",
        "traceback": [f"{name}: this cell {message}"],
    }


# ---------------------------------------------------------------------------------------------
# nbgrader: the executor in autograde's pipeline
# ---------------------------------------------------------------------------------------------


def _hidden_paths(resources: dict) -> list[str]:
    """What a submission must not see: the course folder (the gradebook's, nbgrader's working
    folder) and the lab's answer key."""
    from .course import SOURCE

    paths = {os.getcwd(), str(SOURCE.parent)}
    url = str(resources.get("nbgrader", {}).get("db_url", ""))
    if url.startswith("sqlite:///"):
        paths.add(str(Path(url.removeprefix("sqlite:///")).resolve().parent))
    return sorted(paths)


class LabExecute(NbGraderPreprocessor):
    """Run the submission in a sandboxed worker; grade its graded cells in this process.

    Settings (an nbgrader_config.py's ``c.LabExecute.<name>``): how long one cell and one call
    of a student's function may run, and how much memory a submission may take.
    """

    cell_timeout = Float(CELL_TIMEOUT_S, help="seconds one cell may run").tag(config=True)
    call_timeout = Float(CALL_TIMEOUT_S, help="seconds one call by a check").tag(config=True)
    memory_limit = Integer(MEMORY_LIMIT, help="bytes of address space").tag(config=True)

    def preprocess(self, nb, resources):
        start = time.perf_counter()
        changed = grade_notebook(
            nb,
            _hidden_paths(resources),
            self.log,
            tests=self.recorded_tests(nb, resources),
            cell_timeout=self.cell_timeout,
            call_timeout=self.call_timeout,
            memory_limit=self.memory_limit,
        )
        self.log.info(
            "graded outside the submission's process in %.1f s%s",
            time.perf_counter() - start,
            f"; it changed {', '.join(changed)}" if changed else "",
        )
        return nb, resources

    def recorded_tests(self, nb, resources) -> dict[int, str]:
        """Each graded test cell's code as the gradebook recorded it from the source.

        A submission's own metadata decides nothing here: a cell runs in the grader's process
        only if the gradebook holds a locked, graded code cell of its grade id, and then the
        gradebook's source runs, whatever the submitted cell says.
        """
        from nbgrader.api import Gradebook, MissingEntry

        info = resources["nbgrader"]
        tests = {}
        with Gradebook(info["db_url"]) as gb:
            for i, cell in enumerate(nb.cells):
                grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
                if cell.cell_type != "code" or not grade_id:
                    continue
                where = (grade_id, info["notebook"], info["assignment"])
                try:
                    recorded = gb.find_source_cell(*where)
                    graded = gb.find_graded_cell(*where)
                except MissingEntry:
                    continue
                try:
                    gb.find_solution_cell(*where)
                    continue  # an answer the instructor grades by hand
                except MissingEntry:
                    pass
                if recorded.locked and recorded.cell_type == "code":
                    tests[i] = recorded.source
                    # The gradebook's word on what this cell is, whatever the submission says.
                    cell.metadata["nbgrader"].update(
                        grade=True, solution=False, locked=True, points=float(graded.max_score)
                    )
        return tests


TEMPLATES = Path(__file__).parent / "templates"  # the feedback page's contents (feedback/)


def configure_autograde(c) -> None:
    """Put LabExecute where nbgrader's Execute runs in autograde, and the lab's feedback page
    (its contents name each exercise) in generate_feedback (an nbgrader_config's `c`)."""
    import nbgrader
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute

    defaults = Autograde.class_traits()["autograde_preprocessors"].default()
    c.Autograde.autograde_preprocessors = [LabExecute if p is Execute else p for p in defaults]
    pages = Path(nbgrader.__file__).parent / "server_extensions" / "formgrader" / "templates"
    # nbgrader's "feedback" template, with one file of the lab's beside it (templates/feedback/)
    # that extends its page: both generate_feedback and the formgrader's button use it.
    c.HTMLExporter.extra_template_basedirs = [str(TEMPLATES), str(pages)]
    c.HTMLExporter.template_file = "lora_lab_feedback.html.j2"
