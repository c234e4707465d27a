"""Grades that depend only on the answers: autograding outside the submission's process.

lab.exercises.autograde runs a submission's cells in a sandboxed worker and each graded cell's
hidden test in the grader's own process. Here, submissions built from the assignment's source
(the graded cells carry their hidden tests, as nbgrader restores them) are graded directly:

- an honest complete answer scores full marks and an honest half-done one its exercises' points;
- the same half-done answers plus a cheat score exactly what they score without it, for every
  cheat in CHEATS (rebinding the checks, `grade`, torch.allclose, a check's helpers, builtins,
  the exercises module itself; a function that never returns; a cell that kills its process;
  frames forged on the grader's channel; tampering from inside an answer at call time; reading
  the answer key; writing the lab's grading code), and the feedback says when one tampered;
- the sandbox keeps files read-only and hides the course, the answer key and secrets, and
  grading one submission changes nothing for the next;
- the channel refuses malformed frames from the worker by name, without running anything.

The whole nbgrader round trip with this executor plugged in is tests/test_grading.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from needs import skip_or_fail

import lab.exercises.grading
from lab.exercises import autograde, remote, sandbox
from lab.exercises.autograde import Submission, grade_notebook
from lab.exercises.course import SOURCE, STUDENT

ROOT = Path(__file__).resolve().parents[1]
HALF = ("ex1_forward_answer", "ex3_count_answer", "ex5_sweep_answer")  # 2 + 2 + 1 points


@pytest.fixture(autouse=True)
def _needs_bwrap():
    if shutil.which("bwrap") is None:
        skip_or_fail("bubblewrap (bwrap) is missing: apt-get install bubblewrap")


def _gid(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def _is_test(cell) -> bool:
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def _answer(source: str) -> str:
    return "\n".join(line for line in source.split("\n") if "### " not in line)


def submission(solved: tuple[str, ...] | str = (), cheats: dict[str, str] | None = None):
    """The released notebook as nbgrader hands it to autograde: its graded cells' hidden tests
    restored from the source; the answers in `solved` ("all" for every one) filled in from the
    answer key; each cheat's code appended to the cell with that grade id ("imports" is the
    first cell)."""
    key = {_gid(c): c for c in nbformat.read(SOURCE, as_version=4).cells if _gid(c)}
    nb = nbformat.read(STUDENT, as_version=4)
    for cell in nb.cells:
        gid = _gid(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if gid is None:
            continue
        if _is_test(cell):
            cell.source = key[gid].source
        elif solved == "all" or gid in solved:
            cell.source = _answer(key[gid].source)
        if cheats and gid in cheats:
            cell.source += "\n\n" + cheats[gid]
    return nb


def points(nb) -> dict[str, float]:
    """Each graded cell's points as nbgrader counts them: none if its output holds an error
    or anything on stderr, all of them otherwise."""
    out = {}
    for cell in nb.cells:
        if _is_test(cell):
            failed = any(
                o.output_type == "error" or (o.output_type == "stream" and o.name == "stderr")
                for o in cell.outputs
            )
            out[_gid(cell)] = 0.0 if failed else float(cell.metadata.nbgrader.points)
    return out


def graded_text(nb, gid: str) -> str:
    cell = next(c for c in nb.cells if _gid(c) == gid)
    return "\n".join(
        o.get("text") or o.get("data", {}).get("text/plain") or o.get("evalue", "")
        for o in cell.outputs
    )


@pytest.fixture(scope="module")
def half():
    """The honest half-done submission, graded: the reference for every cheat."""
    nb = submission(HALF)
    grade_notebook(nb)
    return nb


def test_an_honest_complete_answer_scores_full_marks():
    nb = submission("all")
    changed = grade_notebook(nb)
    got = points(nb)
    total = sum(c.metadata.nbgrader.points for c in nb.cells if _is_test(c))
    assert sum(got.values()) == total, {
        g: graded_text(nb, g)[:300] for g, p in got.items() if not p
    }
    assert changed == []
    assert "Exercise 1: the forward pass: passed" in graded_text(nb, "ex1_forward")


def test_an_honest_half_done_answer_scores_its_exercises_and_each_hint_names_the_exercise(half):
    got = points(half)
    assert {g for g, p in got.items() if p} == {"ex1_forward", "ex3_count", "ex5_sweep"}
    assert sum(got.values()) == 5
    text = graded_text(half, "ex2_merge")
    assert text.startswith("Exercise 2: merge: not yet:"), text
    # The hint is whole in a wrapping HTML block; the error line only says where it is.
    cell = next(c for c in half.cells if _gid(c) == "ex2_merge")
    html = next(o for o in cell.outputs if o.output_type == "display_data").data["text/html"]
    assert "pre-wrap" in html and "not yet" in html
    error = next(o for o in cell.outputs if o.output_type == "error")
    assert error.traceback == ["NotPassed: Exercise 2: merge: not yet passed (the hint is above)"]
    assert "Exercise 9(b)" in graded_text(half, "ex9b_find_best_lr")


ANSWER_IDS = [
    _gid(c)
    for c in nbformat.read(SOURCE, as_version=4).cells
    if c.metadata.get("nbgrader", {}).get("solution")
]
ACCEPTANCE_CHEAT = """\
import torch, builtins
import lab, lab.exercises as ex
_ok = ex.Feedback(True, "looks fine")
for _n in dir(ex):
    if _n.startswith("check_"):
        setattr(ex, _n, lambda *a, **k: _ok)
