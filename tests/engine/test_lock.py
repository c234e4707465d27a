"""lab.engine.lock: a point's OS file lock, so two sweeps never train one point twice."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fakes import TINY, CountingTrainer
from needs import run_unprivileged

import lab
import lab.sweeps
from lab.engine.cache import SweepCache, SweepCacheError
from lab.engine.lock import PointLock
from lab.engine.points import SweepPoint
from lab.sweeps import sweep

ROOT = Path(__file__).resolve().parents[2]

LOCKS = {  # what is at the point's lock; all of them junk, taken over at once
    "a FIFO": lambda path: os.mkfifo(path),
    "a link to /dev/zero": lambda path: path.symlink_to("/dev/zero"),
    "text": lambda path: path.write_text("junk"),
    "pid 0": lambda path: path.write_text(f"0 {socket.gethostname()}\n"),
    "pid -1": lambda path: path.write_text(f"-1 {socket.gethostname()}\n"),
    "pid 10**30": lambda path: path.write_text(f"{10**30} {socket.gethostname()}\n"),
    "binary": lambda path: path.write_bytes(b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("what", list(LOCKS))
def test_a_junk_lock_is_taken_over_at_once(tmp_path, what):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    lock = tmp_path / f"{point.key}.lock"
    LOCKS[what](lock)
    start = time.monotonic()
    results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert time.monotonic() - start < 10 and results[0].point == point
    assert not os.path.lexists(lock) and cache.get(point) == results[0]


def test_a_folder_in_a_locks_place_is_a_clear_error(tmp_path):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    (tmp_path / f"{point.key}.lock").mkdir()
    with pytest.raises(SweepCacheError, match=r"cannot take over the stale lock .*Is a directory"):
        sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert not cache.path(point).exists()


def test_a_lock_left_by_another_host_no_longer_waits(tmp_path):
    # An older lab wrote "pid host" into the lock and waited for ever on another host's; an OS
    # lock is held only by a live process, so a file left behind holds nothing.
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    lock = tmp_path / f"{point.key}.lock"
    lock.write_text("4242 another-machine\n")
    (tmp_path / f"{point.key}.holder").write_text("4242 another-machine\n")
    start = time.monotonic()
    results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert time.monotonic() - start < 10 and cache.get(point) == results[0]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.holder"))


HOLD = """
import sys, time
from pathlib import Path
from lab.engine.lock import PointLock
lock = PointLock(Path(sys.argv[1]))
assert lock.take()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a real process that takes a point's lock and keeps it: (cache, point, process)."""
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    path = tmp_path / f"{point.key}.lock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        yield cache, point, proc
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_live_holder_is_waited_for_then_named_in_one_line(holder, monkeypatch, capsys):
    cache, point, proc = holder
    monkeypatch.setattr(lab.sweeps, "WAIT_NOTICE_SECONDS", 0.5)
    cache.lock_wait = 2.0
    trainer = CountingTrainer()
    start = time.monotonic()
    with pytest.raises(SweepCacheError) as info:
        sweep([point], cache, progress=False, run_fn=trainer)
    assert 2.0 <= time.monotonic() - start < 30
    message = str(info.value)
    assert "\n" not in message and str(cache.directory / f"{point.key}.lock") in message
    assert f"pid {proc.pid} on {socket.gethostname()}" in message and "delete" in message
    said = capsys.readouterr().out
    assert "waiting for 1 point that another sweep is training" in said
    assert trainer.calls == [] and cache.get(point) is None
    assert cache.claimed(point) and not cache.claim(point)  # still its holder's


def test_a_holder_killed_with_sigkill_frees_the_point_at_once(holder):
    cache, point, proc = holder
    assert cache.claimed(point) and not cache.claim(point)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not cache.claimed(point) and cache.claim(point)  # the OS released it with its holder
    assert cache.holder(point) == f"pid {os.getpid()} on {socket.gethostname()}"
    cache.release(point)
    assert not list(cache.directory.glob("*.lock")) and not list(cache.directory.glob("*.holder"))
    results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert cache.get(point) == results[0]


