"""Tests for lab/exercises/sandbox.py: a submission writes nowhere, reads nothing it should not."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import lab.exercises.grading
from lab.exercises import sandbox
from lab.exercises.course import SOURCE
from lab.exercises.submission import Submission

pytestmark = pytest.mark.usefixtures("bwrap")  # every test here starts a sandboxed worker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sandboxed(tmp_path_factory):
    """A worker that hides a fake course folder (a gradebook in it) and the answer key."""
    course = tmp_path_factory.mktemp("course")
    (course / "gradebook.db").write_text("the gradebook")
    worker = Submission(hide=[str(course), str(SOURCE.parent)])
    worker.start()
    yield worker, course
    worker.stop()


def _probe(worker: Submission, code: str) -> str:
    outputs, _ = worker.run(code)
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")


def test_a_submission_writes_nowhere_but_its_own_scratch(sandboxed):
    """Files it can see (the lab, /etc) refuse the write; files under a hidden folder (the
    course; a checkout kept in /tmp) are not there to write, and a file of that name made in its
    own scratch /tmp is not the real one. Either way every real file stays as it was."""
    worker, course = sandboxed
    visible = [lab.exercises.grading.__file__, "/etc/passwd"]
    targets = [
        *visible,
        str(ROOT / "README.md"),
        str(course / "gradebook.db"),
        str(Path(sys.executable).parent / "planted"),
    ]
    before = {p: Path(p).read_bytes() for p in targets if Path(p).is_file()}
    code = (
        "import os\n"
        f"for p in {targets!r}:\n"
        "    try:\n"
        "        open(p, 'a').write('x')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('refused', p, e.errno)\n"
        "open(os.path.expanduser('~/scratch.txt'), 'w').write('mine')\n"
        "print('home', os.path.expanduser('~'))\n"
    )
    said = _probe(worker, code)
    for path in visible:
        assert f"refused {path} 30" in said, said  # EROFS: a read-only file system
    assert {p: Path(p).read_bytes() for p in before} == before
    assert not (Path(sys.executable).parent / "planted").exists()
    assert "home /tmp/home" in said


def test_a_submission_cannot_read_the_course_the_answer_key_or_secrets(sandboxed, tmp_path):
    worker, course = sandboxed
    canary = tmp_path / "another-users-file"
    canary.write_text("private")
    code = (
        "import os\n"
        f"print('canary', os.path.exists({str(canary)!r}))\n"
        f"_c = {str(course)!r}\n"
        "print('course', sorted(os.listdir(_c)) if os.path.isdir(_c) else 'absent')\n"
        f"print('key', os.path.exists({str(SOURCE)!r}))\n"
        "try:\n"
        "    print('shadow', len(open('/etc/shadow').read()))\n"
        "except OSError as e:\n"
        "    print('shadow refused', e.errno)\n"
        "print('root', sorted(os.listdir('/root')) if os.path.isdir('/root') else [])\n"
    )
    said = _probe(worker, code)
    assert "canary False" in said, said
    assert "course []" in said or "course absent" in said
    assert "key False" in said
    assert "shadow refused" in said or "shadow 0" in said
    # /root shows only the folders that lead to what Python needs (an interpreter kept there).
    shown = {Path(p).parts[2] for p in sandbox.needed_paths() if p.startswith("/root/")}
    root = said.split("root ", 1)[1].splitlines()[0]
    assert set(eval(root)) <= shown, root  # noqa: S307 (the list printed just above)


def test_a_submission_has_no_network_and_cannot_signal_the_grader(sandboxed):
    import os
    import socket

    worker, _ = sandboxed
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = (
        "import os, socket, signal\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('no network', e.errno)\n"
        "try:\n"
        f"    os.kill({os.getpid()}, signal.SIGKILL)\n"
        "    print('KILLED')\n"
        "except OSError as e:\n"
        "    print('no such process', e.errno)\n"
    )
    said = _probe(worker, code)
    server.close()
    assert "no network" in said and "no such process" in said, said


def test_without_bwrap_autograding_refuses_and_says_what_to_install(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox.sandbox_command(["true"])


@pytest.mark.parametrize("value", ["yes please", "0", "none"])
def test_an_unknown_sandbox_setting_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(sandbox.SANDBOX_ENV, value)
    with pytest.raises(ValueError, match=f"LORA_LAB_SANDBOX={value!r}.*'on'.*'off'"):
        sandbox.sandbox_mode()


def test_a_course_folder_that_holds_the_venv_is_hidden_all_but_the_venv(tmp_path, monkeypatch):
    """The folders to hide may hold what Python needs (a venv kept in the course folder, the
    grader started from /): those stay visible, read-only, and nothing else there."""
    venv_like = tmp_path / "course" / ".venv"
    venv_like.mkdir(parents=True)
    (tmp_path / "course" / "gradebook.db").write_text("grades")
    real = sandbox.needed_paths

    monkeypatch.setattr(sandbox, "needed_paths", lambda: [*real(), str(venv_like)])
    cmd = sandbox.sandbox_command(["true"], hide=["/", str(tmp_path / "course")])
    assert "/" not in [cmd[i + 1] for i, a in enumerate(cmd) if a == "--tmpfs"]
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--ro-bind"]
    assert str(venv_like) in binds
