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
import base64
import builtins
import contextlib
import html
import io
import os
import pickle
import re
import resource
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
import torch
from nbgrader.preprocessors import NbGraderPreprocessor
from torch.utils._python_dispatch import _disable_current_modes
from traitlets import Float, Integer

from . import feedback as feedback_module
from . import remote
from .sandbox import sandbox_command, sandbox_mode

__all__ = [
    "CALL_TIMEOUT_S",
    "CELL_TIMEOUT_S",
    "LabExecute",
    "RemoteFunction",
    "Submission",
    "configure_autograde",
    "grade_notebook",
]

# One notebook cell: exercise 4 trains for a few seconds alone, but 80 s were seen on a busy
# 2-core machine, and a grade must not depend on the load: a cell that never ends costs this.
CELL_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0  # one call of a student's function by a check (well under 1 s alone)
MEMORY_LIMIT = 4 * 2**30  # bytes of address space for a submission's process (torch takes ~1)
START_TIMEOUT_S = 120.0  # the worker's start (Python, torch, the lab)
MAX_SKIPPED_FRAMES = 100  # frames without the request's id, skipped before giving up


class WorkerLost(RuntimeError):
    """The submission's process stopped answering (it ran too long, exited, or crashed)."""


class Submission:
    """One submission's worker process: start it, run cells, read names, call its functions."""

    def __init__(
        self,
        hide: list[str] | None = None,
        env: dict[str, str] | None = None,
        cell_timeout: float = CELL_TIMEOUT_S,
        call_timeout: float = CALL_TIMEOUT_S,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        for name, value in (("cell_timeout", cell_timeout), ("call_timeout", call_timeout)):
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ValueError(f"{name} is {value!r}: give a number of seconds above 0")
        if not (isinstance(memory_limit, int) and memory_limit >= 2**30):
            raise ValueError(
                f"memory_limit is {memory_limit!r}: give bytes, at least 2**30 (1 GiB; torch "
                "alone takes about 0.8)"
            )
        self.hide = list(hide or [])
        self.env = env
        self.cell_timeout, self.call_timeout = float(cell_timeout), float(call_timeout)
        self.memory_limit = memory_limit
        self.proc: subprocess.Popen | None = None
        self.changed: list[str] = []  # module attributes the submission rebound, in order seen
        self.stderr = b""

    # -- the process ------------------------------------------------------------------------

    def start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        argv = [sys.executable, "-m", "lab.exercises.worker", str(req_r), str(rep_w)]
        env = _worker_env(self.env)
        if sandbox_mode() == "bwrap":
            from .course import SOURCE  # the lab's answer key: never visible to a submission

            argv = sandbox_command(argv, hide=[*self.hide, str(SOURCE.parent)], env=env)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        err_r, err_w = os.pipe()
        limit = self.memory_limit

        def limits() -> None:  # in the child, before bwrap: inherited by the submission
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        self.proc = subprocess.Popen(
            argv,
            preexec_fn=limits,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_w,
            pass_fds=(req_r, rep_w),
            env=env,
            cwd="/",
            start_new_session=True,
        )
        for fd in (req_r, rep_w, err_w):
            os.close(fd)
        self.requests, self.replies = req_w, rep_r
        threading.Thread(target=self._drain, args=(err_r,), daemon=True).start()
        try:
            self.ask({"op": "names", "names": []}, START_TIMEOUT_S)  # up and listening
        except WorkerLost as exc:
            where = "the sandbox (bwrap)" if sandbox_mode() == "bwrap" else "Python"
            raise WorkerLost(
                f"the grader could not start a submission's process in {where}: {exc}. Where "
                "a system forbids unprivileged user namespaces (Ubuntu 24.04's AppArmor, a "
                "container), see docs/grading.md"
            ) from None

    def _drain(self, fd: int) -> None:
        """Keep the last few KB of what the worker writes to stderr (for a crash's message)."""
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 65536):
                self.stderr = (self.stderr + chunk)[-8192:]
        os.close(fd)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            remote.write_frame(self.requests, {"op": "exit"})
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for fd in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ask(self, request: dict, timeout: float) -> dict:
        """Send one request and wait for its reply; WorkerLost (worker killed) past `timeout`."""
        if not self.alive:
            raise WorkerLost("the submission's process is not running")
        # Each request carries a random id that its reply must repeat: a frame the submission
        # wrote into the channel itself is skipped, not taken for the answer.
        request = {**request, "id": secrets.randbits(62)}
        deadline = time.monotonic() + timeout
        try:
            remote.write_frame(self.requests, request)
            for _ in range(MAX_SKIPPED_FRAMES):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self.replies], [], [], max(left, 0))
                if not ready:
                    self._kill()
                    raise WorkerLost(f"it did not finish within {timeout:g} s")
                reply = remote.read_frame(self.replies)
                if reply.get("id") == request["id"]:
                    return reply
            raise remote.FrameError("too many frames that answer nothing")
        except (OSError, remote.FrameError) as exc:
            self._kill()
            code = self.proc.returncode if self.proc else None
            if isinstance(exc, WorkerLost):
                raise
            said = self.stderr.decode(errors="replace").strip().splitlines()[-3:]
            tail = f": {' | '.join(said)}" if said else ""
            raise WorkerLost(f"the process stopped (exit code {code}){tail}") from None

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # -- what the grader asks -----------------------------------------------------------------

    def run(self, source: str) -> tuple[list[dict], bool]:
        reply = self.ask({"op": "run", "source": source}, self.cell_timeout)
        outputs = reply.get("outputs")
        self._note(reply.get("changed"))
        return (_valid_outputs(outputs), bool(reply.get("ok")))

    def names(self, names: list[str]) -> dict[str, Any]:
        """Each name's value in the notebook: plain data, a RemoteFunction, or NameError."""
        reply = self.ask({"op": "names", "names": names}, self.call_timeout)
        values = reply.get("values")
        if not isinstance(values, dict):
            raise remote.FrameError("names: no values")
        out: dict[str, Any] = {}
        for name in names:
            v = values.get(name)
            if isinstance(v, dict) and v.get("missing"):
                continue
            if isinstance(v, dict) and isinstance(v.get("callable"), int):
                out[name] = RemoteFunction(self, v["callable"], name)
            else:
                out[name] = remote.decode(v)
        return out

    def _note(self, changed: object) -> None:
        if isinstance(changed, list):
            for name in changed:
                if isinstance(name, str) and name[:200] not in self.changed:
                    self.changed.append(name[:200])


