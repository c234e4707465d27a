"""Tests for lab/exercises/sweep_check.py: exercise 5, each wrong choice explained."""

from __future__ import annotations

import pytest
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
)

from lab import exercises as ex


def test_sweep_evidence_shows_the_collapse_at_rank_64():
    table = ex.sweep_evidence()
    row = next(line for line in table.splitlines() if line.split()[0] == "64")
    assert "0.91" in row and "0.32" in row, table


def test_sweep_answer_accepts_the_right_letter_in_any_spelling():
    for answer in ("D", "d", " D. ", "d)"):
        assert ex.check_sweep_answer(answer).passed


@pytest.mark.parametrize("letter", ["A", "B", "C", "E", "F", "G"])
def test_sweep_answer_explains_each_wrong_choice(letter):
    feedback = ex.check_sweep_answer(letter)
    assert_not_yet(feedback, f"{letter} is not it", ex.SWEEP_CHOICES[letter][1])


@pytest.mark.parametrize(("answer", "phrase"), [(None, "no answer yet"), ("Z", "one letter")])
def test_sweep_answer_without_a_letter_is_feedback(answer, phrase):
    assert_not_yet(ex.check_sweep_answer(answer), phrase)


SWEEP_WRONG = [
    ("A", "it underfits"),
    ("B", "depends on which one alpha and lr were tuned for"),
    ("C", "alpha / r shrinks the scaling"),
    ("E", "rank itself is usable"),
    ("F", "incomplete", "tuned for"),
    ("G", "not noise"),
    ("B, D", "answer one letter, the one explanation that is complete"),
    ("Z", "answer one letter of A, B, C, D, E, F, G"),
    ("alpha / r is best", "answer one letter"),
    (None, "no answer yet"),
    ("  ", "no answer yet"),
    (4, "one letter in quotes"),
    (["D"], "one letter in quotes"),
    (exits, "one letter in quotes"),
]


@pytest.mark.parametrize("answer", ["D", "d", " D. ", "d)"])
def test_sweep_answer_accepts_the_complete_explanation(answer):
    feedback = ex.check_sweep_answer(answer)
    assert_passed(feedback)
    assert "tuned" in feedback.message


@pytest.mark.parametrize(("answer", *["phrases"]), [(a, p) for a, *p in SWEEP_WRONG])
def test_sweep_wrong_answers_get_their_own_hint(answer, phrases):
    assert_not_yet(ex.check_sweep_answer(answer), *phrases)


def test_the_complete_answer_names_the_tuning_and_rsloras_own_alpha():
    choice = ex.SWEEP_CHOICES[ex.SWEEP_ANSWER][0]
    assert "tuned for it" in choice and "its own tuned alpha" in choice and "Adam" in choice


def test_sweep_evidence_matches_the_answer():
    # The answer quotes scalings 2 and 0.25 at rank 64; the evidence table shows them.
    row = next(line for line in ex.sweep_evidence().splitlines() if line.split()[0] == "64")
    assert "0.25" in row and "2.00" in row
