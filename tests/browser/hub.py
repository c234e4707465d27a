"""A class's JupyterHub for the tests: the one recipe (docs/hub/jupyterhub_config.py), run as
the docs say, with real local accounts.

- Accounts (ClassAccounts): a student group, two students in it and one outsider who is not
  (useradd with HOME_MODE=0700, as the docs' login.defs line gives), a system user for the
  dashboard service, each with a random password; all removed afterwards (`userdel -r`), their
  processes stopped by PID first.
- The lab's shared copy (make_copy): the checkout's files, without the answer key's folder,
  copied to a folder everyone may read, as the docs make it.
- The venv every account runs: tests/system_venv.py's class venv of /usr/bin/python3 with the
  lab's dependencies, JupyterHub, nbgrader and jupyterhub-idle-culler (the lab itself is imported
  from the copy, through the recipe's PYTHONPATH).
- The hub (start_hub): `python -m jupyterhub -f docs/hub/jupyterhub_config.py` as root, with the
  recipe's environment variables set to free ports on 127.0.0.1, a state folder of the test's
  own, the test's group and dashboard user. Every process it starts is found (below the hub in
  the process tree, or owned by one of the test's accounts) and stopped by PID.

Linux and root only (useradd, PAM, switching users); the tests skip without them (fail in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from needs import account_command
from servers import (
    LAB_SETTINGS,
    ROOT,
    _launch,
    _pids,
    _proc_stat,
    copy_notebook,
    descendants,
    free_port,
    stop_process_group,
)
from system_venv import chmod_readable

RECIPE = ROOT / "docs" / "hub" / "jupyterhub_config.py"
# What the class venv holds besides the lab's runtime dependencies (pyproject.toml).
PROXY_HINT = (
    "configurable-http-proxy (JupyterHub's proxy, from npm): `npm install -g "
    "configurable-http-proxy` (Node and npm from Debian: `apt-get install -y nodejs npm`); "
    ".ci/run installs it"
)
ACCOUNT_TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "chpasswd", "runuser")
DASHBOARD_CULL = 10  # seconds a dashboard kernel nobody uses lives in the test (class: 120; 10 is
# the least the recipe accepts, and a kernel whose page is open is never culled)
ACCOUNT_EDITS = {"useradd", "userdel", "groupadd", "groupdel", "chpasswd"}  # lock the account files


def find_proxy() -> str | None:
    """The configurable-http-proxy executable on the PATH, or None."""
    return shutil.which("configurable-http-proxy")


def _run(cmd: Sequence[str], stdin: str | None = None) -> None:
    run = account_command if cmd[0] in ACCOUNT_EDITS else subprocess.run
    done = run(list(cmd), input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()}")


# -- accounts ---------------------------------------------------------------------------------


@dataclass
class Account:
    name: str
    password: str

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.name).pw_uid

    @property
    def home(self) -> Path:
        return Path(pwd.getpwnam(self.name).pw_dir)


@dataclass
class ClassAccounts:
    """The test's group and accounts, named llt-<role>-<6 hex> so that no two runs meet."""

    tag: str
    group: str
    students: list[Account] = field(default_factory=list)
    outsider: Account | None = None
    dashboard: Account | None = None
    made: list[str] = field(default_factory=list)  # every user made, for the clean-up

    @property
    def all(self) -> list[Account]:
        return [*self.students, *filter(None, [self.outsider, self.dashboard])]


