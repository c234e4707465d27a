"""The lab from a read-only shared copy, run by a user who cannot write there.

A class often keeps one copy of the course where students cannot write. Here the checkout's
tracked files are copied, bind-mounted read-only (even root cannot write through that mount),
and run as user `nobody` with a fresh HOME and no other location variable (no XDG_*,
MPLCONFIGDIR, IPYTHONDIR, JUPYTER_* or LORA_LAB_CACHE): the lab's own defaults decide where
things go. The lab is imported from the copy through PYTHONPATH, as a shared course copy would
be; the interpreter is a venv of the lab's runtime dependencies that `nobody` can run.

Two runs: (a) nbval, strict, over the fine-tuning and sweep-explorer notebooks (and the other
cheap notebooks); (b) a script that builds the sweep explorer with the default cache, presses
Run on one small point and reads the result back. Every write either run attempts is traced
(strace), so a write that was refused and ignored is caught as well as one that worked. Then:
the copy is byte-for-byte unchanged, no write was refused except Python's own bytecode caches,
every file made lies under the HOME in a folder the README names, the sweep cache is at its
documented default, and nothing was left in /tmp, /var/tmp or /dev/shm.

Needs root (to mount and to switch users) and Linux; skipped without them, failed under CI=true.
It also needs strace, setpriv, /usr/bin/python3 and user `nobody` (it fails without them), and
takes about 3 minutes (plus about 2 to build the venv the first time, cached in /var/tmp).

The last tests (no root needed) hold `import lab` to keeping torch's compiler cache folder, which
torch makes on the first optimizer step, in the user's cache folder instead of /tmp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import skip_or_fail
from system_venv import chmod_readable, class_venv

ROOT = Path(__file__).resolve().parents[1]
USER = "nobody"
# Run (a): the fine-tuning and explorer notebooks, and 06, the one notebook that writes files (its
# adapters, into a scratch folder that is watched too). The others write nothing (read for it);
# the dashboard runs the same explorer as 05. Where this test runs, run (a) is the suite's strict
# nbval of these notebooks: the root conftest.py deselects their own nbval items.
NOTEBOOKS = (
    "notebooks/04_fine_tuning.ipynb",
    "notebooks/05_sweeps.ipynb",
    "notebooks/06_merge_and_deploy.ipynb",
)
SANITIZE = "tests/nbval/sanitize.cfg"
RUN_TIMEOUT = 1500  # seconds for each run; (a) takes a few minutes on 2 busy cores
# The repository root's conftest.py gives nbval a throwaway sweep cache (tempfile.mkdtemp): test
# machinery, not the lab. It is allowed in /tmp during run (a), checked for stray files and
# removed after.
NBVAL_CACHE = re.compile(r"^/tmp/lora-lab-nbval-cache-[^/]+(/|$)")
# Where a user's tools keep their files, relative to HOME: the README's list. A file anywhere else
# under HOME fails the test, so that every file the lab makes has a place the README names.
HOME_PLACES = {
    ".cache/lora-lab/sweeps": "the sweep cache (LORA_LAB_CACHE, else XDG_CACHE_HOME/lora-lab)",
    ".cache/lora-lab/torchinductor": "torch's compiler cache, empty (TORCHINDUCTOR_CACHE_DIR)",
    ".cache/lora-lab/calibration.json": "batched chunk sizes measured here (LORA_LAB_CALIBRATE)",
    ".cache/matplotlib": "matplotlib's font cache (MPLCONFIGDIR)",
    ".config/matplotlib": "matplotlib's configuration (MPLCONFIGDIR)",
    ".ipython": "IPython's profile and history (IPYTHONDIR)",
    ".local/share/jupyter": "Jupyter's data and kernel runtime files (JUPYTER_DATA_DIR)",
}
# Text in a run's output that means a write failed and was carried on past.
WRITE_TROUBLE = (
    "Read-only file system",
    "Permission denied",
    "[Errno 13]",
    "[Errno 30]",
    "not a writable directory",
    "temporary cache directory",
    "is not writable",
    "cannot save",
    "cannot write",
)


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


@pytest.fixture(scope="session")
def readonly_venv() -> Path:
    """The class tests' venv of /usr/bin/python3 (the lab's runtime dependencies, nbval, pytest
    and what a class runs beside them; not the lab itself), which user `nobody` can run."""
    if sys.platform != "linux" or os.geteuid() != 0:
        skip_or_fail("the read-only run needs root on Linux (to bind-mount and switch users)")
    for tool in ("mount", "umount", "setpriv", "strace"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian: apt-get install util-linux strace)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"there is no user {USER!r} to run the read-only copy as")
    final = class_venv()
    imports = "import torch, nbval, ipykernel; print(torch.__version__)"
    check = as_user(
        [str(final / "bin" / "python"), "-c", imports],
        env={"HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}, cwd=Path("/"), timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, f"{USER} cannot run {final}:\n{_tail(check.stdout)}"
    assert check.stdout.strip().startswith("2.13.0"), check.stdout
    return final


# ---------------------------------------------------------------------------------------------
# Running as `nobody`, traced, and stopped by PID
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str  # stdout and stderr together
    trace_dir: Path | None


def _group() -> str:
    return grp.getgrgid(pwd.getpwnam(USER).pw_gid).gr_name


def processes_with_home(home: Path) -> list[int]:
    """PIDs whose environment holds HOME=`home` (Linux /proc): everything a run started."""
    marker = b"\0HOME=" + os.fsencode(home) + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in b"\0" + (entry / "environ").read_bytes() + b"\0":
                found.append(int(entry.name))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def as_user(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    trace_dir: Path | None = None,
) -> Run:
    """Run `argv` as `nobody` with exactly `env`; with `trace_dir`, under strace (one file per
    process there). The process group, then anything left with its HOME, is killed by PID."""
    user = ["setpriv", f"--reuid={USER}", f"--regid={_group()}", "--clear-groups", "--"]
    cmd = [*user, *argv]
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["strace", "-ff", "-qq", "-y", "-s", "4096", "--seccomp-bpf",
               "-e", f"trace={TRACED_CALLS}", "-o", str(trace_dir / "trace"), *cmd]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[timed out after {timeout:.0f} s; killed]"
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Run(proc.returncode, out, trace_dir)


# ---------------------------------------------------------------------------------------------
# Reading the traces
# ---------------------------------------------------------------------------------------------

_LINE = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\)\s+= (?P<ret>-?\d+)(?:<(?P<fd>[^>]*)>)?"
                   r"(?: (?P<err>E[A-Z0-9]+) )?")  # fmt: skip
_DIRFD = re.compile(r"^(?:AT_FDCWD|\d+)<(?P<path>[^>]*)>$")
_CWD = re.compile(r"AT_FDCWD<(?P<path>[^>]*)>")  # strace -y shows the working folder here
# For each call: the indexes of (dirfd, path) of the entry it creates or changes, and of the
# entry a rename or link starts from; dirfd None means the process's working folder.
_TARGET = {
    "open": (None, 0), "creat": (None, 0), "mkdir": (None, 0), "rmdir": (None, 0),
    "unlink": (None, 0), "rename": (None, 1), "link": (None, 1), "symlink": (None, 1),
    "chmod": (None, 0), "chown": (None, 0), "lchown": (None, 0), "truncate": (None, 0),
    "mknod": (None, 0), "openat": (0, 1), "mkdirat": (0, 1), "unlinkat": (0, 1),
    "renameat": (2, 3), "renameat2": (2, 3), "linkat": (2, 3), "symlinkat": (1, 2),
    "fchmodat": (0, 1), "fchownat": (0, 1), "mknodat": (0, 1), "utimensat": (0, 1),
}  # fmt: skip
_SOURCE = {"rename": (None, 0), "renameat": (0, 1), "renameat2": (0, 1)}
_CREATES = {"open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2",
            "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat"}  # fmt: skip
_REMOVES = {"unlink", "unlinkat", "rmdir"}
_REFUSED = {"EROFS", "EACCES", "EPERM"}
TRACED_CALLS = ",".join([*_TARGET, "chdir", "fchdir"])


def _split_args(text: str) -> list[str]:
    """strace's argument list split at top-level commas (quoted strings kept whole)."""
    args, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    args.append(text[start:].strip())
    return args


