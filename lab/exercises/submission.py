"""A submission's worker process, seen from the grader: start it, run cells, read names, restart."""

from __future__ import annotations

import contextlib
import os
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

from . import channel
from .channel import WorkerLost
from .remote_function import RemoteFunction
from .sandbox import sandbox_command, sandbox_mode

__all__ = [
    "CALL_TIMEOUT_S",
    "CELL_TIMEOUT_S",
    "MEMORY_LIMIT",
    "Submission",
]


# One notebook cell: exercise 4 trains for a few seconds alone, but 80 s were seen on a busy
# 2-core machine, and a grade must not depend on the load: a cell that never ends costs this.
CELL_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 120.0  # one call of a student's function by a check (well under 1 s alone)
MEMORY_LIMIT = 4 * 2**30  # bytes of address space for a submission's process (torch takes ~1)
START_TIMEOUT_S = 120.0  # the worker's start (Python, torch, the lab)
MAX_SKIPPED_FRAMES = 100  # frames without the request's id, skipped before giving up


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
            channel.write_frame(self.requests, {"op": "exit"})
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
            channel.write_frame(self.requests, request)
            for _ in range(MAX_SKIPPED_FRAMES):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self.replies], [], [], max(left, 0))
                if not ready:
                    self._kill()
                    raise WorkerLost(f"it did not finish within {timeout:g} s")
                reply = channel.read_frame(self.replies)
                if reply.get("id") == request["id"]:
                    return reply
            raise channel.FrameError("too many frames that answer nothing")
        except (OSError, channel.FrameError) as exc:
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
            raise channel.FrameError("names: no values")
        out: dict[str, Any] = {}
        for name in names:
            v = values.get(name)
            if isinstance(v, dict) and v.get("missing"):
                continue
            if isinstance(v, dict) and isinstance(v.get("callable"), int):
                out[name] = RemoteFunction(self, v["callable"], name)
            else:
                out[name] = channel.decode(v)
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
