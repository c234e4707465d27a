"""The sweep cache: one JSON file per point in a folder that survives restarts, and grid files."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import platform
import stat
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ..fileio import atomic_write_bytes, regular_file, user_cache_root
from ..text import plural
from .lock import LockBusy, PointLock, lock_wait
from .points import FORMAT, SweepPoint, base_fingerprint, describe
from .results import SweepResult
from .summaries import select

__all__ = [
    "CACHE_VAR",
    "DEFAULT_GRID_PATH",
    "SweepCache",
    "SweepCacheError",
    "cache_dir",
    "check_writable_dir",
    "default_cache_dir",
    "grid_machine",
    "load_grid_file",
    "remove_non_file",
    "write_grid_file",
]

DEFAULT_GRID_PATH = Path(__file__).parent.parent / "data" / "default_grid.json"
MAX_RESULT_BYTES = 64 << 20  # a result is tens of KiB; a bigger *.json is not one
MAX_GRID_BYTES = 256 << 20  # the shipped grids are under 200 KiB
CACHE_VAR = "LORA_LAB_CACHE"


def default_cache_dir() -> Path:
    """$LORA_LAB_CACHE if set, else the user's cache folder (~/.cache/lora-lab/sweeps).

    An empty (or blank) $LORA_LAB_CACHE counts as unset, as the shell's `LORA_LAB_CACHE=`
    means: never the current folder.
    """
    value = os.environ.get(CACHE_VAR, "")
    if value.strip():
        return _expand(value, f"${CACHE_VAR}")
    return user_cache_root() / "sweeps"


def _expand(text: str, what: str) -> Path:
    """Path(text) with a leading ~ or ~user expanded; ValueError if that home is unknown."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise ValueError(
            f"{what} {text!r}: {text.split('/')[0]!r} names no home folder here"
        ) from None


def cache_dir(directory: str | os.PathLike | None) -> Path:
    """The sweep cache folder `directory` names (None: default_cache_dir()), `~` expanded.

    An empty or blank name is refused (ValueError): Path("") is the current folder, where a
    sweep's files do not belong.
    """
    if directory is None:
        return default_cache_dir()
    text = os.fspath(directory) if isinstance(directory, str | os.PathLike) else None
    if not isinstance(text, str):
        raise TypeError(
            f"cache folder {directory!r}: expected a path (str or Path), or None for the default"
        )
    if not text.strip():
        raise ValueError(
            f"cache folder {text!r} is empty; name a folder, or give None for the default "
            f"(${CACHE_VAR}, else {user_cache_root() / 'sweeps'})"
        )
    if "\0" in text:
        raise ValueError(f"cache folder {text!r} holds a NUL character, which no path may")
    return _expand(text, "cache folder")


class SweepCacheError(OSError):
    """The cache folder cannot be used (not a folder, not writable, disk full)."""


def check_writable_dir(d: Path, what: str, hint: str, probe_bytes: int = 64 << 10) -> None:
    """SweepCacheError unless files can be written in folder `d` (created if missing)."""
    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        if d.is_symlink() and not d.exists():
            raise SweepCacheError(
                f"{what} {d} is a symlink to {os.readlink(d)}, which does not exist or loops; "
                f"{hint}"
            ) from None
        raise SweepCacheError(f"{what} {d} is a file, not a folder; {hint}") from None
    except OSError as exc:
        raise SweepCacheError(f"cannot create {what} {d}: {exc.strerror}; {hint}") from None
    if not d.is_dir():
        raise SweepCacheError(f"{what} {d} is not a folder; {hint}")
    probe = d / f".probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * probe_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise SweepCacheError(f"cannot write to {what} {d}: {why}; {hint}") from None


