"""One point's lock in a shared cache: an OS file lock (filelock) that dies with its holder.

While a sweep trains a point it holds `<key>.lock`, so a second sweep into the same folder
waits for that point instead of training it again. The lock is the operating system's
(flock, through the filelock library): a holder that exits, crashes or is killed with SIGKILL
releases it at once, so no lock is ever stale. `<key>.holder` beside it says who holds it
(pid and host), for messages only.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import stat
from pathlib import Path

import filelock

from ..fileio import atomic_write_bytes, regular_file

__all__ = ["LOCK_WAIT_SECONDS", "LOCK_WAIT_VAR", "LockBusy", "PointLock", "lock_wait"]

# How long a sweep waits, without any point it waits for being finished, before it stops and
# says which lock holds it: a point (or a batched chunk of them) another sweep is training
# takes seconds to minutes on the toy.
LOCK_WAIT_SECONDS = 600.0
LOCK_WAIT_VAR = "LORA_LAB_LOCK_WAIT"  # another bound, in seconds, for every cache of a process
HINT = "choose another folder with LORA_LAB_CACHE or --cache"


def lock_wait() -> float:
    """$LORA_LAB_LOCK_WAIT in seconds if set (blank: unset), else LOCK_WAIT_SECONDS."""
    text = os.environ.get(LOCK_WAIT_VAR, "").strip()
    if not text:
        return LOCK_WAIT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"${LOCK_WAIT_VAR}={text!r}: expected seconds, a finite number >= 0")
    return seconds


def _held_elsewhere(path: Path) -> bool:
    """True while some process holds the OS lock on `path`, probed read-only (so it works on
    another account's lock file too); False when nothing holds it or it is gone."""
    try:
        import fcntl  # POSIX only; elsewhere filelock's own lock never reaches this probe
    except ImportError:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot even read it: taken as held (the wait for it is bounded)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: another process holds it
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


class LockBusy(OSError):
    """A point's lock could not be taken in time (or at all: a folder in its place)."""


class PointLock:
    """The lock of one cache entry: `take()` without waiting, `release()`, `holder()`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.holder_path = self.path.with_suffix(".holder")
        self._lock: filelock.BaseFileLock | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._lock is not None

    def take(self) -> bool:
        """Take the lock now (True), or False while another process (or object) holds it.

        Whatever else sits at the lock's name (a FIFO, a link, junk text left by an older lab)
        holds nothing and is replaced; a folder there is a LockBusy naming it.
        """
        if self._lock is not None:
            return True
        self._clear_junk()
        lock = filelock.FileLock(self.path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        except PermissionError:  # another account's lock file, which this one cannot open
            if not os.path.lexists(self.path):
                raise LockBusy(
                    f"cannot create the lock {self.path} (permission denied); {HINT}"
                ) from None
            if _held_elsewhere(self.path):
                return False
            try:  # left by a process that is gone: its file holds nothing
                self.path.unlink()
            except OSError as exc:
                raise LockBusy(
                    f"cannot take over the stale lock {self.path} ({exc.strerror}); remove it, "
                    f"or {HINT}"
                ) from None
            return self.take()
        except OSError as exc:
            raise LockBusy(
                f"cannot take the lock {self.path} ({exc.strerror or exc}); remove it, or {HINT}"
            ) from None
        self._lock = lock
        with contextlib.suppress(OSError):  # who holds it: for other sweeps' messages only
            text = f"{os.getpid()} {socket.gethostname()}\n".encode()
            atomic_write_bytes(self.holder_path, text)
        return True

    def release(self) -> None:
        """Let the lock go (nothing if not held). Its files are removed before it is released,
        so the next holder makes a fresh one and filelock sees the old one is gone."""
        if self._lock is None:
            return
        # Forgotten only once done: a Ctrl-C in between leaves it held, for the sweep's own
        # clean-up to release again (every step here may run twice).
        with contextlib.suppress(OSError):
            self.holder_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def busy(self) -> bool:
        """True while another process (or another PointLock here) holds this lock."""
        if self._lock is not None:
            return False
        if not self.take():
            return True
        self.release()
        return False

    def holder(self) -> str | None:
        """Who holds the lock, in words ('pid 123 on host h'), or None when not known."""
        try:
            regular_file(self.holder_path, "lock holder file")
            with open(self.holder_path, "rb") as f:
                pid, host = f.read(256).decode("utf-8").split()[:2]
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        return f"pid {pid} on {host}"

    def _clear_junk(self) -> None:
        """Remove what is at the lock's name when it cannot be a lock: a link, FIFO, device."""
        try:
            mode = os.lstat(self.path).st_mode
        except OSError:
            return
        if stat.S_ISREG(mode):
            return  # a lock file, held or not: flock tells
        if stat.S_ISDIR(mode):
            raise LockBusy(
                f"cannot take over the stale lock {self.path} ([Errno 21] Is a directory); "
                f"remove it, or {HINT}"
            )
        try:
            self.path.unlink()
        except OSError as exc:
            raise LockBusy(
                f"cannot take over the stale lock {self.path} ({exc.strerror}); remove it, "
                f"or {HINT}"
            ) from None
