"""Where a submission's code runs when it is graded: a bubblewrap sandbox.

Autograding runs every student's notebook on the instructor's machine, often as the instructor
or as root. A submission is code: without a wall around it, one cell could read the gradebook,
overwrite the lab's checks for every submission graded after it, or print /etc/shadow into its own
feedback. So the grader (lab.exercises.autograde) starts the student's Python inside bubblewrap
(`bwrap`, Debian's package `bubblewrap`), which needs no root:

- every file is read-only (even for root), and a private, empty /tmp and home are the only places
  it can write; they vanish with the process;
- what it must not read is hidden behind empty folders: the course folder (gradebook, source with
  the answers, other submissions), every home, /root, /srv, /mnt, /media, /run, and the lab's own
  answer key; then only what Python needs to start (the venv, the interpreter, the lab package)
  is shown again, read-only;
- no network, its own process tree (it cannot signal the grader), a new session (no terminal),
  no capabilities, and it dies with the grader.

Without bwrap the grader refuses to run a submission, saying what to install, unless the
instructor opts out for trusted notebooks (LORA_LAB_SANDBOX=off: the lab's own tests of its
solutions, say).
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SANDBOX_ENV", "SandboxUnavailable", "needed_paths", "sandbox_command", "sandbox_mode"]

SANDBOX_ENV = "LORA_LAB_SANDBOX"  # "off" runs submissions without a sandbox (trusted only)
# Hidden from a submission (if they exist): homes, the admin's home, served and mounted data,
# runtime sockets and every other user's temporary files.
HIDDEN = ("/home", "/root", "/srv", "/mnt", "/media", "/run", "/tmp", "/var/tmp", "/opt")
# Files a submission may never read, even where their folder stays visible.
SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")
HOME = "/tmp/home"  # the submission's home, inside its private /tmp
SCRATCH_BYTES = 512 * 2**20  # the private /tmp's size (in memory): a full one is ENOSPC


class SandboxUnavailable(RuntimeError):
    """bwrap is missing (or unusable) and the instructor did not opt out."""


def sandbox_mode() -> str:
    """'bwrap', or 'off' when LORA_LAB_SANDBOX=off; anything else there is an error."""
    value = os.environ.get(SANDBOX_ENV, "").strip().lower()
    if value in ("", "bwrap", "on"):
        return "bwrap"
    if value == "off":
        return "off"
    raise ValueError(
        f"{SANDBOX_ENV}={os.environ[SANDBOX_ENV]!r}: use 'on' (the default, a bubblewrap "
        "sandbox) or 'off' (no sandbox: only for notebooks you trust)"
    )


def needed_paths() -> list[str]:
    """What the submission's Python must see to start: interpreter, venv, packages, the lab."""
    import lab

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    paths.add(str(Path(sys.executable).resolve().parent.parent))
    lab_dir = str(Path(lab.__file__).resolve().parent)
    paths.add(lab_dir)
    # Where this interpreter imports from: its standard library and site-packages (an editable
    # install's .pth file adds the checkout, shown above as lab/ alone).
    for entry in [*sysconfig.get_paths().values(), *site.getsitepackages()]:
        if not entry or not os.path.isdir(entry):
            continue
        entry = str(Path(entry).resolve())
        if Path(lab_dir).parent == Path(entry):
            continue  # the checkout itself (an editable install): only lab/ is shown, above
        paths.add(entry)
    return sorted(p for p in paths if p and os.path.exists(p))


def sandbox_command(
    argv: list[str], hide: Iterable[str | os.PathLike] = (), env: dict[str, str] | None = None
) -> list[str]:
    """`argv` wrapped in bwrap as described above; `hide` adds folders or files to hide."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, and autograding runs each submission's code "
            "inside it so that a submission cannot change the lab, the gradebook or the next "
            "submission's grade. Install it (Debian/Ubuntu: apt-get install bubblewrap), or, "
            f"for notebooks you trust only, set {SANDBOX_ENV}=off"
        )
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    hidden = [p for p in HIDDEN if os.path.isdir(p)]
    extra = [str(Path(p).resolve()) for p in hide if os.path.exists(p)]
    extra = [p for p in extra if p != "/"]  # the whole machine cannot be hidden
    # What Python needs, unless it holds something hidden (/, say, or /tmp itself from
    # the import path): showing that again whole would undo the hiding.
    shown = [p for p in needed_paths() if not any(_under(h, p) for h in [*hidden, *extra])]
    for folder in hidden:  # /tmp is the submission's scratch; the others only mount points
        cmd += ["--size", str(SCRATCH_BYTES if folder == "/tmp" else 2**20), "--tmpfs", folder]
    for path in extra:
        if any(_under(path, h) for h in hidden):
            continue  # already behind an empty folder
        hidden_as = ["--size", str(2**20), "--tmpfs", path]
        cmd += hidden_as if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
    for path in shown:  # shown again, read-only, where a hidden folder covered it
        if any(_under(path, h) for h in [*hidden, *extra]):
            cmd += ["--ro-bind", path, path]
    for secret in SECRETS:
        if os.path.exists(secret):
            cmd += ["--ro-bind", "/dev/null", secret]
    cmd += ["--dir", HOME, "--chdir", HOME]
    cmd += ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    cmd += ["--clearenv"]
    for key, value in (env or {}).items():
        cmd += ["--setenv", key, value]
    return [*cmd, "--", *argv]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")