def make_accounts(students: int = 2) -> ClassAccounts:
    """The group, `students` students in it, an outsider and the dashboard's system user.

    Homes are made 0700 by useradd itself (`-K HOME_MODE=0700`, what HOME_MODE in
    /etc/login.defs does for every account). On any failure, what was made is removed."""
    tag = secrets.token_hex(3)
    accounts = ClassAccounts(tag=tag, group=f"llt-g-{tag}")
    try:
        _run(["groupadd", accounts.group])
        for role in ["s", "t", "u", "v"][:students] + ["x"]:
            name = f"llt-{role}-{tag}"
            groups = ["-G", accounts.group] if role != "x" else []
            _run(["useradd", "-m", "-K", "HOME_MODE=0700", "-s", "/bin/bash", *groups, name])
            accounts.made.append(name)
            account = Account(name, secrets.token_urlsafe(12))
            _run(["chpasswd"], stdin=f"{name}:{account.password}\n")
            if role == "x":
                accounts.outsider = account
            else:
                accounts.students.append(account)
        name = f"llt-d-{tag}"
        _run(["useradd", "--system", "-m", "-d", f"/var/lib/{name}", "-K", "HOME_MODE=0700",
              "-s", "/usr/sbin/nologin", name])  # fmt: skip
        accounts.made.append(name)
        accounts.dashboard = Account(name, "")
    except BaseException:
        remove_accounts(accounts)
        raise
    return accounts


def processes_of(uids: set[int]) -> list[int]:
    """PIDs of the live processes whose real user is one of `uids`."""
    found = []
    for pid in _pids():
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}").st_uid in uids:
                found.append(pid)
    return found


def remove_accounts(accounts: ClassAccounts) -> list[str]:
    """Stop every process of the test's accounts by PID, then `userdel -r` each and remove the
    group. Returns what could not be removed (empty when all went)."""
    uids = set()
    for name in accounts.made:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(name).pw_uid)
    for _ in range(50):
        pids = processes_of(uids)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    left = []
    for name in accounts.made:
        try:
            home = pwd.getpwnam(name).pw_dir
        except KeyError:
            continue
        account_command(["userdel", "-r", name], capture_output=True, timeout=60)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            left.append(f"user {name}")
        if os.path.exists(home):
            shutil.rmtree(home, ignore_errors=True)
            if os.path.exists(home):
                left.append(home)
    account_command(["groupdel", accounts.group], capture_output=True, timeout=60)
    return left


# Jupyter configuration a student writes into their own ~/.jupyter to turn nbgrader's
# instructor pieces back on; the recipe's servers must ignore it.
HOSTILE_CONFIG = {
    "jupyter_server_config.json": {
        "ServerApp": {
            "jpserver_extensions": {
                "nbgrader.server_extensions.formgrader": True,
                "nbgrader.server_extensions.course_list": True,
            }
        }
    },
    "labconfig/page_config.json": {
        "disabledExtensions": {
            f"@jupyter/nbgrader:{plugin}": False
            for plugin in ("menu", "formgrader", "create-assignment", "course-list")
        }
    },
}


def give_home(account: Account, notebooks: Sequence[Path]) -> None:
    """What a student has in their home before class: their own copy of `notebooks` (outputs
    stripped) under ~/notebooks, the tests' JupyterLab user settings (no autosave, every cell
    in the page), and a Jupyter configuration of their own that asks for the formgrader and
    nbgrader's menus back (HOSTILE_CONFIG), all theirs."""
    home = account.home
    for nb in notebooks:
        copy_notebook(nb, home / "notebooks" / nb.name)
    settings = home / ".jupyter" / "lab" / "user-settings"
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    for rel, value in HOSTILE_CONFIG.items():
        path = home / ".jupyter" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    for folder in (home / "notebooks", home / ".jupyter"):
        _run(["chown", "-R", f"{account.name}:{account.name}", str(folder)])


# -- the read-only copy -----------------------------------------------------------------------