def _unquote(arg: str) -> str | None:
    if not (arg.startswith('"') and arg.rstrip(".").endswith('"')):
        return None  # NULL, a number...
    body = arg.rstrip(".")[1:-1]
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace")


@dataclasses.dataclass(frozen=True)
class Write:
    call: str
    path: str  # what it creates or changes: absolute, normalised
    ok: bool
    err: str = ""  # the errno's name when it failed
    source: str = ""  # what a rename moved away


def _resolve(args: list[str], where: tuple[int | None, int], cwd: str) -> str | None:
    fd_i, path_i = where
    name = _unquote(args[path_i]) if path_i < len(args) else None
    if name is None:
        return None  # utimensat(fd, NULL, ...): a file already open
    base = cwd
    if fd_i is not None and (d := _DIRFD.match(args[fd_i])):
        base = d["path"]
    return os.path.normpath(os.path.join(base, name))


def traced_writes(trace_dir: Path, start_cwd: Path) -> list[Write]:
    """Every traced call that creates, changes or removes a file system entry (open and openat
    only when they open for writing), from all the trace files (one per process or thread)."""
    writes = []
    for trace in sorted(trace_dir.glob("trace.*")):
        cwd = str(start_cwd)
        for line in trace.read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if not m:
                continue
            args, ok = _split_args(m["args"]), int(m["ret"]) >= 0
            if (seen := _CWD.search(m["args"])) and m["call"] != "chdir":
                cwd = seen["path"]
            if m["call"] in ("chdir", "fchdir"):
                if ok and m["call"] == "chdir" and (name := _unquote(args[0])) is not None:
                    cwd = os.path.normpath(os.path.join(cwd, name))
                elif ok and (d := _DIRFD.match(args[0])):
                    cwd = d["path"]
                continue
            if m["call"] not in _TARGET:
                continue
            if m["call"] in ("open", "openat"):
                flags = args[_TARGET[m["call"]][1] + 1] if len(args) > 1 else ""
                if not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", flags):
                    continue
                if "O_TMPFILE" in flags:
                    continue  # a file with no name, in no folder (pytest's output capture)
            path = _resolve(args, _TARGET[m["call"]], cwd)
            if path is None:
                continue
            if ok and m["fd"] and m["call"] in ("open", "openat", "creat"):
                path = os.path.normpath(m["fd"])  # the file opened, as the kernel names it
            source = _resolve(args, _SOURCE[m["call"]], cwd) if m["call"] in _SOURCE else None
            writes.append(Write(m["call"], path, ok, m["err"] or "", source or ""))
    return writes


