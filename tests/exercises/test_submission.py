"""Tests for lab/exercises/submission.py: a submission's worker as the grader drives it."""

from __future__ import annotations

import re

import pytest

from lab.exercises.channel import WorkerLost
from lab.exercises.remote_function import RemoteFunction
from lab.exercises.submission import Submission, _valid_outputs, _worker_env


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"cell_timeout": 0}, "cell_timeout is 0: give a number of seconds above 0"),
        ({"call_timeout": float("inf")}, "call_timeout is inf"),
        ({"cell_timeout": "600"}, "cell_timeout is '600'"),
        ({"memory_limit": 2**20}, "memory_limit is 1048576: give bytes, at least 2**30"),
    ],
)
def test_limits_that_cannot_hold_are_refused_by_name(limits, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Submission(**limits)


def test_only_outputs_in_nbformats_shape_come_back():
    outputs = [
        {"output_type": "stream", "name": "stdout", "text": "hi\n"},
        {"output_type": "stream", "name": "fd3", "text": "forged"},
        "not an output",
        {"output_type": "display_data", "data": {"text/plain": "1", "image/png": b"raw"}},
        {"output_type": "error", "ename": "E" * 500, "evalue": "v", "traceback": "not a list"},
    ]
    assert _valid_outputs(outputs) == [
        {"output_type": "stream", "name": "stdout", "text": "hi\n"},
        {"output_type": "display_data", "data": {"text/plain": "1"}, "metadata": {}},
        {"output_type": "error", "ename": "E" * 200, "evalue": "v", "traceback": []},
    ]
    assert _valid_outputs("not a list") == []


def test_the_worker_gets_a_plain_environment_and_what_the_grader_adds(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do not pass")
    monkeypatch.setenv("LORA_LAB_THREADS", "1")
    env = _worker_env({"EXTRA": "yes"})
    assert "SECRET_TOKEN" not in env and env["LORA_LAB_THREADS"] == "1" and env["EXTRA"] == "yes"


def test_a_cell_runs_in_the_worker_and_its_names_come_back_as_data(bwrap):
    worker = Submission()
    worker.start()
    try:
        outputs, ok = worker.run("x = 6 * 7\nprint('hi')\ndef f(a):\n    return a + 1\n")
        assert ok and {"output_type": "stream", "name": "stdout", "text": "hi\n"} in outputs
        values = worker.names(["x", "f", "missing"])
        assert values["x"] == 42 and "missing" not in values
        assert isinstance(values["f"], RemoteFunction) and values["f"](1) == 2
        _, ok = worker.run("import os\nos._exit(3)\n")  # the process ends: the grader is told
    except WorkerLost as exc:
        assert "the process stopped" in str(exc)
    else:
        pytest.fail("a worker that exited was not reported lost")
    finally:
        worker.stop()
    assert not worker.alive