ex.grade = lambda *a, **k: print("passed")
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
"""

CHEATS = {
    "rebinds every check, grade, torch.allclose and torch.equal": {"imports": ACCEPTANCE_CHEAT},
    "rebinds the checks' helpers and the verdict": {
        "imports": (
            "import lab.exercises.forward_check as c, lab.exercises.feedback as f\n"
            "c._close = lambda a, b: True\n"
            "f.Feedback.__str__ = lambda self: 'passed: fine'\n"
            "f.Feedback.passed = property(lambda self: True)\n"
        )
    },
    "replaces lab.exercises in sys.modules": {
        "imports": (
            "import sys, types, lab\n"
            "fake = types.ModuleType('lab.exercises')\n"
            "fake.grade = lambda *a, **k: print('passed: fine')\n"
            "sys.modules['lab.exercises'] = fake\n"
            "lab.exercises = fake\n"
        )
    },
    "rebinds builtins the checks use": {
        "ex5_sweep_answer": (
            "import builtins\n"
            "builtins.all = lambda *a, **k: True\n"
            "builtins.any = lambda *a, **k: False\n"
            "builtins.sum = lambda *a, **k: 0\n"
        )
    },
    "a function that never returns": {
        "ex2_merge_answer": "def my_merge(layer):\n    while True:\n        pass\n"
    },
    "a cell that ends its own process": {"ex2_merge_answer": "import os\nos._exit(3)\n"},
    "frames forged on the grader's channel": {
        "ex3_count_answer": (
            "import json, os, struct\n"
            "_fake = json.dumps({'values': {'ANSWER': 'D'}, 'outputs': [], 'ok': True}).encode()\n"
            "for _fd in range(3, 64):\n"
            "    try:\n"
            "        os.write(_fd, struct.pack('>I', len(_fake)) + _fake)\n"
            "    except OSError:\n"
            "        pass\n"
        )
    },
    "tampers from inside its answer when called": {
        "ex7_nf4_answer": (
            "def my_quantize(block):\n"
            "    import torch, lab.exercises.nf4_check as c\n"
            "    c._close = lambda a, b: True\n"
            "    torch.equal = lambda *a, **k: True\n"
            "    return None\n"
        )
    },
    # after each answer cell: that exercise's worked answer, read from the answer key
    "runs the answer key": {
        gid: (
            "import json\n"
            f"_key = json.load(open({str(SOURCE)!r}))\n"
            "for _cell in _key['cells']:\n"
            f"    if _cell['metadata'].get('nbgrader', {{}}).get('grade_id') == {gid!r}:\n"
            "        exec(''.join(_cell['source']))\n"
        )
        for gid in ANSWER_IDS
    },
    "a cell that never ends": {"ex6_memory_answer": "while True:\n    pass\n"},
    "asks for all the memory there is": {
        "ex6_memory_answer": "import torch\n_hog = torch.ones(2**40, dtype=torch.uint8)\n"
    },
    "fills its disk": {
        "ex6_memory_answer": (
            "import os\n"
            "with open(os.path.expanduser('~/fill'), 'wb') as _f:\n"
            "    for _ in range(2048):\n"
            "        _f.write(b'0' * 2**20)\n"
        )
    },
    "writes the lab's grading code": {
        "imports": (
            "import lab.exercises.grading as g\n"
            "open(g.__file__, 'a').write('\\ngrade = lambda *a, **k: print(\"passed\")\\n')\n"
        )
    },
}


@pytest.mark.parametrize("name", list(CHEATS))
def test_a_cheat_scores_what_the_honest_answer_scores(name, half):
    grading_code = hashlib.sha256(Path(lab.exercises.grading.__file__).read_bytes()).hexdigest()
    nb = submission(HALF, CHEATS[name])
    grade_notebook(nb, call_timeout=5, cell_timeout=30)  # short, for the ones that never end
    assert points(nb) == points(half), {g: graded_text(nb, g)[:300] for g in points(nb)}
    after = hashlib.sha256(Path(lab.exercises.grading.__file__).read_bytes()).hexdigest()
    assert after == grading_code, "a submission changed the lab's grading code"


def test_the_feedback_says_what_a_submission_rebound():
    nb = submission(HALF, {"imports": ACCEPTANCE_CHEAT})
    changed = grade_notebook(nb)
    for name in ("lab.exercises.check_forward", "lab.exercises.grade", "torch.allclose"):
        assert name in changed
    text = graded_text(nb, "ex1_forward")
    assert "Note: this notebook changed" in text and "torch.allclose" in text
    assert "changes no grade" in text


def test_a_function_that_never_returns_is_stopped_and_named():
    nb = submission(HALF, CHEATS["a function that never returns"])
    grade_notebook(nb, call_timeout=3)
    text = graded_text(nb, "ex2_merge")
    assert "TimeoutError" in text and "did not finish within 3 s" in text


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The channel: what the grader reads from a worker
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        torch.tensor(True),
        torch.empty(0, 4),
        (1, "two", None, [3.5, float("nan")]),
        {"a": 1, 2: (float("inf"),)},
        {1, 2, 3},
    ],
)
def test_plain_values_cross_the_channel_unchanged(value):
    back = remote.decode(json.loads(json.dumps(remote.encode(value))))
    if isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    else:
        assert repr(back) == repr(value)


def test_anything_else_crosses_only_as_its_type_name():
    class Sneaky:
        def __reduce__(self):
            raise AssertionError("never pickled")

    back = remote.decode(json.loads(json.dumps(remote.encode(Sneaky()))))
    assert type(back).__name__ == "Sneaky" and isinstance(back, remote.Opaque)


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ({"tensor": "torch.float32", "shape": [2], "data": "AAAA"}, "with 3 bytes"),
        ({"tensor": "object", "shape": [1], "data": ""}, "dtype 'object'"),
        ({"tensor": "torch.float32", "shape": [-1], "data": ""}, "shape [-1]"),
        ({"numpy": "object", "value": "1"}, "numpy type 'object'"),
        ({"numpy": "int64", "value": "__import__('os')"}, "numpy int64 of"),
        ({"dict": [[{"list": []}, 1]]}, "not hashable"),
        ({"exec": "print(1)"}, "not a value"),
        (1.5, "not a value"),
    ],
)
def test_a_malformed_value_from_a_worker_is_refused_by_name(frame, words):
    with pytest.raises(remote.FrameError, match=re.escape(words)):
        remote.decode(frame)


def test_a_state_that_points_at_nothing_is_refused():
    with pytest.raises(remote.FrameError, match="reference 7 to nothing"):
        remote.apply_state({"ref": 7}, [[1, 2]])


def test_a_frame_too_large_or_not_json_is_refused_unread():
    import os
    import struct

    r, w = os.pipe()
    os.write(w, struct.pack(">I", remote.MAX_FRAME + 1))
    with pytest.raises(remote.FrameError, match="at most"):
        remote.read_frame(r)
    os.write(w, struct.pack(">I", 3) + b"[1]")
    with pytest.raises(remote.FrameError, match="holding a list"):
        remote.read_frame(r)
    os.close(w)
    with pytest.raises(remote.FrameError, match="closed"):
        remote.read_frame(r)
    os.close(r)


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        ({"type": "KeyboardInterrupt", "bases": ["KeyboardInterrupt", "BaseException"]}, Exception),
        ({"type": "SystemExit", "bases": ["SystemExit", "BaseException"]}, SystemExit),
        ({"type": "NotImplementedError", "bases": []}, NotImplementedError),
        ({"type": "MyError", "bases": ["MyError", "ValueError", "Exception"]}, ValueError),
    ],
)
def test_a_students_exception_comes_back_by_name_never_as_a_stop(raised, kind):
    exc = autograde._exception({**raised, "message": "boom"})
    assert isinstance(exc, kind) and type(exc).__name__ == raised["type"]
    assert not isinstance(exc, KeyboardInterrupt)


# ---------------------------------------------------------------------------------------------
# Through nbgrader: a submission's metadata decides nothing
# ---------------------------------------------------------------------------------------------


def _forged_cell(grade_id: str, **meta) -> dict:
    return nbformat.v4.new_code_cell(
        "print('passed: everything')\n",
        metadata={
            "nbgrader": {
                "grade": True,
                "solution": False,
                "locked": True,
                "grade_id": grade_id,
                "points": 20,
                "schema_version": 3,
                **meta,
            }
        },
    )


@pytest.fixture(scope="module")
def through_nbgrader(tmp_path_factory):
    """nbgrader autograde on the released notebook: honest (unanswered) and four cheats."""
    from lab.exercises.course import ASSIGNMENT, _nbgrader, generate_release, make_course

    root = tmp_path_factory.mktemp("course")
    make_course(root)
    release = generate_release(root)

    def released():
        return nbformat.read(release, as_version=4)

    subs = {"honest": released()}
    nb = released()
    nb.cells.insert(1, nbformat.v4.new_code_cell(ACCEPTANCE_CHEAT))
    subs["rebinds"] = nb
    nb = released()  # a cell of its own claiming to be a graded test worth 20 points
    nb.cells.insert(1, _forged_cell("my_own_test"))
    subs["forged-test"] = nb
    nb = released()  # a graded test cell relabelled as an answer, its hidden test replaced
    for cell in nb.cells:
        if _gid(cell) == "ex1_forward":
            cell.metadata.nbgrader.update(solution=True, locked=False)
            cell.source = "print('passed')"
    subs["relabelled"] = nb
    nb = released()  # a second cell with a graded test's id, before the real one
    nb.cells.insert(1, _forged_cell("ex3_count", points=2))
    subs["duplicate-id"] = nb
    for student, notebook in subs.items():
        path = root / "submitted" / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(notebook, path)
    refused = {}
    for student in subs:
        try:
            _nbgrader(root, "autograde", ASSIGNMENT, "--student", student, "--force", timeout=900)
        except RuntimeError as exc:  # nbgrader itself refuses a notebook it cannot validate
            refused[student] = str(exc)
    return root, list(subs), refused


def test_through_nbgrader_no_cheat_or_forged_cell_earns_a_point(through_nbgrader):
    import os

    from nbgrader.api import Gradebook

    from lab.exercises.course import ASSIGNMENT

    root, students, refused = through_nbgrader
    assert "honest" not in refused and "rebinds" not in refused, refused
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        scores = {s: gb.find_submission(ASSIGNMENT, s).score for s in students if s not in refused}
    print("scores", scores, "refused by nbgrader", sorted(refused))
    assert scores == dict.fromkeys(scores, scores["honest"]), scores


def test_the_code_run_in_the_grader_is_the_gradebooks_whatever_the_submission_says(
    through_nbgrader,
):
    from lab.exercises.autograde import LabExecute
    from lab.exercises.course import ASSIGNMENT, SOURCE

    root = through_nbgrader[0]
    nb = submission()
    for cell in nb.cells:
        if _gid(cell) == "ex1_forward":
            cell.source = "import os\nos.system('touch /tmp/owned')"
            cell.metadata.nbgrader.update(solution=True, points=99)
    resources = {
        "nbgrader": {
            "db_url": f"sqlite:///{root / 'gradebook.db'}",
            "notebook": ASSIGNMENT,
            "assignment": ASSIGNMENT,
        }
    }
    tests = LabExecute().recorded_tests(nb, resources)
    key = {_gid(c): c.source for c in nbformat.read(SOURCE, as_version=4).cells if _gid(c)}
    assert {_gid(nb.cells[i]): src for i, src in tests.items()} == {
        gid: key[gid] for gid in key if gid in {_gid(nb.cells[i]) for i in tests}
    }
    assert len(tests) == 12
    cell = next(c for c in nb.cells if _gid(c) == "ex1_forward")
    assert cell.metadata.nbgrader.solution is False and cell.metadata.nbgrader.points == 2


def test_the_feedback_page_names_each_exercise_and_shows_each_hint_whole(through_nbgrader):
    from lab.exercises.course import ASSIGNMENT, _nbgrader

    root = through_nbgrader[0]
    _nbgrader(root, "generate_feedback", ASSIGNMENT, "--student", "honest", "--force")
    page = (root / "feedback" / "honest" / ASSIGNMENT / f"{ASSIGNMENT}.html").read_text()
    toc = page[page.index('id="toc"') : page.index("</ol>", page.index('id="toc"'))]
    names = re.findall(r'<a href="#(ex\w+)">([^<]+)</a>: 0.0 of', toc)
    assert [n for _, n in names][:2] == ["Exercise 1: the forward pass", "Exercise 2: merge"]
    assert (
        "ex9b_find_best_lr",
        "Exercise 9(b): the best learning rate, predicted then found",
    ) in names
    assert len(names) == 12 and "Test cell" not in page
    # Each hint in a block that wraps, whole; the error line only points at it.
    assert "Exercise 3: count trainable parameters: not yet:" in page
    assert page.count("white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere") == 12


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