def transient(writes: list[Write]) -> set[str]:
    """Paths that the run removed (or renamed away) again after making them."""
    gone = {w.path for w in writes if w.ok and w.call in _REMOVES}
    return gone | {w.source for w in writes if w.ok and w.source}


def is_bytecode(path: str) -> bool:
    """Python's (and pytest's) compiled-module caches: __pycache__ folders and .pyc files."""
    return "/__pycache__" in path or path.endswith(".pyc")


def under(path: str | Path, top: str | Path) -> bool:
    path, top = os.path.normpath(path), os.path.normpath(top)
    return path == top or path.startswith(top + os.sep)


# ---------------------------------------------------------------------------------------------
# The read-only copy
# ---------------------------------------------------------------------------------------------


def tracked_files() -> list[str]:
    """The checkout's tracked files that exist in its working tree (else the tree, minus the
    venv, git and caches)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
        ).stdout
        names = [n for n in os.fsdecode(out).split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".hypothesis", ".ruff_cache", ".pytest_cache",
                "test-artifacts", "lora_lab.egg-info", ".ipynb_checkpoints"}  # fmt: skip
        names = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in skip]
            names += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return sorted(n for n in names if (ROOT / n).is_file() or (ROOT / n).is_symlink())


def manifest(top: Path) -> dict[str, str]:
    """Relative path -> kind, mode and content hash of everything under `top`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISREG(st.st_mode):
                found[rel] = f"file {st.st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
            elif stat.S_ISLNK(st.st_mode):
                found[rel] = f"link {os.readlink(p)}"
            else:
                found[rel] = f"dir {st.st_mode:o}"
    return found