def remove_non_file(path: Path) -> None:
    """Remove a FIFO, socket or device node at `path`, or a link to one: never a file or folder.

    The lab's own file names (a cache entry, calibration.json) are the only paths given here:
    whatever else sits there holds nothing (a link's target is never touched), and
    atomic_write_bytes refuses to rename a file over it.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # nothing there, or a dangling link, which the rename replaces
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        with contextlib.suppress(OSError):
            path.unlink()


class SweepCache:
    """Results on disk, one `<key>.json` per point, written atomically; survives restarts.

    While a sweep trains a point it holds the point's lock (`<key>.lock`, lab.engine.lock), so a
    second sweep into the same folder waits for that point instead of training it again, for at
    most `lock_wait` seconds without progress.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = cache_dir(directory)
        self.unsaved: list[SweepPoint] = []  # points of the last sweep() whose write failed
        # Parsed files by path, reused while (mtime, size) are unchanged: redraws stay fast.
        self._memo: dict[Path, tuple[tuple[int, int], SweepResult | None]] = {}
        self._locks: dict[SweepPoint, PointLock] = {}  # the locks this cache holds
        self.lock_wait = lock_wait()  # how long a sweep waits on another's lock

    def __repr__(self) -> str:
        return f"SweepCache({str(self.directory)!r})"

    @property
    def lock_wait(self) -> float:
        """Seconds a sweep waits on points another sweep holds, without progress, before it
        stops with SweepCacheError naming the lock ($LORA_LAB_LOCK_WAIT, else 600)."""
        return self._lock_wait

    @lock_wait.setter
    def lock_wait(self, seconds: float) -> None:
        ok = isinstance(seconds, numbers.Real) and not isinstance(seconds, bool)
        if not (ok and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"lock_wait={seconds!r}: expected a finite number of seconds >= 0")
        self._lock_wait = float(seconds)

    def path(self, point: SweepPoint) -> Path:
        """Where the point's result lives (whether or not it exists)."""
        return self.directory / f"{point.key}.json"

    def _read(self, path: Path) -> SweepResult | None:
        """The result in `path`, or None (with a warning) if it is unreadable or not a result."""
        try:
            info = path.stat()
        except OSError:
            return None
        stamp = (info.st_mtime_ns, info.st_size)
        if path in self._memo and self._memo[path][0] == stamp:
            return self._memo[path][1]
        try:
            # A FIFO would block the read for ever and /dev/zero never end: only a regular
            # file is opened, and no more of it than a result can take.
            regular_file(path, "sweep cache file")
            with open(path, "rb") as f:
                raw = f.read(MAX_RESULT_BYTES + 1)
            if len(raw) > MAX_RESULT_BYTES:
                raise ValueError(f"over {MAX_RESULT_BYTES:,} bytes, more than a result takes")
            data = json.loads(raw.decode("utf-8"))
            result = SweepResult.from_dict(data)
            if result.point.key != path.stem:
                if data.get("key") != path.stem:  # copied or renamed from another point's
                    raise ValueError(f"it holds the result of {describe(result.point)}")
                # Written by another format version or for another base model: stale, not
                # corrupt; it is never looked up, so skip it quietly.
                result = None
        except (OSError, ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            why = why.removeprefix(f"sweep cache file {path} ")
            warnings.warn(
                f"ignoring unreadable sweep cache file {path} (it will be retrained): {why}",
                stacklevel=3,
            )
            result = None
        self._memo[path] = (stamp, result)
        return result

    def get(self, point: SweepPoint) -> SweepResult | None:
        """The cached result of `point`, or None."""
        return self._read(self.path(point))

    def __contains__(self, point: object) -> bool:
        return isinstance(point, SweepPoint) and self.get(point) is not None

    def put(self, result: SweepResult) -> Path:
        """Store a result (replacing any earlier one for the same point); returns its path."""
        data = json.dumps(result.to_dict(), indent=1, allow_nan=False).encode("utf-8")
        path = self.path(result.point)
        remove_non_file(path)
        return atomic_write_bytes(path, data)

    def check_writable(self, probe_bytes: int = 64 << 10) -> None:
        """SweepCacheError unless results can be written here (creating the folder if needed).

        Writes and removes a probe file about the size of a few results, so a read-only folder,
        a file in the folder's place or a full disk are found before anything is trained.
        """
        check_writable_dir(
            self.directory,
            "sweep cache",
            "choose another folder with LORA_LAB_CACHE or --cache",
            probe_bytes,
        )

    # -- locks: one per point another sweep may be training (lab.engine.lock) ----------------

    def _lock(self, point: SweepPoint) -> PointLock:
        lock = self._locks.get(point)
        return lock if lock is not None else PointLock(self.directory / f"{point.key}.lock")

    def claim(self, point: SweepPoint) -> bool:
        """Take the point's lock (True), or False while another process holds it.

        A lock whose holder died was released by the OS with it; junk at the lock's name (a
        FIFO, a link) is replaced; SweepCacheError if it cannot be (a folder in its place).
        """
        lock = self._lock(point)
        try:
            taken = lock.take()
        except LockBusy as exc:
            raise SweepCacheError(str(exc)) from None
        if taken:
            self._locks[point] = lock
        return taken

    def release(self, point: SweepPoint) -> None:
        """Drop the point's lock if this cache holds it."""
        lock = self._locks.get(point)
        if lock is not None:
            lock.release()
            del self._locks[point]  # only once released: an interrupt leaves it to release again

    def claimed(self, point: SweepPoint) -> bool:
        """True while another process (or another SweepCache here) holds the point's lock."""
        if point in self._locks:
            return False
        try:
            return self._lock(point).busy()
        except LockBusy as exc:
            raise SweepCacheError(str(exc)) from None

    def holder(self, point: SweepPoint) -> str:
        """Who holds the point's lock, in words ('pid 123 on host h'), for a waiting sweep."""
        return self._lock(point).holder() or "a holder that left no name"

    def stuck(self, point: SweepPoint, waited: float) -> SweepCacheError:
        """The one-line error of a sweep that waited `waited` seconds for the point's lock."""
        path = self.directory / f"{point.key}.lock"
        return SweepCacheError(
            f"waited {waited:.0f} s for {describe(point)}, whose lock {path} is held by "
            f"{self.holder(point)}: if that sweep still runs, let it finish and run again; if "
            f"not (its host's process is gone), delete {path} and run again"
        )

    def results(self, **filters: object) -> list[SweepResult]:
        """Every valid cached result whose point matches `filters` (field=value), by file name."""
        if not self.directory.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.directory.glob("*.json")))
        return select([r for r in found if r is not None], **filters)

    def __len__(self) -> int:
        return len(self.results())

    def seed_from(self, path: str | os.PathLike = DEFAULT_GRID_PATH) -> int:
        """Copy a grid file's results into the cache, never overwriting; returns how many."""
        added = 0
        for result in load_grid_file(path):
            if result.point not in self:
                self.put(result)
                added += 1
        return added


