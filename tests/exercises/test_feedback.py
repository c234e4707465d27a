"""Tests for lab/exercises/feedback.py: a verdict's text, and a student's code run safely."""

from __future__ import annotations

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    forward_ok,
)

from lab import exercises as ex
from lab.exercises import Feedback


def test_feedback_shows_its_verdict_and_message():
    assert repr(Feedback(True, "ok")) == str(Feedback(True, "ok")) == "passed: ok"
    assert str(Feedback(False, "fix it")) == "not yet: fix it"


def test_forward_restores_torch_settings_a_student_changed():
    def answer(x, base, A, B, s, d):
        torch.set_grad_enabled(False)
        return forward_ok(x, base, A, B, s, d)

    assert_not_yet(ex.check_forward(answer), "carries no gradient")
    assert torch.is_grad_enabled()


def test_keyboard_interrupt_goes_through():
    def answer(*args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.check_forward(answer)


def test_feedback_html_wraps_between_words_and_escapes():
    html = Feedback(False, "a <b> & c").__repr__(), Feedback(False, "a <b> & c")._repr_html_()
    assert html[0] == "not yet: a <b> & c"
    assert "word-break: normal" in html[1] and "pre-wrap" in html[1]
    assert "not yet: a &lt;b&gt; &amp; c" in html[1]