def owned_by(user_uid: int, tops: tuple[str, ...], skip: Path) -> list[str]:
    """Every entry owned by `user_uid` under `tops` (one file system each), except `skip`."""
    found = []
    for top in tops:
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            keep = []
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if under(p, skip) or os.path.ismount(p):
                    continue
                keep.append(d)
            dirnames[:] = keep
            for name in [*dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    if os.lstat(p).st_uid == user_uid:
                        found.append(p)
    return sorted(found)


@dataclasses.dataclass
class Course:
    base: Path  # the test's own folder (root's): src, the mount point, HOME, traces
    src: Path  # the copy of the tracked files
    ro: Path  # `src` mounted read-only: what the runs see
    home: Path  # nobody's fresh HOME
    files: list[str]


@pytest.fixture
def course() -> Iterator[Course]:
    """The tracked files copied, mounted read-only, and an empty HOME owned by `nobody`;
    unmounted and removed afterwards whatever happened."""
    started = time.time() - 1  # file times may round down
    base = Path(tempfile.mkdtemp(prefix="lora-lab-readonly-test-"))
    os.chmod(base, 0o755)
    src, ro, home = base / "src", base / "course", base / "home"
    entry = pwd.getpwnam(USER)
    mounted = False
    try:
        files = tracked_files()
        for name in files:
            dest = src / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest, follow_symlinks=False)
        chmod_readable(src)
        ro.mkdir()
        home.mkdir(mode=0o700)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        bind = subprocess.run(
            ["mount", "--bind", str(src), str(ro)], capture_output=True, text=True
        )
        mounted = bind.returncode == 0
        remount = (
            subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True,
                           text=True)  # fmt: skip
            if mounted else bind
        )  # fmt: skip
        if remount.returncode != 0:
            skip_or_fail(f"cannot make a read-only bind mount: {(remount.stderr or '').strip()}")
        try:  # root too must be refused: proof that the mount, not permissions, stops writes
            os.close(os.open(ro / ".probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            pytest.fail(f"{ro} was remounted read-only but root could still write in it")
        except OSError as exc:
            assert exc.errno == errno.EROFS, f"writing in {ro}: {exc} (expected EROFS)"
        yield Course(base, src, ro, home, files)
    finally:
        kill_pids(processes_with_home(home))
        if mounted:
            for _ in range(20):
                if subprocess.run(["umount", str(ro)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.5)  # a process just killed may still hold the mount for a moment
            else:
                subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        if not os.path.ismount(ro):
            shutil.rmtree(base, ignore_errors=True)
        # nbval's throwaway cache (the root conftest.py), also when the test failed before
        # checking and removing it: only those `nobody` made since this fixture began.
        for cache in Path("/tmp").glob("lora-lab-nbval-cache-*"):
            with contextlib.suppress(OSError):
                st = cache.lstat()
                if st.st_uid == entry.pw_uid and st.st_mtime >= started:
                    shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

# Run (b): the explorer over the default cache; one small point trained through Run.
EXPLORER_SCRIPT = """
import json, os
from pathlib import Path
from lab.sweeps import SweepCache, default_cache_dir
from lab.widgets import seed_shipped, sweep_explorer

assert "LORA_LAB_CACHE" not in os.environ and "XDG_CACHE_HOME" not in os.environ
cache = SweepCache()  # what notebooks 05 and the dashboard make
seeded = seed_shipped(cache)
explorer = sweep_explorer(cache)
explorer.ranks.value, explorer.alphas.value = (1,), (16.0,)
explorer.full.value, explorer.steps.value = False, 20
assert explorer.facts() == {"selected": 1, "cached": 0, "to_train": 1}, explorer.status_text()
explorer.on_run(explorer.run_button)  # what pressing Run does
(point,) = explorer.selection.points()
print("RESULT " + json.dumps({
    "lab": __import__("lab").__file__, "cache": str(cache.directory),
    "default": str(default_cache_dir()), "path": str(cache.path(point)), "key": point.key,
    "seeded": seeded, "status": explorer.status_text(), "facts": explorer.facts(),
}))
"""


def _env(venv: Path, course: Course) -> dict[str, str]:
    """HOME, and nothing that moves a file but what docs/instructors.md tells a shared host to
    set: the lab's defaults decide where everything else goes."""
    env = {
        "HOME": str(course.home),
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": str(course.ro),  # the lab imported from the shared copy
        # torch makes its compiler cache folder when any optimizer is built, /tmp by default;
        # the lab's own optimizer points it home, but notebooks 02 and 03 build one by hand
        # first, so on a shared host the spawner sets it for every kernel (docs/instructors.md).
        "TORCHINDUCTOR_CACHE_DIR": str(course.home / ".cache" / "lora-lab" / "torchinductor"),
    }
    # The test run's thread count (the root conftest.py sets 1), as a hub sets it for every
    # kernel: it moves no file, and two threads beside the other test worker spin for minutes.
    if os.environ.get("LORA_LAB_THREADS"):
        env["LORA_LAB_THREADS"] = os.environ["LORA_LAB_THREADS"]
    return env


def check_run(name: str, run: Run, course: Course, allowed_outside: re.Pattern | None) -> dict:
    """Assert what every run must show; returns the writes seen, by kind, for the report."""
    assert run.returncode == 0, f"run {name} failed (exit {run.returncode}):\n{_tail(run.stdout)}"
    trouble = [t for t in WRITE_TROUBLE if t in run.stdout]
    assert not trouble, f"run {name} printed {trouble}:\n{_tail(run.stdout)}"
    leftover = processes_with_home(course.home)
    kill_pids(leftover)
    assert not leftover, f"run {name} left processes running: {leftover}"

    writes = traced_writes(run.trace_dir, course.ro)
    assert writes, f"run {name}: the trace holds no write at all, so it traced nothing"
    refused = [w for w in writes if not w.ok and w.err in _REFUSED]
    bytecode = [w for w in refused if is_bytecode(w.path)]
    others = [w for w in refused if not is_bytecode(w.path)]
    assert not others, f"run {name}: writes refused and carried on past: {others[:20]}"
    # Python and pytest try to cache compiled modules beside the sources and go on without;
    # nothing else may even try to write in the copy.
    in_copy = [w for w in writes if under(w.path, course.ro) and not is_bytecode(w.path)]
    assert not in_copy, f"run {name} tried to write in the read-only copy: {in_copy[:20]}"

    def allowed(w: Write) -> bool:
        return (
            under(w.path, course.home)
            or w.path == "/dev/null" or w.path.startswith(("/dev/pts/", "/dev/tty", "/proc/"))
            or bool(allowed_outside and allowed_outside.match(w.path))
        )  # fmt: skip

    made = [w for w in writes if w.ok and w.call in _CREATES]
    # Scratch files are fine in the temp folder ($TMPDIR, else /tmp: tempfile's own probe,
    # notebook 06's adapter folder) and in /dev/shm (POSIX semaphores of multiprocessing) while
    # the run removes them again; any other file outside HOME is not.
    gone = transient(writes)
    temp = ("/tmp/", "/dev/shm/")
    scratch = {
        w.path for w in made if not allowed(w) and w.path in gone and w.path.startswith(temp)
    }
    outside = sorted({w.path for w in made if not allowed(w) and w.path not in scratch})
    assert not outside, f"run {name} made files outside HOME: {outside[:20]}"
    return {
        "writes": len(made),
        "scratch files made and removed outside HOME": len(scratch),
        "scratch examples": sorted(scratch)[:8],
        "bytecode attempts refused": len(bytecode),
        "bytecode folders": sorted({w.path.split("/__pycache__")[0] for w in bytecode}),
    }


def home_entries(home: Path) -> list[str]:
    """Every file and folder under `home`, relative to it."""
    return sorted(
        str(Path(d, name).relative_to(home))
        for d, dirs, files in os.walk(home)
        for name in [*dirs, *files]
    )


def place_of(rel: str) -> str | None:
    """The HOME_PLACES entry `rel` lies in ('' for a folder on the way to one), or None."""
    if any(under(p, rel) for p in HOME_PLACES):
        return ""
    return next((p for p in HOME_PLACES if under(rel, p)), None)


def test_the_lab_runs_from_a_read_only_copy_writing_only_under_home(readonly_venv, course):
    before = manifest(course.src)
    assert len(before) >= len(course.files), "the copy lost files"
    nobody = pwd.getpwnam(USER).pw_uid
    world_writable = ("/tmp", "/var/tmp", "/dev/shm")
    already = set(owned_by(nobody, world_writable, course.base))
    env = _env(readonly_venv, course)
    report: dict[str, object] = {}

    # (a) the notebooks under nbval, strict, from the read-only copy
    start = time.perf_counter()
    nbval = as_user(
        [str(readonly_venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--nbval", "--nbval-current-env", "--nbval-sanitize-with", SANITIZE, *NOTEBOOKS],
        env=env, cwd=course.ro, timeout=RUN_TIMEOUT, trace_dir=course.base / "trace-nbval",
    )  # fmt: skip
    report["nbval seconds"] = round(time.perf_counter() - start)
    summary = nbval.stdout.strip().splitlines()[-1] if nbval.stdout.strip() else ""
    assert re.search(r"\b[1-9]\d* passed\b", summary), f"nbval ran nothing:\n{_tail(nbval.stdout)}"
    assert not re.search(r"failed|error|skipped", summary), _tail(nbval.stdout)
    report["nbval"] = summary
    report["run a"] = check_run("a (nbval)", nbval, course, NBVAL_CACHE)

    # nbval's throwaway cache (the root conftest.py) is removed when pytest exits: run (a) leaves
    # nothing in /tmp at all.
    new = sorted(set(owned_by(nobody, world_writable, course.base)) - already)
    assert not new, f"run a left files in {world_writable}: {new[:20]}"
    assert manifest(course.src) == before, "run a changed the read-only copy"

    # (b) the explorer with the default cache: one point trained by pressing Run
    start = time.perf_counter()
    explorer = as_user(
        [str(readonly_venv / "bin" / "python"), "-c", EXPLORER_SCRIPT],
        env=env, cwd=course.ro / "notebooks", timeout=RUN_TIMEOUT,
        trace_dir=course.base / "trace-explorer",
    )  # fmt: skip
    report["explorer seconds"] = round(time.perf_counter() - start)
    report["run b"] = check_run("b (explorer)", explorer, course, None)
    lines = [ln for ln in explorer.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the explorer script printed no result:\n{_tail(explorer.stdout)}"
    got = json.loads(lines[-1].removeprefix("RESULT "))
    default = course.home / ".cache" / "lora-lab" / "sweeps"  # README: ~/.cache/lora-lab/sweeps
    assert got["lab"] == str(course.ro / "lab" / "__init__.py"), got["lab"]
    assert got["cache"] == got["default"] == str(default), got
    assert got["path"] == str(default / f"{got['key']}.json"), got
    assert got["facts"] == {"selected": 1, "cached": 1, "to_train": 0}, got
    assert "last run trained 1 point" in got["status"], got["status"]
    assert got["seeded"] > 0, "the shipped grids were not copied into the default cache"
    result = json.loads(Path(got["path"]).read_text())
    assert result["point"]["rank"] == 1 and result["point"]["steps"] == 20, result["point"]
    assert len(result["losses"]) == 20 and result["heldout"]["n"] > 0
    in_cache = os.listdir(default)
    assert len(in_cache) == got["seeded"] + 1, f"{len(in_cache)} files for {got['seeded']} + 1"
    assert all(f.endswith(".json") for f in in_cache), [f for f in in_cache if "json" not in f]

    new = sorted(set(owned_by(nobody, world_writable, course.base)) - already)
    assert not new, f"run b left files in {world_writable}: {new[:20]}"
    after = manifest(course.src)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the read-only copy changed: {changed[:20]}"

    # Every file made is under HOME, in a place the README names; the lab's own in one folder.
    entries = home_entries(course.home)
    unplaced = [f for f in entries if place_of(f) is None]
    assert not unplaced, f"files under HOME in no documented place: {unplaced[:20]}"
    owners = {os.lstat(course.home / f).st_uid for f in entries}
    assert owners == {nobody}, owners
    lab_cache = sorted(os.listdir(course.home / ".cache" / "lora-lab"))
    assert lab_cache == ["sweeps", "torchinductor"], lab_cache
    by_place: dict[str, int] = {}
    for f in entries:
        if place_of(f) and (course.home / f).is_file():
            by_place[place_of(f)] = by_place.get(place_of(f), 0) + 1
    report["files under HOME"] = by_place
    report["files under HOME besides the sweep cache"] = [
        f for f in entries if (course.home / f).is_file() and not f.startswith(".cache/lora-lab/")
    ]
    print("\nread-only run:", json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------
# torch's compiler cache: under the user's cache folder, not /tmp (no root needed)
# ---------------------------------------------------------------------------------------------


def test_torch_cache_goes_to_the_user_cache_folder(monkeypatch, tmp_path):
    from lab.sweeps import TORCH_CACHE_VAR, keep_torch_cache_at_home, user_cache_root

    monkeypatch.delenv(TORCH_CACHE_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # not made yet: made later
    assert user_cache_root() == tmp_path / "cache" / "lora-lab"
    chosen = keep_torch_cache_at_home()
    assert chosen == str(tmp_path / "cache" / "lora-lab" / "torchinductor")
    assert os.environ[TORCH_CACHE_VAR] == chosen
    assert not (tmp_path / "cache").exists(), "choosing the folder must not write anything"


def test_torch_cache_left_alone_when_chosen_or_without_a_usable_home(monkeypatch, tmp_path):
    from lab.sweeps import TORCH_CACHE_VAR, keep_torch_cache_at_home

    monkeypatch.setenv(TORCH_CACHE_VAR, str(tmp_path / "mine"))
    assert keep_torch_cache_at_home() is None
    assert os.environ[TORCH_CACHE_VAR] == str(tmp_path / "mine")
    monkeypatch.delenv(TORCH_CACHE_VAR)
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    assert keep_torch_cache_at_home() is None  # torch's default beats a folder that cannot be
    assert TORCH_CACHE_VAR not in os.environ


def test_a_training_step_of_the_lab_leaves_nothing_in_the_temp_folder(tmp_path):
    # The lab's optimizer (lab.step.make_optimizer, as lab.train and every sweep use) points
    # torch's compiler cache at home before the first step; `import lab` alone changes nothing.
    temp, home = tmp_path / "tmp", tmp_path / "home"
    temp.mkdir()
    home.mkdir()
    code = (
        "import lab, torch\n"
        "from lab.step import make_optimizer\n"
        "layer = torch.nn.Linear(3, 1)\n"
        "opt = make_optimizer(layer, lr=1e-3)\n"
        "layer(torch.ones(3)).sum().backward(); opt.step()\n"
        "import torch._dynamo\n"  # what the step imported: it makes torch's cache folder
        "print(torch._inductor.runtime.cache_dir_utils.cache_dir())\n"
    )
    keep = ("PATH", "LANG", "PYTHONPATH", "LORA_LAB_THREADS", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HOME=str(home), TMPDIR=str(temp), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = home / ".cache" / "lora-lab" / "torchinductor"
    assert done.stdout.strip().splitlines()[-1] == str(folder)
    assert folder.is_dir()
    assert os.listdir(temp) == [], os.listdir(temp)  # torch's default: TMPDIR/torchinductor_USER
