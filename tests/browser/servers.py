"""Start and stop the JupyterLab and Voilà servers the browser tests drive.

Each server gets a free port on 127.0.0.1, a random token and its own temporary HOME, IPython,
matplotlib, Jupyter and JupyterLab settings/runtime/workspace folders and sweep cache, so the tests
never read or write a user's files and never see another test run. A server runs in its own
process group and is stopped by its PID (SIGTERM, then SIGKILL for the whole group); kernels,
which Jupyter starts in sessions of their own, are found by their connection files in the
server's private runtime folder and stopped by PID too.

A JupyterHub (start_hub) gets free ports for itself, its proxy and the proxy's API, a run folder
for its database, cookie secret, pid files and the students' homes, and marks every process it
starts (proxy, students' servers, services, their kernels) with an environment variable, so that
all of them are found and stopped by PID, whoever their parent is by then.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat

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


# -- JupyterHub: a class of students on one machine -------------------------------------------

HUB_CONFIG = Path(__file__).with_name("hub_config.py")
PROXY_HINT = (
    "configurable-http-proxy (JupyterHub's proxy, from npm): `npm install -g "
    "configurable-http-proxy` (Node and npm from Debian: `apt-get install -y nodejs npm`); "
    ".ci/run installs it"
)
# Every per-user folder a student's server and kernels write, inside the student's home (where
# the usual defaults put them), and the lab's sweep cache where the lab's default puts it.
STUDENT_FOLDERS = {
    "IPYTHONDIR": ".ipython",
    "MPLCONFIGDIR": ".config/matplotlib",
    "XDG_CACHE_HOME": ".cache",
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "JUPYTER_CONFIG_DIR": ".jupyter",
    "JUPYTER_DATA_DIR": ".local/share/jupyter",
    "JUPYTER_RUNTIME_DIR": ".local/share/jupyter/runtime",
    "JUPYTERLAB_SETTINGS_DIR": ".jupyter/lab/user-settings",
    "JUPYTERLAB_WORKSPACES_DIR": ".jupyter/lab/workspaces",
    "LORA_LAB_CACHE": ".cache/lora-lab/sweeps",
}
# The environment variable every process of one hub carries (the hub, its proxy, each student's
# server, services and all their kernels), valued with the hub's run folder: how stop() finds
# them, whoever their parent is by then.
HUB_MARKER = "LORA_LAB_HUB_RUN"
USER_NAME = re.compile(r"[a-z][a-z0-9]{0,31}")


def find_proxy() -> str | None:
    """The configurable-http-proxy executable on the PATH, or None."""
    return shutil.which("configurable-http-proxy")


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a live process, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(command name)", which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _environ(pid: int) -> dict[str, str]:
    """The environment a process started with (empty if it cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


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


@dataclass
class HubProcess:
    """One process a hub started: whom it serves and what it runs."""

    pid: int
    owner: str  # the student (JUPYTERHUB_USER), the service, or "hub"
    kind: str  # "hub", "proxy", "server", "kernel" or "service"
    cmdline: str
    env: dict[str, str]


@dataclass
class Hub:
    """A running JupyterHub: its public URL, the class password, the students' homes."""

    url: str  # http://127.0.0.1:PORT, the proxy: what a student opens
    process: subprocess.Popen
    base: Path  # the run folder: database, cookie secret, pid files, homes, logs
    log_path: Path
    password: str
    users: tuple[str, ...]
    services: dict[str, str]  # service name -> its own http://127.0.0.1:PORT
    started_seconds: float = 0.0

    @property
    def marker(self) -> str:
        return str(self.base)

    def home(self, user: str) -> Path:
        return self.base / "homes" / user

    def cache(self, user: str) -> Path:
        """The student's sweep cache (under their home)."""
        return self.home(user) / STUDENT_FOLDERS["LORA_LAB_CACHE"]

    def user_url(self, user: str) -> str:
        return f"{self.url}/user/{user}"

    def service_url(self, name: str) -> str:
        return f"{self.url}/services/{name}/"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def processes(self) -> list[HubProcess]:
        """Every live process this hub started, found by the marker in its environment."""
        found = []
        for pid in _pids():
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z":  # gone, or a zombie waiting for its parent
                continue
            env = _environ(pid)
            if env.get(HUB_MARKER) != self.marker:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if pid == self.process.pid:
                kind, owner = "hub", "hub"
            elif "configurable-http-proxy" in cmdline:
                kind, owner = "proxy", "hub"
            elif "JUPYTERHUB_SERVICE_NAME" in env:
                kind = "kernel" if "ipykernel" in cmdline else "service"
                owner = env["JUPYTERHUB_SERVICE_NAME"]
            else:
                kind = "kernel" if "ipykernel" in cmdline else "server"
                owner = env.get("JUPYTERHUB_USER", "?")
            found.append(HubProcess(pid, owner, kind, cmdline.strip(), env))
        return found

    def _tree(self) -> set[tuple[int, int]]:
        """(pid, start time) of the hub, everything below it, everything carrying the marker,
        and the proxy named in its pid file."""
        pids = {self.process.pid, *descendants(self.process.pid)}
        pids |= {p.pid for p in self.processes()}
        with contextlib.suppress(OSError, ValueError):
            pids.add(int((self.base / "proxy.pid").read_text().strip()))
        tree = set()
        for pid in pids:
            stat = _proc_stat(pid)
            if stat is not None:
                tree.add((pid, stat[2]))
        return tree

    def stop(self, grace: float = 30.0) -> list[int]:
        """Stop the hub (which stops the proxy, every server and service), then SIGKILL any of
        its processes still alive, by PID. Returns the PIDs that had to be killed."""
        tree = self._tree()
        stop_process_group(self.process, grace=grace)  # SIGTERM: JupyterHub's own clean-up
        killed: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            alive = {pid for pid, started in tree if (_proc_stat(pid) or ("", 0, -1))[2] == started}
            alive |= {p.pid for p in self.processes()}
            alive = {pid for pid in alive if (_proc_stat(pid) or ("Z",))[0] != "Z"}
            if not alive:
                break
            for pid in alive:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.2)
        return sorted(set(killed))