def _worker_env(extra: dict[str, str] | None) -> dict[str, str]:
    home = "/tmp/home" if sandbox_mode() == "bwrap" else os.environ.get("HOME", "/tmp")
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": home,
        "LANG": "C.UTF-8",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "LORA_LAB_BUSY_NOTICE": "0",  # the grader's log is not the place for load notices
        "LORA_LAB_CALIBRATE": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for key in ("PYTHONPATH", "LORA_LAB_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return {**env, **(extra or {})}


def _valid_outputs(outputs: object) -> list[dict]:
    """The worker's outputs for a cell, kept only where they have nbformat's shape."""
    kept = []
    for out in outputs if isinstance(outputs, list) else []:
        if not isinstance(out, dict):
            continue
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") in ("stdout", "stderr"):
            kept.append({"output_type": kind, "name": out["name"], "text": str(out.get("text"))})
        elif kind in ("display_data", "execute_result") and isinstance(out.get("data"), dict):
            data = {k: v for k, v in out["data"].items() if isinstance(v, str)}
            entry = {"output_type": kind, "data": data, "metadata": {}}
            if kind == "execute_result":
                count = out.get("execution_count")
                entry["execution_count"] = count if isinstance(count, int) else None
            kept.append(entry)
        elif kind == "error":
            tb = out.get("traceback")
            kept.append(
                {
                    "output_type": "error",
                    "ename": str(out.get("ename"))[:200],
                    "evalue": str(out.get("evalue"))[:2000],
                    "traceback": [str(t) for t in tb][:40] if isinstance(tb, list) else [],
                }
            )
    return kept


# ---------------------------------------------------------------------------------------------
# A student's function, called from the grader
# ---------------------------------------------------------------------------------------------


class RemoteFunction:
    """Stands for a function of the submission; calling it runs it in the worker.

    The check that calls it sees what it would see in-process: the result (as plain data),
    its arguments as the call left them (updated in place, same objects), an exception of the
    same name and message if the function raised, gradients through a result that needs them,
    and the watches it had running (a forward building B @ A, a count building a model).
    """

    def __init__(self, submission: Submission, handle: int, name: str) -> None:
        self.submission, self.handle, self.__name__ = submission, handle, name

    def __repr__(self) -> str:
        return f"<function {self.__name__} of the submission>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():  # the grader's bookkeeping is not the student's code
            roots = (args, kwargs)
            before = remote.walk(roots)
            index = {id(o): i for i, o in enumerate(before)}
            watches, asked = [], []
            for watch in feedback_module.ACTIVE_WATCHES:
                kind = getattr(watch, "kind", None)
                if kind == "builds_delta":
                    a, b = (index.get(id(t)) for t in watch.alive[:2])
                    if a is not None and b is not None:
                        asked.append({"kind": kind, "A": a, "B": b})
                        watches.append(watch)
                elif kind == "builds_modules":
                    asked.append({"kind": kind})
                    watches.append(watch)
            request = {
                "op": "call",
                "handle": self.handle,
                "payload": base64.b64encode(pickle.dumps(roots)).decode(),
                "grad": torch.is_grad_enabled(),
                "watch": asked,
            }
            try:
                reply = self.submission.ask(request, self.submission.call_timeout)
            except WorkerLost as exc:
                raise TimeoutError(f"{self.__name__}: {exc}") from None
            remote.apply_state(reply.get("args"), before)
            seen = reply.get("watch") if isinstance(reply.get("watch"), dict) else {}
            for watch in watches:
                value = seen.get(watch.kind)
                if watch.kind == "builds_delta":
                    watch.built = bool(watch.built or value)
                elif isinstance(value, int):
                    watch.count += value
            if isinstance(reply.get("raised"), dict):
                raise _exception(reply["raised"])
            result = remote.apply_state(reply.get("result"), before)
            call = reply.get("call")
            leaves = [
                i
                for i, o in enumerate(before)
                if isinstance(o, torch.Tensor) and o.requires_grad and o.is_leaf
            ]
        return self._with_grad(result, call, leaves, before)

    def _with_grad(self, result: Any, call: object, leaves: list[int], before: list) -> Any:
        """A result that needs gradients, linked to the grader's tensors through the worker."""

        def link(t: Any, path: int | None) -> Any:
            if not (isinstance(t, torch.Tensor) and t.requires_grad and leaves):
                return t
            meta = (self.submission, call, path, leaves)
            return _RemoteGrad.apply(t.detach(), meta, *(before[i] for i in leaves))

        if isinstance(result, torch.Tensor):
            return link(result, None)
        if isinstance(result, tuple | list):
            linked = [link(t, i) for i, t in enumerate(result)]
            return tuple(linked) if isinstance(result, tuple) else linked
        return result


class _RemoteGrad(torch.autograd.Function):
    """The result of a student's function as a function of the grader's inputs: its backward
    asks the worker for the gradients through the student's own computation."""

    @staticmethod
    def forward(ctx, value, meta, *inputs):  # noqa: ARG004 (inputs: what gradients reach)
        ctx.meta = meta
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        submission, call, path, leaves = ctx.meta
        request = {
            "op": "vjp",
            "call": call,
            "outputs": [path],
            "grads": [remote.encode(grad_out)],
            "inputs": leaves,
        }
        try:
            reply = submission.ask(request, submission.call_timeout)
            grads = reply.get("grads")
            if not isinstance(grads, list) or len(grads) != len(leaves):
                raise RuntimeError(reply.get("error", "no gradients came back"))
            decoded = [None if g is None else remote.decode(g) for g in grads]
        except WorkerLost as exc:
            raise RuntimeError(f"gradients through your function: {exc}") from None
        return (None, None, *decoded)


def _exception(raised: dict) -> BaseException:
    """The student's exception, rebuilt by name and message (never a KeyboardInterrupt:
    that would stop the grader itself)."""
    name, message = str(raised.get("type"))[:80], str(raised.get("message"))[:2000]
    listed = raised.get("bases")
    bases = [str(b) for b in listed] if isinstance(listed, list) else []
    if name == "SystemExit":
        return SystemExit(message)
    for base in [name, *bases]:
        cls = getattr(builtins, base, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            if base == name:
                with contextlib.suppress(Exception):
                    return cls(message)
            safe = name if name.isidentifier() else "Error"
            return type(safe, (cls,), {})(message)
    safe = name if name.isidentifier() else "Error"
    return type(safe, (Exception,), {})(message)


# ---------------------------------------------------------------------------------------------
# A graded cell's hidden test, run here
# ---------------------------------------------------------------------------------------------


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
