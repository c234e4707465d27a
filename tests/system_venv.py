"""A venv other users can run, built once from Debian's Python and cached in /var/tmp.

Tests that switch to another user (`nobody` in the read-only run, students, an instructor and a
dashboard on a hub, the nbgrader round trip) cannot run this checkout's venv: its Python may live
under /root (mode 700). They share one venv of /usr/bin/python3 instead (`class_venv`): the lab's
runtime dependencies and what a class runs beside them, not the lab itself (each test gives its
accounts the lab as a copy). It is built here atomically and keyed by what went into it
(pyproject.toml, the Python version, the package list), so it is built once and reused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")  # root's own Python may sit where others cannot run it
VENV_PARENT = Path("/var/tmp")  # the cached venvs, keyed by what went into them
STALE_VENV_SECONDS = 3600.0  # a venv for other inputs, unused this long, is removed (1.3 GB)
# What every account in the class tests runs besides the lab's dependencies, with the specs
# requirements.txt and requirements-dev.txt give them.
CLASS_TOOLS = (
    "jupyterhub",
    "jupyterlab",
    "jupyterhub-idle-culler",
    "nbgrader",
    "ipykernel",
    "nbclient",
    "nbval",
    "pytest",
)
CLASS_VENV_PREFIX = "lora-lab-class-venv-"


def _tail(text: str, chars: int = 4000) -> str:
    return text if len(text) <= chars else "..." + text[-chars:]


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower()


def project_packages(tools: tuple[str, ...]) -> list[str]:
    """pip requirements: the lab's runtime dependencies (pyproject.toml), then `tools`, each
    with the spec the project gives it (requirements.txt, requirements-dev.txt) if any."""
    code = (
        "import json, sys, tomllib; "
        "print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))"
    )
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", code, str(ROOT / "pyproject.toml")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    deps = json.loads(out.stdout)
    assert "torch==2.13.0" in deps, f"pyproject.toml no longer pins torch==2.13.0: {deps}"
    lines = [
        ln.split("#")[0].strip()
        for req in ("requirements.txt", "requirements-dev.txt")
        for ln in (ROOT / req).read_text().splitlines()
    ]
    specs: dict[str, str] = {}
    for spec in (ln for ln in lines if ln and not ln.startswith("-")):
        specs.setdefault(_name(spec), spec)
    named = {_name(d) for d in deps}
    return deps + [specs.get(t, t) for t in tools if t not in named]


def chmod_readable(top: Path) -> None:
    """Everything under `top` readable by all, folders and executables enterable by all."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            add = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
            if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR:
                add |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            if st.st_mode & add != add:
                os.chmod(p, st.st_mode | add)
    os.chmod(top, 0o755)


def build_venv(final: Path, packages: list[str]) -> None:
    """Make the venv in a temp folder beside `final`, then rename it there (another session
    that got there first wins; this build is then dropped)."""
    build = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(build)], check=True, timeout=300)
        pip = [str(build / "bin" / "python"), "-m", "pip", "install", "-q", "--no-input",
               "--disable-pip-version-check", "--no-warn-script-location"]  # fmt: skip
        done = subprocess.run([*pip, *packages], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            pytest.fail(
                f"pip install into a venv of {SYSTEM_PYTHON} failed ({packages}):\n"
                + _tail(done.stdout + done.stderr),
                pytrace=False,
            )
        _point_scripts_at(build, final)
        chmod_readable(build)
        (build / "lora-lab-complete").write_text("\n".join(packages) + "\n")
        try:
            os.rename(build, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def _point_scripts_at(build: Path, final: Path) -> None:
    """venv and pip write the venv's own path into its scripts (the `#!` line of bin/nbgrader
    and the rest, VIRTUAL_ENV in bin/activate): make it the path the venv will have once
    renamed, so that the scripts run, and `. bin/activate` works, there."""
    old, new = str(build).encode(), str(final).encode()
    for script in (build / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            data = script.read_bytes()
            if old in data:
                mode = script.stat().st_mode
                script.write_bytes(data.replace(old, new))
                script.chmod(mode)


def drop_stale_venvs(prefix: str, keep: Path) -> None:
    """Remove venvs of this prefix (and half-built ones) for other inputs, unused for an hour."""
    for other in VENV_PARENT.glob(f"*{prefix}*"):
        marker = other / "lora-lab-complete"
        try:
            used = (marker if marker.exists() else other).stat().st_mtime
        except OSError:
            continue
        if other != keep and time.time() - used > STALE_VENV_SECONDS:
            shutil.rmtree(other, ignore_errors=True)


def system_venv(prefix: str, packages: list[str]) -> Path:
    """The cached venv of /usr/bin/python3 holding `packages` (built if missing): its folder.

    `prefix` names the kind (e.g. "lora-lab-readonly-venv-"); the folder is prefix + a hash of
    pyproject.toml, the Python version and the packages. Fails (never skips) without
    /usr/bin/python3: a caller decides first whether its test can run here at all.
    """
    if not SYSTEM_PYTHON.exists():
        pytest.fail(f"{SYSTEM_PYTHON} is missing: it makes the venv another user can run")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "--version"], capture_output=True, text=True, check=True
    ).stdout
    layout = "scripts-and-activate-name-the-final-path"  # older venvs are built again
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + "\n".join([version, layout, *packages]).encode()
    ).hexdigest()[:16]
    final = VENV_PARENT / f"{prefix}{key}"
    if not (final / "lora-lab-complete").exists():
        from filelock import FileLock

        # One build at a time (test workers running at once wait for it, then use it).
        with FileLock(VENV_PARENT / f".{final.name}.lock", timeout=1800):
            if not (final / "lora-lab-complete").exists():
                build_venv(final, packages)
    assert (final / "lora-lab-complete").exists(), f"{final} was not built"
    os.utime(final / "lora-lab-complete")  # in use: the clean-up below keeps it
    drop_stale_venvs(prefix, keep=final)
    return final


def class_venv() -> Path:
    """The one venv every class test's accounts run (built if missing): its folder."""
    return system_venv(CLASS_VENV_PREFIX, project_packages(CLASS_TOOLS))
