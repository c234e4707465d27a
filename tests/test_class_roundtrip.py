"""nbgrader's whole round trip with real accounts, run from docs/grading.md's own commands.

An unprivileged instructor and two students, created for the run and removed after (even when a
check fails): root sets up the exchange, the instructor makes the course from the answer key in
a private checkout, generates and releases the assignment; each student fetches it, answers (one
all right, one half-done with typical mistakes and a tampered graded cell) and submits; the
instructor collects, autogrades, generates and releases the feedback; each student fetches their
own feedback; the instructor imports names and exports the grades. Every command is read from
the "The round trip" blocks of docs/grading.md and run as the user the block names, with only the
machine's paths replaced (the venv, the exchange, /etc/jupyter) and the names teacher/alice/bob.

Checked: the scores (20 and 8 of 20, from the exports), each student's feedback file, what a
student cannot read (the course, the gradebook, the answer key, the other student's files, the
exchange's submissions and feedback), that the students' copy holds no answers, and that only
the tampered cell logs "checksum has changed". The scores, never a graded cell's output text,
are what this test compares. The autograde time per submission goes to
test-artifacts/class-roundtrip/timings.md.

Needs root on Linux (useradd, runuser); skipped without, failed under CI=true.
"""

from __future__ import annotations

import contextlib
import csv
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from exercise_kit import MISTAKES, answer, cells_by_id
from needs import account_command, skip_or_fail
from system_venv import class_venv

from lab.exercises.course import ASSIGNMENT, SOURCE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "grading.md"
ARTIFACTS = ROOT / "test-artifacts" / "class-roundtrip"
# What docs/grading.md names on a real machine, and what stands in for it here.
DOC_VENV = "/opt/lora-lab/.venv"
DOC_SHARED_COPY = "/opt/lora-lab"
DOC_EXCHANGE = "/srv/nbgrader/exchange"
DOC_SHARED_CONFIG = "/etc/jupyter/nbgrader_config.py"
DOC_INSTRUCTOR = "teacher"
STUDENTS_CSV = (  # nbgrader's columns; a name with a comma must stay one cell in the export
    "id,first_name,last_name,email\n"
    "{a},Alice,Liddell,{a}@example.org\n"
    '{b},Bob,"Smith, Jr.",{b}@example.org\n'
)


# ------------------------------------------------------------------ the commands, from the docs


@dataclass
class Block:
    role: str  # root, instructor or student
    title: str
    commands: list[str]


