"""Start and stop the JupyterLab and Voilà servers the browser tests drive.

Each server gets a free port on 127.0.0.1, a random token and its own temporary HOME, IPython,
matplotlib, Jupyter and JupyterLab settings/runtime/workspace folders and sweep cache, so the tests
never read or write a user's files and never see another test run. A server runs in its own
process group and is stopped by its PID (SIGTERM, then SIGKILL for the whole group); kernels,
which Jupyter starts in sessions of their own, are found by their connection files in the
server's private runtime folder and stopped by PID too.

The class's JupyterHub, with real accounts, is in hub.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
from needs import interruptible

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

# The lab's shipped JupyterLab defaults (no news or update pop-ups), as the README starts it.
LAB_DEFAULTS = NOTEBOOKS / ".jupyter" / "lab" / "settings"
# JupyterLab user settings for the tests: no autosave (the notebooks are copies, but a dirty
# document must not be written while a test reads it), and every cell kept in the DOM (no
# windowing), so a test can read outputs that are off screen.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_env(base: Path) -> dict[str, str]:
    """os.environ with every per-user folder a server or kernel writes pointed into `base`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.pop("MPLBACKEND", None)  # the unit tests' Agg; notebooks pick their own backend
    folders = {
        "HOME": "home",
        "IPYTHONDIR": "ipython",
        "MPLCONFIGDIR": "matplotlib",
        "XDG_CACHE_HOME": "cache",
        "XDG_CONFIG_HOME": "config",
        "XDG_DATA_HOME": "data",
        "JUPYTER_CONFIG_DIR": "jupyter/config",
        "JUPYTER_DATA_DIR": "jupyter/data",
        "JUPYTER_RUNTIME_DIR": "jupyter/runtime",
        "JUPYTERLAB_SETTINGS_DIR": "jupyterlab/settings",
        "JUPYTERLAB_WORKSPACES_DIR": "jupyterlab/workspaces",
        "LORA_LAB_CACHE": "sweep-cache",
    }
    for var, sub in folders.items():
        path = base / sub
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    # The notebooks import `lab` from the checkout whatever folder they are served from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    return env


def copy_notebook(src: Path, dest: Path) -> Path:
    """Copy a notebook without its outputs and execution counts (so a run shows in the counts)."""
    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class Server:
    """A running server: its URL, token, process and private folders."""

    name: str
    url: str  # http://127.0.0.1:PORT
    token: str
    process: subprocess.Popen
    base: Path  # the private folder tree
    log_path: Path
    kernel_marker: str  # a path every kernel's command line of this server contains
    started_seconds: float = 0.0

    def api(self, method: str, path: str, timeout: float = 10.0) -> object:
        """Call the server's REST API with the token; returns the decoded JSON (or None)."""
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def connection_file(self, relpath: str) -> Path:
        """The connection file of the kernel of the open notebook at `relpath` (from root)."""
        sessions = [s for s in self.api("GET", "/api/sessions") or [] if s["path"] == relpath]
        assert len(sessions) == 1, f"{len(sessions)} sessions for {relpath}"
        kernel = sessions[0]["kernel"]["id"]
        return self.base / "jupyter" / "runtime" / f"kernel-{kernel}.json"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def shutdown_sessions(self) -> None:
        """Stop every kernel through the API (best effort: the server may already be gone)."""
        try:
            for session in self.api("GET", "/api/sessions") or []:
                self.api("DELETE", f"/api/sessions/{session['id']}")
        except (OSError, urllib.error.URLError, ValueError):
            pass

    def stop(self) -> None:
        """Stop the server and its kernels by PID, whatever state they are in."""
        stop_process_group(self.process)
        kill_kernels(self.kernel_marker)


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process (a clean Jupyter shutdown), then SIGKILL its whole group."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    with contextlib.suppress(OSError):  # the group: anything it started in it
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def kill_kernels(marker: str) -> list[int]:
    """SIGKILL every process whose command line mentions `marker` (Linux /proc); returns PIDs."""
    killed = []
    proc = Path("/proc")
    if not proc.is_dir() or not marker:
        return killed
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except OSError:
                pass
    return killed