def student_home(home: Path, notebooks: Sequence[Path]) -> dict[str, str]:
    """Make a student's home: every per-user folder, the lab's notebooks copied in (outputs
    stripped, as nbgitpuller or nbgrader would hand them out) under notebooks/, and the tests'
    JupyterLab settings. Returns the folders' environment variables."""
    folders = {var: home / rel for var, rel in STUDENT_FOLDERS.items()}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        copy_notebook(nb, home / "notebooks" / nb.name)
    for rel, value in LAB_SETTINGS.items():
        path = folders["JUPYTERLAB_SETTINGS_DIR"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return {var: str(path) for var, path in folders.items()}


def voila_service(
    name: str,
    port: int,
    notebook: Path,
    base: Path,
    marker: str,
    args: Sequence[str] = (),
    culling: tuple[int, int] = (300, 60),
) -> dict:
    """A hub-managed service running Voilà on `notebook` under /services/<name>/.

    Voilà must be told the prefix (base_url; server_url follows it): the proxy forwards the whole
    path, and a Voilà serving at / answers 404 there. The hub checks a service's URL at start and
    every minute (JupyterHub.service_check_interval), and each check renders the dashboard: a
    kernel that no page ever connects to. Voilà culls such kernels after `culling` = (idle
    seconds, check interval); without it they pile up, one per check. The service gets its own
    home and sweep cache (the dashboard's Run trains into the service's cache, shared by everyone
    who opens it) and no token: anyone who can reach the hub's address can open it.
    """
    idle, interval = culling
    if not (isinstance(idle, int) and isinstance(interval, int) and idle > 0 and interval > 0):
        raise ValueError(f"culling={culling!r}: give (idle seconds, interval seconds), both > 0")
    env = {var: value for var, value in private_env(base).items() if var in STUDENT_FOLDERS}
    env.update(HOME=str(base / "home"), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(JUPYTER_PLATFORM_DIRS="1", **{HUB_MARKER: marker})
    connections = base / "voila-connections"
    connections.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "voila", str(notebook),
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={port}",
        "--Voila.port_retries=0",
        f"--Voila.base_url=/services/{name}/",
        "--show_tracebacks=True",
        f"--Voila.connection_dir_root={connections}",
        f"--MappingKernelManager.cull_idle_timeout={idle}",
        f"--MappingKernelManager.cull_interval={interval}",
        *args,
    ]  # fmt: skip
    return {
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "command": command,
        "environment": env,
        "cwd": str(notebook.parent),
    }


def start_hub(
    base: Path,
    users: Sequence[str],
    notebooks: Sequence[Path] = (),
    dashboards: dict[str, Sequence[str]] | None = None,
    dashboard_culling: tuple[int, int] = (300, 60),
    timeout: float = 120.0,
    attempts: int = 3,
) -> Hub:
    """JupyterHub on 127.0.0.1 for `users`, each with a home under base/homes holding copies of
    `notebooks`; `dashboards` maps service names to extra Voilà arguments (each serves
    notebooks/dashboard.ipynb from the checkout under /services/<name>/, its unconnected kernels
    culled after `dashboard_culling` = (idle seconds, check interval)).

    The `lab` package and its shipped grids stay the one copy in this checkout, shared by all.
    Raises FileNotFoundError naming what to install when configurable-http-proxy is missing.
    """
    users = tuple(users)
    bad = [u for u in users if not isinstance(u, str) or not USER_NAME.fullmatch(u)]
    if bad or not users or len(set(users)) != len(users):
        raise ValueError(
            f"users={list(users)!r}: give one or more distinct names of 1 to 32 lowercase letters "
            "and digits, starting with a letter (they name each student's home and URL)"
        )
    proxy = find_proxy()
    if proxy is None:
        raise FileNotFoundError(f"JupyterHub needs {PROXY_HINT}")
    bin_dir = Path(sys.executable).parent
    singleuser = bin_dir / "jupyterhub-singleuser"
    if not os.access(singleuser, os.X_OK):
        raise FileNotFoundError(
            f"{singleuser} is missing: install JupyterHub in this environment "
            "(`pip install -r requirements-dev.txt`)"
        )
    base.mkdir(parents=True, exist_ok=True)
    marker = str(base)
    for user in users:
        student_home(base / "homes" / user, notebooks)
    args = [
        f"--LabApp.app_settings_dir={LAB_DEFAULTS}",  # the lab's shipped defaults: no news pop-up
        "--LabServerApp.check_for_updates_class="
        "jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "--ServerApp.terminals_enabled=False",
    ] + (["--allow-root"] if is_root() else [])  # fmt: skip
    student_env = {
        # The notebooks import `lab` from the checkout, wherever the student's copy lives.
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "JUPYTER_PLATFORM_DIRS": "1",
        HUB_MARKER: marker,
    }
    hub_env = private_env(base / "hub")
    hub_env[HUB_MARKER] = marker
    settings_path = base / "hub-settings.json"

    start = time.perf_counter()
    for attempt in range(1, attempts + 1):
        ports = {name: free_port() for name in ("hub_port", "proxy_port", "proxy_api_port")}
        services = [
            voila_service(name, free_port(), NOTEBOOKS / "dashboard.ipynb",
                          base / "services" / name, marker, extra, dashboard_culling)
            for name, extra in (dashboards or {}).items()
        ]  # fmt: skip
        settings = {
            "run_dir": str(base),
            **ports,
            "proxy_command": [proxy],
            "proxy_token": secrets.token_hex(32),
            "password": secrets.token_urlsafe(12),  # the class password (8 characters or more)
            "users": list(users),
            "singleuser": [str(singleuser)],
            "args": args,
            "student_folders": STUDENT_FOLDERS,
            "student_env": student_env,
            "services": services,
        }
        settings_path.write_text(json.dumps(settings, indent=1))
        hub_env["LORA_LAB_HUB_SETTINGS"] = str(settings_path)
        for stale in ("jupyterhub.sqlite", "proxy.pid", "jupyterhub.pid"):
            (base / stale).unlink(missing_ok=True)
        cmd = [str(bin_dir / "jupyterhub"), "-f", str(HUB_CONFIG)]
        process = _launch("jupyterhub", cmd, hub_env, base, base)
        hub = Hub(
            url=f"http://127.0.0.1:{ports['proxy_port']}",
            process=process,
            base=base,
            log_path=base / "jupyterhub.log",
            password=settings["password"],
            users=users,
            services={s["name"]: s["url"] for s in services},
        )
        try:
            _wait_for_hub(hub, timeout)
        except RuntimeError:
            hub.stop()
            if process.returncode is None or attempt == attempts:
                raise
            continue  # it exited (a port taken between the check and the bind?): new ports
        except BaseException:
            hub.stop()
            raise
        hub.started_seconds = time.perf_counter() - start
        return hub
    raise AssertionError("unreachable")


def _wait_for_hub(hub: Hub, timeout: float) -> None:
    """Until the hub says it is running, answers through its proxy, and every service listens."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if hub.process.poll() is not None:
            code = hub.process.returncode
            raise RuntimeError(f"JupyterHub exited with {code}:\n{hub.log_tail()}")
        try:
            if "JupyterHub is now running" not in hub.log_tail(1 << 20):
                raise OSError("not running yet")
            with urllib.request.urlopen(f"{hub.url}/hub/api", timeout=5) as response:
                json.loads(response.read())  # {"version": ...}, served by the hub via the proxy
            for url in hub.services.values():
                port = int(url.rsplit(":", 1)[1])
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"JupyterHub not up after {timeout:.0f} s ({last}):\n{hub.log_tail()}")