def doc_blocks(text: str) -> list[Block]:
    """The ```bash blocks of the "## The round trip" and exchange sections whose first line is
    `# root: ...`, `# instructor: ...` or `# student: ...`."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first, *rest = body.rstrip("\n").split("\n")
        m = re.match(r"# (root|instructor|student): (.+)", first)
        if m:
            blocks.append(Block(m.group(1), m.group(2), [ln for ln in rest if ln.strip()]))
    return blocks


def block(blocks: list[Block], role: str, title: str) -> Block:
    found = [b for b in blocks if b.role == role and b.title.startswith(title)]
    assert len(found) == 1, f"docs/grading.md has {len(found)} '# {role}: {title}...' blocks"
    return found[0]


def test_the_docs_give_every_step_of_the_round_trip():
    text = DOCS.read_text()
    blocks = doc_blocks(text)
    every = "\n".join(c for b in blocks for c in b.commands)
    for step in (
        "--exchange", "generate_assignment", "release_assignment", "fetch_assignment", "submit",
        "collect", "autograde", "generate_feedback", "release_feedback", "fetch_feedback",
        "db student import", "export",
    ):  # fmt: skip
        assert f" {step}" in every, step
    for b in blocks:
        if b.role != "root":  # the venv activated first, or nbgrader fails on `alembic`
            assert f". {DOC_VENV}/bin/activate" in b.commands[:2], b.title
    assert "No such file or directory: 'alembic'" in text


# ------------------------------------------------------------------------------- the machine


@dataclass
class Machine:
    base: Path
    venv: Path
    lab_copy: Path
    exchange: Path
    shared_config: Path
    users: dict[str, str] = field(default_factory=dict)  # role -> login
    timings: dict[str, float] = field(default_factory=dict)

    def home(self, user: str) -> Path:
        return Path(pwd.getpwnam(user).pw_dir)

    def env(self, user: str) -> list[str]:
        env = [
            f"HOME={self.home(user) if user != 'root' else '/root'}",
            f"USER={user}",
            f"LOGNAME={user}",
            "PATH=/usr/bin:/bin",
            "LANG=C.UTF-8",
            f"PYTHONPATH={self.lab_copy}",  # the shared copy's lab, as the hub recipe gives it
            f"JUPYTER_CONFIG_PATH={self.shared_config.parent}",  # stands in for /etc/jupyter
        ]
        # One training thread (or the test run's own choice), as docs/grading.md advises for
        # graders that share the cores: here, with the other tests (conftest.py). Two threads
        # on a busy 2-core machine mostly wait for each other, spinning.
        env.append(f"LORA_LAB_THREADS={os.environ.get('LORA_LAB_THREADS', '1')}")
        return env

    def substitute(self, line: str) -> str:
        line = line.replace(DOC_VENV, str(self.venv))
        line = line.replace(DOC_SHARED_COPY, str(self.lab_copy))
        line = line.replace(DOC_EXCHANGE, str(self.exchange))
        line = line.replace(DOC_SHARED_CONFIG, str(self.shared_config))
        return re.sub(rf"\b{DOC_INSTRUCTOR}\b", self.users["instructor"], line)

    def run(self, user: str, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`script` in bash as `user` (runuser), from their home, with a clean environment."""
        switch = [] if user == "root" else ["runuser", "-u", user, "--"]
        cwd = "/root" if user == "root" else self.home(user)
        return subprocess.run(
            [*switch, "env", "-i", *self.env(user), "bash", "-euo", "pipefail", "-c", script],
            cwd=cwd, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def run_block(self, user: str, b: Block, timeout: float = 1500) -> str:
        """Run a docs block as `user`, timing each command; its output (fails with it)."""
        lines = []
        for i, command in enumerate(b.commands):
            lines += [f'echo "@@ {i} $(date +%s.%N)" >&2', self.substitute(command)]
        lines.append(f'echo "@@ {len(b.commands)} $(date +%s.%N)" >&2')
        proc = self.run(user, "\n".join(lines), timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"'{b.title}' as {user} failed ({proc.returncode}):\n{out[-6000:]}"
        )
        marks = {int(i): float(t) for i, t in re.findall(r"^@@ (\d+) ([\d.]+)$", proc.stderr, re.M)}
        for i, command in enumerate(b.commands):
            self.timings[f"{user}: {command}"] = marks[i + 1] - marks[i]
        return out

    def refused(self, user: str, command: str) -> bool:
        """True if `command` fails as `user` with "Permission denied"."""
        proc = self.run(user, command, timeout=60)
        return proc.returncode != 0 and "Permission denied" in proc.stderr


def kill_and_remove(user: str) -> None:
    """Stop every process of `user` (by PID), then remove the account and its home."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        return
    ps = subprocess.run(["ps", "-u", user, "-o", "pid="], capture_output=True, text=True)
    for pid in ps.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    account_command(["userdel", "-r", user], capture_output=True, text=True)


def tracked_copy(dest: Path) -> None:
    """The checkout's tracked files, as they are now, without course/ (the answer key): what a
    shared copy holds. Readable by all, writable by none but root."""
    files = (
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if rel.startswith("course/") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for dirpath, _, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)


@pytest.fixture(scope="module")
def machine():
    if sys.platform != "linux" or os.geteuid() != 0:
        skip_or_fail("the class round trip needs root on Linux (it creates accounts)")
    for tool in ("useradd", "userdel", "runuser", "git"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (Debian: apt-get install passwd util-linux git)")
    venv = class_venv()
    tag = secrets.token_hex(3)
    base = Path(tempfile.mkdtemp(prefix=f"llt-class-{tag}-", dir="/tmp"))
    base.chmod(0o755)
    m = Machine(
        base,
        venv,
        base / "lora-lab",
        base / "exchange",
        base / "etc-jupyter" / "nbgrader_config.py",
    )
    try:
        tracked_copy(m.lab_copy)
        for role, short in (("instructor", "ins"), ("alice", "s1"), ("bob", "s2")):
            name = f"llt-{short}-{tag}"
            m.users[role] = name
            account_command(["useradd", "-m", "-s", "/bin/bash", name], check=True)
        for role in ("alice", "bob"):  # the hub recipe: private homes
            m.home(m.users[role]).chmod(0o700)
        # The instructor's checkout, as a clone leaves it (readable folders, in a home this
        # machine's useradd made 755): the docs' own `chmod 700 ~/lora-lab` must close it.
        ins = pwd.getpwnam(m.users["instructor"])
        key = Path(ins.pw_dir) / "lora-lab" / "course" / SOURCE.name
        key.parent.mkdir(parents=True)
        shutil.copyfile(SOURCE, key)
        for p in (key, key.parent, key.parent.parent):
            os.chown(p, ins.pw_uid, ins.pw_gid)
            p.chmod(0o644 if p.is_file() else 0o755)
        yield m
    finally:
        for name in m.users.values():
            kill_and_remove(name)
        shutil.rmtree(base, ignore_errors=True)


def answers_into(path: Path, owner: str, honest_all: bool) -> None:
    """Fill the fetched notebook as a student would: every answer from the key, or the
    half-done set (typical mistakes, and a graded cell edited), saved as that student."""
    key = cells_by_id(nbformat.read(SOURCE, as_version=4))
    nb = nbformat.read(path, as_version=4)
    for gid, cell in cells_by_id(nb).items():
        if not honest_all and gid in MISTAKES:
            cell.source = MISTAKES[gid]
        elif cell.metadata["nbgrader"]["solution"]:
            cell.source = answer(key[gid].source)
        elif not honest_all and gid == "ex3_count":  # a locked graded cell, edited
            cell.source = "pass"
    nbformat.write(nb, path)
    user = pwd.getpwnam(owner)
    os.chown(path, user.pw_uid, user.pw_gid)


def failed_cells(course: Path, student: str) -> dict[str, str]:
    """Each graded cell of the autograded submission that ended in an error, with its error
    (for the failure message only: the test compares scores, never this text)."""
    path = course / "autograded" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    if not path.exists():
        return {"": f"{path} is missing"}
    found = {}
    for gid, cell in cells_by_id(nbformat.read(path, as_version=4)).items():
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found[gid] = f"{out.get('ename')}: {out.get('evalue', '')[:300]}"
    return found


def test_the_round_trip_as_the_docs_give_it(machine: Machine):
    m, blocks = machine, doc_blocks(DOCS.read_text())
    ins, alice, bob = m.users["instructor"], m.users["alice"], m.users["bob"]
    m.run_block("root", block(blocks, "root", "set up the exchange"))
    assert m.exchange.stat().st_mode & 0o7777 == 0o1777
    assert (m.exchange / "lora-lab").stat().st_uid == pwd.getpwnam(ins).pw_uid

    m.run_block(ins, block(blocks, "instructor", "make the course"))
    course = m.home(ins) / "lora-course"
    assert course.stat().st_mode & 0o777 == 0o700

    fetched = {}
    for student in (alice, bob):
        m.run_block(student, block(blocks, "student", "fetch the assignment"))
        fetched[student] = m.home(student) / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        text = fetched[student].read_text()
        assert "BEGIN SOLUTION" not in text and "solutions" not in text.lower()
    answers_into(fetched[alice], alice, honest_all=True)
    answers_into(fetched[bob], bob, honest_all=False)
    for student in (alice, bob):
        m.run_block(student, block(blocks, "student", "submit"))

    log = m.run_block(ins, block(blocks, "instructor", "collect"), timeout=2400)
    autograde = next(
        v for k, v in m.timings.items() if k.endswith("nbgrader autograde lora_by_hand")
    )
    # Only the graded cell bob edited is reported, not every released graded cell.
    changed = re.findall(r"Attribute 'checksum' for cell (\w+) has changed", log)
    assert changed == ["ex3_count"], log[-4000:]

    feedback = {}
    for student in (alice, bob):
        m.run_block(student, block(blocks, "student", "fetch the feedback"))
        found = list((m.home(student) / ASSIGNMENT / "feedback").glob(f"*/{ASSIGNMENT}.html"))
        assert len(found) == 1, found
        feedback[student] = found[0]
        assert found[0].stat().st_uid == pwd.getpwnam(student).pw_uid

    (course / "students.csv").write_text(STUDENTS_CSV.format(a=alice, b=bob))
    os.chown(course / "students.csv", pwd.getpwnam(ins).pw_uid, pwd.getpwnam(ins).pw_gid)
    m.run_block(ins, block(blocks, "instructor", "import names"))

    # The scores, from the exports: all right 20, the half-done 8 (exercises 1, 3, 5, 6, 7, 9a
    # and 10b wrong: 12 points lost).
    with open(course / "grades-lms.csv", newline="") as f:
        rows = {r["Username"]: r for r in csv.DictReader(f)}
    assert rows[alice][ASSIGNMENT] == "20" and rows[bob][ASSIGNMENT] == "8", (
        rows, failed_cells(course, alice), failed_cells(course, bob), log[-3000:]
    )  # fmt: skip
    assert rows[bob]["Last name"] == "Smith, Jr." and rows[alice]["Email address"].startswith(alice)
    with open(course / "grades.csv", newline="") as f:
        nbgrader_rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert (
        float(nbgrader_rows[alice]["score"]) == 20
        and float(nbgrader_rows[alice]["max_score"]) == 20
    )
    assert nbgrader_rows[alice]["first_name"] == "Alice"

    # What a student cannot read.
    ins_home = m.home(ins)
    for who, other in ((alice, bob), (bob, alice)):
        for command in (
            f"ls {course}",
            f"cat {course}/gradebook.db",
            f"cat {course}/source/{ASSIGNMENT}/{ASSIGNMENT}.ipynb",
            f"cat {ins_home}/lora-lab/course/{SOURCE.name}",
            f"cat {feedback[other]}",
            f"cat {fetched[other]}",
            f"ls {m.exchange}/lora-lab/inbound",
            f"ls {m.exchange}/lora-lab/feedback",
        ):
            assert m.refused(who, command), f"{who} could run: {command}"
        assert not m.refused(who, f"cat {feedback[who]} > /dev/null")
    # The students' copy of the notebooks (the docs' command) holds no answer.
    proc = m.run(
        alice,
        f"cp -r {m.lab_copy}/notebooks ~/lora-lab-notebooks && grep -rl 'BEGIN SOLUTION' ~ || true",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lines = ["| step (as user) | seconds |", "| --- | ---: |"]
    lines += [f"| `{k}` | {v:.1f} |" for k, v in m.timings.items()]
    load, when = os.getloadavg()[0], time.strftime("%Y-%m-%d")
    lines.append(
        f"\nautograde: {autograde:.1f} s for 2 submissions, {autograde / 2:.1f} s each (serial; "
        f"load average {load:.1f}, {os.cpu_count()} CPUs, {when})\n"
    )
    (ARTIFACTS / "timings.md").write_text("\n".join(lines))
