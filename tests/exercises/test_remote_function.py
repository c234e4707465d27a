"""Tests for lab/exercises/remote_function.py: a student's exception comes back by name."""

from __future__ import annotations

import pytest

from lab.exercises import remote_function


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
    exc = remote_function._exception({**raised, "message": "boom"})
    assert isinstance(exc, kind) and type(exc).__name__ == raised["type"]
    assert not isinstance(exc, KeyboardInterrupt)