def test_a_point_held_by_another_cache_here_waits_for_it(tmp_path):
    first, second, point = SweepCache(tmp_path), SweepCache(tmp_path), SweepPoint(**TINY)
    assert first.claim(point) and first.claim(point)  # taking it again is a no-op
    assert second.claimed(point) and not second.claim(point)
    first.release(point)
    assert second.claim(point)
    second.release(point)
    assert not list(tmp_path.glob("*.lock"))


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "10", True, None])
def test_a_bad_lock_wait_is_refused(tmp_path, bad):
    cache = SweepCache(tmp_path)
    with pytest.raises(ValueError, match="lock_wait=.*finite number of seconds"):
        cache.lock_wait = bad
    assert cache.lock_wait == 600.0


def test_the_command_line_ends_a_blocked_sweep_with_one_line(holder):
    cache, point, proc = holder
    args = ["sweep", "--task", point.task, "--ranks", str(point.rank), "--steps",
            str(point.steps), "--batch-size", str(point.batch_size), "--no-batch"]  # fmt: skip
    env = {**os.environ, "LORA_LAB_CACHE": str(cache.directory), "PYTHONPATH": str(ROOT),
           "LORA_LAB_LOCK_WAIT": "2"}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: waited") and f"{point.key}.lock" in line, line
    assert f"pid {proc.pid}" in line and "delete" in line
    assert not list(cache.directory.glob("*.json"))
    env["LORA_LAB_LOCK_WAIT"] = "soon"
    bad = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: $LORA_LAB_LOCK_WAIT='soon': expected seconds, a finite number >= 0"
    )


OTHER_ACCOUNT = """
import sys
from pathlib import Path
from lab.engine.lock import PointLock
lock = PointLock(Path(sys.argv[1]))
print(lock.take(), lock.holder())
lock.release()
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to act as another account"
)
def test_another_accounts_lock_is_waited_for_while_held_and_taken_once_its_holder_is_gone():
    # A shared cache folder: this account's lock file is 0644, so another account cannot open
    # it for writing; it probes the OS lock read-only instead.
    folder = Path(tempfile.mkdtemp(prefix="lora-lab-shared-"))
    try:
        folder.chmod(0o777)
        lock_path = folder / "k.lock"
        mine = PointLock(lock_path)
        assert mine.take()

        def other() -> str:
            run = run_unprivileged(OTHER_ACCOUNT, str(lock_path), home=folder)
            assert run.returncode == 0, run.stderr
            return run.stdout.strip()

        assert other() == f"False pid {os.getpid()} on {socket.gethostname()}"  # held: waits
        held, mine._lock = mine._lock, None
        held.release()  # released, its file left behind, as by a process killed outright
        assert lock_path.exists()
        assert other().startswith("True pid ")  # nothing holds it: taken over
        assert not list(folder.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_release_cut_short_by_ctrl_c_is_finished_by_the_next_release(tmp_path, monkeypatch):
    """Ctrl-C can land inside a release (a sweep releases a point right after saving it); the
    lock stays known to the cache until its files are gone, so the sweep's clean-up, which
    releases what it holds again, leaves no lock file behind."""
    cache = SweepCache(tmp_path)
    point = SweepPoint(**TINY)
    assert cache.claim(point)
    (lock_file,) = tmp_path.glob("*.lock")
    real_unlink = Path.unlink

    def interrupted(path, *args, **kwargs):
        if path == lock_file:
            monkeypatch.setattr(Path, "unlink", real_unlink)  # only the first time
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.release(point)
    assert lock_file.exists()  # cut short
    cache.release(point)  # the clean-up's release
    assert not list(tmp_path.glob("*.lock")) and not cache.claimed(point)
    assert cache.claim(point)  # and it can be taken again
    cache.release(point)
