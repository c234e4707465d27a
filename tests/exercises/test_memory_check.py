"""Tests for lab/exercises/memory_check.py: exercise 6, each mistake named."""

from __future__ import annotations

import math

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
)

from lab import exercises as ex

N_FULL, N_LORA = 406_784, 8_192


def test_memory_accepts_the_exact_count_and_reports_the_measurement():
    feedback = ex.check_memory(12 * N_FULL, 12 * N_LORA)
    assert feedback.passed, feedback
    assert "4.7 MiB (measured 4.7 MiB)" in feedback.message
    assert "96.0 KiB (measured 96.0 KiB)" in feedback.message


@pytest.mark.parametrize("factor", [0.99, 1.01, 1.1, 0.9])
def test_memory_close_is_not_enough(factor):
    assert_not_yet(ex.check_memory(12 * N_FULL * factor, 12 * N_LORA), "not exact")
    assert_not_yet(ex.check_memory(12 * N_FULL, round(12 * N_LORA * factor)), "not the lab's count")


@pytest.mark.parametrize(
    ("full", "lora", "phrase"),
    [
        (4 * N_FULL, 12 * N_LORA, "gradients alone"),
        (16 * N_FULL, 12 * N_LORA, "weights themselves"),
        (8 * N_FULL, 12 * N_LORA, "a gradient and two Adam moments"),
        (6 * N_FULL, 12 * N_LORA, "2 bytes per value"),
        (3 * N_FULL, 12 * N_LORA, "not bytes"),
        (12 * N_FULL, 12 * (N_FULL + N_LORA), "frozen base too"),
        (12 * N_FULL, 96, "looks like KiB"),
        (12 * N_FULL, 9, "very small"),
        (None, None, "no prediction for full"),
        (12 * N_FULL, "96 KiB", "positive number of bytes"),
        (-1, 1, "positive number of bytes"),
        (float("nan"), 1, "positive number of bytes"),
    ],
)
def test_memory_names_the_mistake(full, lora, phrase):
    assert_not_yet(ex.check_memory(full, lora), phrase)


def test_memory_agrees_with_the_analytic_count():
    state = ex._state_bytes()
    assert state["full"]["analytic"] == 12 * N_FULL and state["lora"]["analytic"] == 12 * N_LORA
    for kind in ("full", "lora"):
        assert math.isclose(state[kind]["measured"], state[kind]["analytic"], rel_tol=0.01)


ONE_TARGET = 2 * 8 * 256  # LoRA r=8 on q alone, both blocks


MEMORY_WRONG = [
    (12 * N_FULL, 12 * ONE_TARGET, "half the adapters", "q and v"),
    (12 * N_FULL, 12 * 4 * ONE_TARGET, "q, k, v and o"),
    (12 * N_FULL, 12 * 2 * 8 * (4 * 256 + 2 * 640), "all six projections"),
    (4 * N_FULL, 12 * N_LORA, "gradients alone"),
    (8 * N_FULL, 12 * N_LORA, "a gradient and two Adam moments"),
    (16 * N_FULL, 12 * N_LORA, "weights themselves"),
    (24 * N_FULL, 12 * N_LORA, "8 bytes per value"),
    (6 * N_FULL, 12 * N_LORA, "2 bytes per value"),
    (N_FULL, 12 * N_LORA, "count of values, not bytes"),
    (12 * (N_FULL - 197_120), 12 * N_LORA, "one block's worth"),
    (12 * N_LORA, 12 * N_FULL, "swapped"),
    (12 * N_FULL, 12 * (N_FULL + N_LORA) * 1.0, "frozen base too"),
    (12 * N_FULL / 2**20, 12 * N_LORA, "looks like MiB"),
    (12 * N_FULL, 12 * N_LORA / 1024, "looks like KiB"),
    (12 * (N_FULL + 64 * 128), 12 * N_LORA, "head is counted twice", "weight tying"),
    (12 * (N_FULL - 64 * 128 - 32 * 128), 12 * N_LORA, "both embeddings are left out"),
    (12 * 2 * (4 * 128 * 128 + 2 * 128 * 512), 12 * N_LORA, "only the blocks' linear layers"),
    (12 * (N_FULL - 64 * 128), 12 * N_LORA, "token embedding", "is left out"),
    (12 * (N_FULL - 32 * 128), 12 * N_LORA, "position embedding (32 x 128) is left out"),
    (12 * (N_FULL - 5 * 256), 12 * N_LORA, "LayerNorms are left out"),
    (12 * N_FULL + 1, 12 * N_LORA, "close, but not exact"),
    (12 * N_FULL * 1.1, 12 * N_LORA, "close, but not exact"),
    (4.7 * 2**20, 96 * 1024, "close, but not exact"),  # the rounded figures the pass prints
    (12 * N_FULL, 12 * N_LORA - 12, "not the lab's count"),
    (12 * N_FULL, 12 * N_FULL, "frozen base too"),
    (1e30, 12 * N_LORA, "not the lab's count"),
]


def test_memory_accepts_the_right_answer():
    assert_passed(ex.check_memory(12 * N_FULL, 12 * N_LORA))


@pytest.mark.parametrize(("full", "lora", *["phrases"]), [(f, lo, p) for f, lo, *p in MEMORY_WRONG])
def test_memory_wrong_answers_get_their_own_hint(full, lora, phrases):
    assert_not_yet(ex.check_memory(full, lora), *phrases)


def test_memory_one_target_is_not_told_about_bytes_per_value():
    feedback = ex.check_memory(12 * N_FULL, 12 * ONE_TARGET)
    assert_not_yet(feedback, "q and v")
    assert "bytes per value" not in feedback.message and "not 2" not in feedback.message


@pytest.mark.parametrize(
    ("full", "lora", "phrase"),
    [
        (None, 12 * N_LORA, "no prediction for full"),
        (12 * N_FULL, None, "no prediction for lora"),
        ("4.7 MiB", 12 * N_LORA, "positive number of bytes"),
        (float("nan"), 12 * N_LORA, "positive number of bytes"),
        (float("inf"), 12 * N_LORA, "positive number of bytes"),
        (True, 12 * N_LORA, "positive number of bytes"),
        (12 * N_FULL, -1, "positive number of bytes"),
        (exits, 12 * N_LORA, "positive number of bytes"),
        (torch.ones(3), 12 * N_LORA, "positive number of bytes"),
        (12 * N_FULL, 1 + 2j, "positive number of bytes"),
    ],
)
def test_memory_bad_input_is_feedback(full, lora, phrase):
    assert_not_yet(ex.check_memory(full, lora), phrase)


def test_memory_accepts_a_one_element_tensor():
    assert_passed(ex.check_memory(torch.tensor(12 * N_FULL), 12 * N_LORA))
    assert_passed(ex.check_memory(float(12 * N_FULL), 12.0 * N_LORA))


def test_memory_never_prints_the_expected_count():
    feedback = ex.check_memory(12 * N_FULL + 12, 12 * N_LORA)
    assert_not_yet(feedback)
    assert f"{12 * N_FULL:,}" not in feedback.message and "4.7 MiB" in feedback.message
