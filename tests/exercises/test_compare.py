"""Tests for lab/exercises/compare.py: how a check measures a student's answer against the lab's."""

from __future__ import annotations

import pytest
import torch

from lab.exercises.compare import _as_number, _bad_tensor, _close, _factor, _match_factor, _where


def test_where_names_the_largest_difference_and_its_position():
    diff = torch.zeros(2, 3)
    diff[0, 1], diff[1, 2] = 0.1, -0.32
    assert _where(diff) == "by 3.2e-01 at position [1, 2]"


def test_close_needs_the_same_shape_and_values_within_tolerance():
    a = torch.ones(2, 2)
    assert _close(a, a + 1e-7)
    assert not _close(a, a + 1e-3)
    assert not _close(a, torch.ones(4))


def test_factor_finds_one_scale_for_every_entry_and_names_known_ones():
    want = torch.randn(5, generator=torch.Generator().manual_seed(0))
    assert _factor(1.5 * want, want) == pytest.approx(1.5)
    assert _factor(want + 1, want) is None  # not a multiple of want
    slips = {1.5: "applied twice", 0.0: "left out"}
    assert _match_factor(1.5004, slips) == "applied twice"
    assert _match_factor(2.0, slips) is None and _match_factor(None, slips) is None


@pytest.mark.parametrize(
    ("out", "phrase"),
    [
        (None, "returned None"),
        ([0.0, 0.0], "returned a list; expected a torch.Tensor"),
        (torch.zeros(2, device="meta"), "returned a tensor on meta; expected cpu"),
        (torch.zeros(3), "returned shape (3,); expected (2,)"),
        (torch.zeros(2, dtype=torch.float64), "returned torch.float64; expected torch.float32"),
        (torch.tensor([1.0, float("nan")]), "inf or nan"),
    ],
)
def test_bad_tensor_names_what_is_wrong(out, phrase):
    feedback = _bad_tensor(out, "my_forward", torch.zeros(2))
    assert feedback is not None and not feedback.passed
    assert feedback.message.startswith("my_forward ") and phrase in feedback.message


def test_a_finite_tensor_of_the_right_kind_is_not_bad():
    assert _bad_tensor(torch.ones(2), "my_forward", torch.zeros(2)) is None


def test_as_number_unwraps_a_one_element_tensor_and_nothing_else():
    assert _as_number(torch.tensor(3.5)) == 3.5
    assert _as_number(torch.tensor([2])) == 2 and isinstance(_as_number(torch.tensor([2])), int)
    pair = torch.zeros(2)
    assert _as_number(pair) is pair and _as_number("2e-3") == "2e-3"