def checkout_files() -> list[str]:
    """The checkout's files (tracked, and new ones git does not ignore), as relative paths."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return sorted({p for p in out.decode().split("\0") if p and (ROOT / p).is_file()})


def make_copy(dest: Path, answer_key: Path) -> Path:
    """The lab's shared copy at `dest`, made as the docs say: the checkout's files without the
    answer key's folder (`git archive HEAD -- . ':(exclude)course'` in docs/grading.md; here the
    working tree's files, so the test runs what is being changed), readable by all
    (`chmod -R a+rX`). Returns where the answer key would be in the copy."""
    key = answer_key.relative_to(ROOT)
    for rel in checkout_files():
        if Path(rel).parts[0] == key.parts[0]:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    chmod_readable(dest)
    return dest / key


# -- the hub ----------------------------------------------------------------------------------


@dataclass
class HubProcess:
    """One process of the hub: whom it serves and what it runs."""

    pid: int
    owner: str  # the account (student or the dashboard's user), or "hub" for root's
    kind: str  # "hub", "proxy", "server", "kernel", "service"
    cmdline: str


@dataclass
class Hub:
    url: str  # http://127.0.0.1:PORT, the proxy: what a student opens
    process: subprocess.Popen
    base: Path  # the run folder: the hub's state and log
    state: Path
    log_path: Path
    accounts: ClassAccounts
    dashboard_port: int
    started_seconds: float = 0.0

    def user_url(self, user: str) -> str:
        return f"{self.url}/user/{user}"

    def service_url(self, name: str) -> str:
        return f"{self.url}/services/{name}/"

    def cache(self, account: Account) -> Path:
        """The lab's default sweep cache in a student's home (the recipe does not move it)."""
        return account.home / ".cache" / "lora-lab" / "sweeps"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _uids(self) -> dict[int, str]:
        uids = {}
        for account in self.accounts.all:
            with contextlib.suppress(KeyError):
                uids[account.uid] = account.name
        return uids

    def processes(self) -> list[HubProcess]:
        """Every live process of this hub: below it in the process tree, or owned by one of the
        test's accounts (a kernel whose server died is no longer below the hub)."""
        uids = self._uids()
        pids = set(processes_of(set(uids)))
        if self.process.poll() is None:
            pids |= {self.process.pid, *descendants(self.process.pid)}
        found = []
        for pid in sorted(pids):
            stat = _proc_stat(pid)
            if stat is None or stat[0] == "Z":
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                owner = uids.get(os.stat(f"/proc/{pid}").st_uid, "hub")
            except OSError:
                continue
            if pid == self.process.pid:
                kind = "hub"
            elif "configurable-http-proxy" in cmdline:
                kind = "proxy"
            elif "ipykernel" in cmdline:
                kind = "kernel"
            elif "jupyterhub.singleuser" in cmdline:
                kind = "server"
            else:
                kind = "service"
            found.append(HubProcess(pid, owner, kind, cmdline.strip()))
        return found

    def stop(self, grace: float = 30.0) -> list[int]:
        """SIGTERM the hub (it stops the proxy, every server and service), then SIGKILL by PID
        whatever of it is still alive. Returns the PIDs that had to be killed."""
        tree = {(p.pid, (_proc_stat(p.pid) or ("", 0, -1))[2]) for p in self.processes()}
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state / "proxy.pid").read_text().strip())
            tree.add((pid, (_proc_stat(pid) or ("", 0, -1))[2]))
        stop_process_group(self.process, grace=grace)
        killed: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            alive = {pid for pid, t in tree if (_proc_stat(pid) or ("Z", 0, -2))[2] == t}
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


def recipe_env(venv: Path, copy: Path, state: Path, accounts: ClassAccounts, ports: dict) -> dict:
    """The environment the hub starts with: a plain root shell's, plus the recipe's variables
    (docs/hub/jupyterhub_config.py) for this test."""
    proxy = find_proxy()
    if proxy is None:
        raise FileNotFoundError(f"JupyterHub needs {PROXY_HINT}")
    path = [str(venv / "bin"), str(Path(proxy).parent), "/usr/local/sbin", "/usr/local/bin",
            "/usr/sbin", "/usr/bin", "/sbin", "/bin"]  # fmt: skip
    return {
        "PATH": os.pathsep.join(dict.fromkeys(path)),
        "LANG": "C.UTF-8",
        "HOME": str(state.parent / "root-home"),
        "LORA_LAB_COPY": str(copy),
        "LORA_LAB_VENV": str(venv),
        "LORA_LAB_HUB_STATE": str(state),
        "LORA_LAB_HUB_IP": "127.0.0.1",
        "LORA_LAB_HUB_PORT": str(ports["hub"]),
        "LORA_LAB_HUB_API_PORT": str(ports["api"]),
        "LORA_LAB_PROXY_API_PORT": str(ports["proxy_api"]),
        "LORA_LAB_DASHBOARD_PORT": str(ports["dashboard"]),
        "LORA_LAB_STUDENTS": accounts.group,
        "LORA_LAB_DASHBOARD_USER": accounts.dashboard.name,
        # The class's 2 idle minutes, shortened: the test waits for the cull, not for the clock.
        "LORA_LAB_DASHBOARD_CULL": str(DASHBOARD_CULL),
    }


