"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_write_bytes", "regular_file", "user_cache_root"]

# A temp file whose writer is gone is removed by the next save to the same path. The writer's
# pid is part of the temp name; a temp file older than this is removed even if a process with
# that pid runs (pids are reused, and a writer never takes an hour to write a lab file).
STALE_TEMP_SECONDS = 3600.0


def user_cache_root() -> Path:
    """The lab's folder in the user's cache: $XDG_CACHE_HOME/lora-lab (an absolute path), else
    ~/.cache/lora-lab."""
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "lora-lab"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: a relative path is invalid and ignored (it would put the cache in the cwd).
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return root / "lora-lab"


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it names an ordinary file; else an OSError saying what it is instead.

    `what` names the file in the message ("adapter file", "base model file"). A FIFO, a device
    such as /dev/zero or a socket is refused before anything opens it (reading one would block
    or never end), and so is a folder or a missing path; symlinks are followed.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(
            f"{what} {path} does not exist (a folder in its path is a file)"
        ) from None
    except OSError as exc:
        raise type(exc)(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    raise OSError(f"{what} {path} is {_kind(mode)}, not an ordinary file")


def _kind(mode: int) -> str:
    """What a path that is neither a file nor a folder is, in words."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, but belongs to someone else
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temp files that an interrupted save to `path` left beside it; returns them.

    A temp file is stale when the process whose pid is in its name no longer runs, or when it
    is older than STALE_TEMP_SECONDS. Temp files of other target names are never touched.
    """
    path = Path(path)
    prefix = _temp_prefix(path)
    pattern = re.compile(re.escape(prefix) + r"(?:pid(\d+)\.)?[^/]*\.tmp\Z")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(match.group(1)) if match.group(1) else None
        dead = pid is not None and pid != os.getpid() and not _pid_alive(pid)
        if dead or age > STALE_TEMP_SECONDS:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _error(exc: OSError, path: Path, why: str) -> OSError:
    """An OSError of the same kind (PermissionError, ...) whose message names `path`."""
    if exc.errno is None:
        return type(exc)(f"cannot save {path}: {why}")
    return OSError(exc.errno, f"cannot save {path}: {why}", str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`.

    Missing parent folders are created; a FIFO, a device or a socket at `path` is refused, never
    replaced. An interrupted save leaves at most a temp file named
    .<name>.pid<PID>.<random>.tmp, which the next save to the same path removes once that
    process is gone. Errors are OSError subclasses whose message names the path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"cannot save {path}: it is a directory", str(path))
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None  # nothing there yet: the rename creates the file
    if mode is not None and not stat.S_ISREG(mode):
        # The rename would replace a FIFO or a device (as root, /dev/null itself) with a file.
        raise OSError(f"cannot save {path}: it is {_kind(mode)}, not an ordinary file")
    parent = path.parent
    for folder in (parent, *parent.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise NotADirectoryError(
                    20, f"cannot save {path}: {folder} is a file, not a folder", str(path)
                )
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _error(exc, path, f"cannot create its folder {parent} ({exc.strerror})") from exc
    clean_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=parent, prefix=f"{_temp_prefix(path)}pid{os.getpid()}.", suffix=".tmp"
        )
    except OSError as exc:
        raise _error(exc, path, f"cannot write in {parent} ({exc.strerror})") from exc
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a saved model is an ordinary file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not str(exc).startswith("cannot save"):
            raise _error(exc, path, exc.strerror or str(exc)) from exc
        raise
    _fsync_dir(parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; directories cannot be opened like this on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
