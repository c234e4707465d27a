"""The house rule for what a test needs from the machine (root, a tool, a browser): without it
the test is skipped with a hint, except under CI=true, where it fails, so that CI never passes by
skipping what it was meant to run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(message: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


PLAYWRIGHT_HINT = (
    "the playwright Python package: `.venv/bin/pip install -r requirements.txt` (or `pip install "
    "playwright`; never `playwright install`, its browser downloads are not used)"
)
CHROMIUM_HINT = (
    "a Chromium binary: `apt-get install -y chromium` (Debian/Ubuntu; /usr/bin/chromium), or set "
    "LORA_LAB_CHROMIUM to a Chromium or Chrome executable"
)


def find_chromium() -> str | None:
    """$LORA_LAB_CHROMIUM if set (and only it), else Debian's /usr/bin/chromium, else chromium
    on the PATH; None if there is none."""
    if os.environ.get("LORA_LAB_CHROMIUM"):
        candidates = [os.environ["LORA_LAB_CHROMIUM"]]
    else:
        candidates = ["/usr/bin/chromium"]
        candidates += [shutil.which(n) for n in ("chromium", "chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def browser_missing() -> list[str]:
    """What the browser tests need and this machine lacks (install hints); [] when they can run."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append(PLAYWRIGHT_HINT)
    if find_chromium() is None:
        missing.append(CHROMIUM_HINT)
    return missing


def interruptible() -> None:
    """A `preexec_fn` for a child process a test interrupts (Ctrl-C, SIGINT): SIGINT back to its
    default, so that Python there raises KeyboardInterrupt as at a terminal. A test run started
    in the background inherits SIGINT ignored, and Python then never installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def swallowed_ctrl_c() -> None:
    """What torch does when Ctrl-C lands in a call back from its C code (building a tensor from
    the buffer safetensors hands it): the KeyboardInterrupt is cleared and another error raised.
    Needs SIGINT to raise KeyboardInterrupt (the `ctrl_c_raises` fixture)."""
    import time

    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here and raises KeyboardInterrupt
    except KeyboardInterrupt:
        raise ValueError(
            "could not determine the shape of object type 'torch.storage.UntypedStorage'"
        ) from None
    raise AssertionError("SIGINT did not arrive within 5 s")


class CtrlCInGetTensor:
    """safe_open's handle, but its first get_tensor meets a Ctrl-C that torch swallows."""

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        self.handle = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def get_tensor(self, key):
        swallowed_ctrl_c()


def run_unprivileged(code: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    """Run Python `code` (argv[1:] = args) as an account without privileges: as `nobody` through
    setpriv when the tests run as root (CI does), where root would read and write any file and a
    permission check would test nothing; as this account otherwise. `home` must be open to it."""
    switch: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("running as root, the test needs setpriv (util-linux) to act as nobody")
        switch = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*switch, sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


# useradd, userdel, groupadd, groupdel and chpasswd each lock /etc/passwd or /etc/group and give
# up at once when another holds it: the test files that make accounts (the hub's, the class
# round trip's) may run at once under pytest-xdist, so their account commands take turns.
ACCOUNTS_LOCK = Path(tempfile.gettempdir()) / "lora-lab-test-accounts.lock"


def account_command(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, **kwargs) for a command that edits the account files, one at a time
    across every test process on this machine."""
    from filelock import FileLock

    with FileLock(ACCOUNTS_LOCK, timeout=300):
        return subprocess.run(cmd, **kwargs)