def _wait_until_up(server: Server, path: str | None, timeout: float) -> None:
    """Poll `path` until the server answers 200 (None: until the port accepts), or fail."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if path is None:
                port = int(server.url.rsplit(":", 1)[1])
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            else:
                server.api("GET", path, timeout=5)
            return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} not up after {timeout:.0f} s ({last}):\n{server.log_tail()}")


def _launch(name: str, cmd: list[str], env: dict, cwd: Path, base: Path) -> subprocess.Popen:
    log_path = base / f"{name}.log"
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
            # SIGINT as a terminal or systemd gives it, even when this test run was started in
            # the background (which ignores SIGINT, and a child inherits that): JupyterHub stops
            # its services with SIGINT first, and a service that ignores it costs 10 s each.
            preexec_fn=interruptible,
        )
    finally:
        log.close()


def _serve(
    name: str,
    command: Callable[[int, str], list[str]],
    env: dict,
    cwd: Path,
    base: Path,
    kernel_marker: str,
    ready_path: str | None,
    timeout: float,
    attempts: int = 3,
) -> Server:
    """Start `command(port, token)` and wait until it answers; a new port if it exits early
    (another process took the free port between the check and the bind)."""
    start = time.perf_counter()
    for attempt in range(1, attempts + 1):
        port, token = free_port(), secrets.token_hex(16)
        process = _launch(name.lower(), command(port, token), env, cwd, base)
        server = Server(
            name,
            f"http://127.0.0.1:{port}",
            token,
            process,
            base,
            base / f"{name.lower()}.log",
            kernel_marker=kernel_marker,
        )
        try:
            _wait_until_up(server, ready_path, timeout)
        except RuntimeError:
            server.stop()
            if process.returncode is None or attempt == attempts:
                raise
            continue  # it exited (port taken?): try another port
        except BaseException:
            server.stop()
            raise
        server.started_seconds = time.perf_counter() - start
        return server
    raise AssertionError("unreachable")


def start_lab(base: Path, notebooks: list[Path], timeout: float = 120.0) -> Server:
    """JupyterLab serving copies of `notebooks` (outputs stripped) from base/root/notebooks."""
    root = base / "root"
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        copy_notebook(nb, root / "notebooks" / nb.name)
    env = private_env(base)
    settings = Path(env["JUPYTERLAB_SETTINGS_DIR"])
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))

    def command(port: int, token: str) -> list[str]:
        return [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.app_settings_dir={LAB_DEFAULTS}",
            "--LabServerApp.check_for_updates_class="
            "jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--ServerApp.terminals_enabled=False",
        ] + (["--allow-root"] if is_root() else [])  # fmt: skip

    marker = env["JUPYTER_RUNTIME_DIR"]  # kernels' connection files live there
    return _serve("JupyterLab", command, env, root, base, marker, "/api/status", timeout)


def start_voila(base: Path, notebook: Path, timeout: float = 120.0) -> Server:
    """Voila serving `notebook` (its kernels run in the notebook's folder, as for a user)."""
    env = private_env(base)
    connections = base / "voila-connections"
    connections.mkdir(parents=True, exist_ok=True)

    def command(port: int, token: str) -> list[str]:
        return [
            sys.executable, "-m", "voila", str(notebook),
            "--no-browser",
            "--Voila.ip=127.0.0.1",
            f"--port={port}",
            "--Voila.port_retries=0",
            f"--token={token}",
            "--show_tracebacks=True",  # an error in the app shows as a traceback a test sees
            f"--Voila.connection_dir_root={connections}",
        ]  # fmt: skip

    # Every path but the port renders (so runs) the notebook: wait for the port only.
    return _serve("Voila", command, env, ROOT, base, str(connections), None, timeout)


# -- processes, from /proc (the hub's tests find theirs this way) -------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a live process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(command name)", which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    return [int(e.name) for e in proc.iterdir() if e.name.isdigit() and int(e.name) != os.getpid()]


def descendants(root: int) -> set[int]:
    """Every live process below `root` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