def start_hub(
    base: Path, venv: Path, copy: Path, accounts: ClassAccounts, timeout: float = 180.0,
    attempts: int = 3,
) -> Hub:  # fmt: skip
    """`python -m jupyterhub -f docs/hub/jupyterhub_config.py` as root, on free ports."""
    (base / "root-home").mkdir(parents=True, exist_ok=True)
    state = base / "state"
    start = time.perf_counter()
    for attempt in range(1, attempts + 1):
        ports = {name: free_port() for name in ("hub", "api", "proxy_api", "dashboard")}
        env = recipe_env(venv, copy, state, accounts, ports)
        for stale in ("jupyterhub.sqlite", "proxy.pid", "jupyterhub.pid"):
            (state / stale).unlink(missing_ok=True)
        cmd = [str(venv / "bin" / "python"), "-m", "jupyterhub", "-f", str(RECIPE)]
        process = _launch("jupyterhub", cmd, env, base, base)
        hub = Hub(
            url=f"http://127.0.0.1:{ports['hub']}",
            process=process,
            base=base,
            state=state,
            log_path=base / "jupyterhub.log",
            accounts=accounts,
            dashboard_port=ports["dashboard"],
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
    """Until the hub says it is running and answers through its proxy."""
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
            return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"JupyterHub not up after {timeout:.0f} s ({last}):\n{hub.log_tail()}")


def rss_mb(pids: Sequence[int]) -> float:
    """Resident memory of these processes together (VmRSS from /proc), in MB (10^6 bytes)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total / 1e6


# A probe run as a student (runuser, the class venv's Python): each (what, target, action) is
# tried and reported as "allowed" or what refused it. "http" GETs a URL without following
# redirects: "allowed" only when it answers 200 with a body that names FINE_TUNING's notebook.
PROBE = r"""
import json, os, sys, urllib.error, urllib.request


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


results = []
for what, path, action in json.loads(sys.argv[1]):
    try:
        if action == "list":
            os.listdir(path)
        elif action == "read":
            with open(path, "rb") as f:
                f.read(1)
        elif action == "write":
            with open(path, "ab") as f:
                f.write(b"")
        elif action == "http":
            opener = urllib.request.build_opener(NoRedirect)
            with opener.open(path, timeout=30) as response:
                body = response.read().decode(errors="replace")
            if "04_fine_tuning" not in body:
                raise OSError(0, f"HTTP {response.status} without the files")
        results.append([what, path, action, "allowed"])
    except urllib.error.HTTPError as exc:
        results.append([what, path, action, f"HTTP {exc.code} {exc.reason}"])
    except OSError as exc:
        results.append([what, path, action, type(exc).__name__ + ": " + str(exc.strerror)])
print(json.dumps(results))
"""


def try_as(account: Account, venv: Path, attempts: list[tuple[str, str, str]]) -> list[list]:
    """Run PROBE as `account` (runuser, a clean environment, cwd their home): what each of
    `attempts` (what, path, "list"|"read"|"write") gave."""
    done = subprocess.run(
        ["runuser", "-u", account.name, "--", "env", "-i", f"HOME={account.home}",
         "PATH=/usr/bin:/bin", str(venv / "bin" / "python"), "-c", PROBE, json.dumps(attempts)],
        capture_output=True, text=True, timeout=120, cwd=account.home,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the probe as {account.name} failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout)
