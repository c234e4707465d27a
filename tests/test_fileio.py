"""lab.fileio: reading only ordinary files, and atomic writes that never replace a special file."""

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs import run_unprivileged

from lab.fileio import atomic_write_bytes, regular_file, user_cache_root


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def test_regular_file_returns_an_ordinary_file_and_follows_links(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"x")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert regular_file(target, "adapter file") == target
    assert regular_file(link, "adapter file") == link


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda tmp, fifo: fifo, OSError, "is a named pipe (FIFO), not an ordinary file"),
        (lambda tmp, fifo: "/dev/zero", OSError, "is a device, not an ordinary file"),
        (lambda tmp, fifo: tmp, IsADirectoryError, "is a folder, not a file"),
        (lambda tmp, fifo: tmp / "missing.bin", FileNotFoundError, "does not exist"),
        (lambda tmp, fifo: fifo / "below", FileNotFoundError, "does not exist"),
    ],
    ids=["fifo", "device", "folder", "missing", "below-a-file"],
)
def test_regular_file_names_what_the_path_is_instead(tmp_path, fifo, make, error, words):
    path = make(tmp_path, fifo)
    with pytest.raises(error) as info:
        regular_file(path, "base model file")
    assert f"base model file {path} " in str(info.value) and words in str(info.value)


def test_atomic_write_replaces_a_file_whole(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_write_never_replaces_a_fifo_or_a_link_to_a_device(tmp_path, fifo):
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    for path, kind in ((fifo, "a named pipe (FIFO)"), (link, "a device")):
        with pytest.raises(OSError, match=re.escape(f"cannot save {path}: it is {kind}")):
            atomic_write_bytes(path, b"data")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == "/dev/null"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "pipe"]  # no temp file left


@pytest.mark.parametrize("xdg", ["", "cache", "./cache", "~/cache"])
def test_a_relative_or_empty_xdg_cache_home_is_ignored(monkeypatch, xdg):
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert user_cache_root() == Path.home() / ".cache" / "lora-lab"


def test_an_absolute_xdg_cache_home_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_root() == tmp_path / "lora-lab"


def test_save_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        atomic_write_bytes(tmp_path / "f" / "out.bin", b"data")
    assert (tmp_path / "f").read_text() == "x"


SAVE_INTO = """
import sys
from pathlib import Path
from lab.fileio import atomic_write_bytes
try:
    atomic_write_bytes(Path(sys.argv[1]) / "out.bin", b"data")
except PermissionError as error:
    print("PermissionError:", error)
"""


def test_save_read_only_parent(open_tmp):
    # As an account without privileges: root writes into a 0555 folder whatever its mode.
    ro = open_tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    run = run_unprivileged(SAVE_INTO, str(ro), home=open_tmp)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("PermissionError:") and "cannot save" in run.stdout, run.stdout
    assert list(ro.iterdir()) == []


def test_killed_save_leaves_no_litter(tmp_path):
    target = tmp_path / "out.bin"
    code = (
        "import os, time\n"
        "os.fsync = lambda fd: time.sleep(600)\n"
        "from lab.fileio import atomic_write_bytes\n"
        f"atomic_write_bytes({str(target)!r}, b'x' * 1000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    try:
        for _ in range(600):
            if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file seen"
    atomic_write_bytes(target, b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"done"