def write_grid_file(
    path: str | os.PathLike, results: Sequence[SweepResult], description: str, **header: object
) -> Path:
    """Write results as a grid file (load_grid_file's input), atomically; returns the path.

    The header holds the format, `description`, the newest result's date, the machine, the base
    model's fingerprint, the summed training seconds and any `header` fields; then one result
    per line (losses rounded to 3 significant digits), so a regenerated grid diffs line by line.
    """
    results = list(results)
    if not results:
        raise ValueError("no results to write: a grid file holds at least one")
    rows = []
    for r in results:
        row = r.to_dict()
        row["losses"] = [float(f"{x:.3g}") for x in r.losses]
        rows.append(row)
    head = {
        "format": FORMAT,
        "description": description,
        "date": max(r.date for r in results),  # when the newest run was measured
        "machine": grid_machine(),
        "base": base_fingerprint(),
        **header,
        # training loops only, summed over points (a resumed run still reports the whole grid)
        "train_seconds": round(sum(r.wall_seconds for r in results), 1),
    }
    text = json.dumps(head, indent=1)[:-2] + ',\n "results": [\n'
    text += ",\n".join(json.dumps(row, separators=(",", ":"), allow_nan=False) for row in rows)
    text += "\n ]\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, text.encode("utf-8"))  # never a truncated grid file


def grid_machine() -> dict:
    """What a grid file's results were measured on (its "machine" header, read by notebook 05)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def load_grid_file(path: str | os.PathLike = DEFAULT_GRID_PATH) -> list[SweepResult]:
    """The results in a grid file (written by scripts/make_default_grid.py and its kin).

    A file that cannot be read or is not a grid file raises ValueError naming it; an entry
    that is not a valid result is skipped with a warning (the others are kept).
    """
    try:
        regular_file(path, "grid file")  # never a FIFO (blocks) or /dev/zero (never ends)
        with open(path, "rb") as f:
            raw = f.read(MAX_GRID_BYTES + 1)
        if len(raw) > MAX_GRID_BYTES:
            raise ValueError(f"over {MAX_GRID_BYTES:,} bytes, more than a grid file takes")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        why = why.removeprefix(f"grid file {path} ")
        raise ValueError(f"{path}: cannot read the grid file ({why})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if data.get("base") != base_fingerprint():
        warnings.warn(
            f"{path} was computed on another base model ({data.get('base')}, this one is "
            f"{base_fingerprint()}); rebuild it with its script "
            f"(scripts/make_{Path(path).stem}.py)",
            stacklevel=2,
        )
        return []
    items = data.get("results")
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'results' is {type(items).__name__}, expected a list")
    out, bad = [], []
    for i, item in enumerate(items):
        try:
            out.append(SweepResult.from_dict(item))
        except (ValueError, TypeError) as exc:
            bad.append(f"#{i}: {str(exc)[:120]}")
    if bad:
        warnings.warn(
            f"{path}: skipped {plural(len(bad), 'malformed entry', 'malformed entries')} "
            f"({bad[0]})",
            stacklevel=2,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Training a grid
# ---------------------------------------------------------------------------------------------
