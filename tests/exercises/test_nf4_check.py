"""Tests for lab/exercises/nf4_check.py: exercise 7, each rounding mistake named."""

from __future__ import annotations

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
    no_args,
    stub,
)

import lab
from lab import exercises as ex
from lab.quant import FP4_LEVELS, dequantize_blockwise, quantize_blockwise

L = torch.tensor(lab.NF4_LEVELS)


def nearest(scaled, table=L):
    return (scaled[:, None] - table).abs().argmin(dim=1)


def quantize_ok(block):
    absmax = block.abs().max()
    return nearest(block / absmax), absmax


def dequantize_ok(codes, absmax):
    return L[codes] * absmax


def with_codes(make_codes, absmax=lambda b: b.abs().max()):
    """A quantize whose absmax is `absmax(block)` and codes `make_codes(block, absmax)`."""

    def quantize(block):
        a = absmax(block)
        return make_codes(block, a), a

    return quantize


def searchsorted_floor(b, a):
    return (torch.searchsorted(L, b / a, right=True) - 1).clamp(0, 15)


def count_floor(b, a):
    return (L[None, :] <= (b / a)[:, None]).sum(dim=1).clamp(1, 16) - 1


def ceil(b, a):
    return torch.searchsorted(L, b / a).clamp(0, 15)


def int4_round(b, a):
    return torch.round(b / a * 7).long() + 7  # uniform: code k means (k - 7) / 7


def scaled_nearest(b, a):
    return nearest(b / a)


def signed_absmax(b):
    return b[b.abs().argmax()]


UNIFORM = torch.linspace(-1, 1, 16)


FP4 = torch.tensor(FP4_LEVELS)


# (quantize, dequantize, phrases the hint must hold)
NF4_WRONG = [
    # no absmax scaling
    (with_codes(lambda b, a: nearest(b)), dequantize_ok, ["no absmax scaling", "w / absmax"]),
    (lambda b: (nearest(b), 1.0), dequantize_ok, ["absmax is 1", "per-block scale"]),
    (with_codes(lambda b, a: nearest(b * a)), dequantize_ok, ["multiplied by absmax"]),
    (quantize_ok, lambda c, a: L[c], ["no absmax scaling", "Multiply back by absmax"]),
    (quantize_ok, lambda c, a: L[c] / a, ["divided by absmax"]),
    # wrong code table
    (
        with_codes(int4_round),
        lambda c, a: (c - 7) / 7 * a,
        ["wrong code table", "uniform int4", "lab.NF4_LEVELS"],
    ),
    (
        with_codes(lambda b, a: nearest(b / a, UNIFORM)),
        lambda c, a: UNIFORM[c] * a,
        ["wrong code table", "linspace(-1, 1, 16)"],
    ),
    (
        with_codes(lambda b, a: nearest(b / a, FP4)),
        lambda c, a: FP4[c] * a,
        ["wrong code table", "FP4"],
    ),
    (quantize_ok, lambda c, a: FP4[c] * a, ["wrong code table", "decodes with FP4"]),
    (quantize_ok, lambda c, a: UNIFORM[c] * a, ["wrong code table", "evenly spaced"]),
    # rounding to the wrong neighbour
    (with_codes(searchsorted_floor), dequantize_ok, ["wrong neighbour", "below", "nearest level"]),
    (with_codes(count_floor), dequantize_ok, ["wrong neighbour", "(floor)"]),
    (with_codes(ceil), dequantize_ok, ["wrong neighbour", "above", "(ceil)"]),
    # forgetting the sign
    (with_codes(lambda b, a: nearest(b.abs() / a)), dequantize_ok, ["sign is lost", "|w|"]),
    (with_codes(scaled_nearest, signed_absmax), dequantize_ok, ["negative", "block.abs().max()"]),
    (with_codes(scaled_nearest, lambda b: b.max()), dequantize_ok, ["block.max()", "|w|"]),
    (with_codes(lambda b, a: nearest(-b / a)), dequantize_ok, ["sign is flipped"]),
    (quantize_ok, lambda c, a: L[c].abs() * a, ["sign is lost"]),
    (quantize_ok, lambda c, a: -L[c] * a, ["sign is flipped"]),
]


def test_nf4_accepts_the_reference_and_states_the_storage():
    feedback = ex.check_nf4(quantize_ok, dequantize_ok)
    assert_passed(feedback)
    assert "4.5 bits per weight" in feedback.message and "4.127" in feedback.message


def test_nf4_accepts_other_right_answers():
    def quantize_bucketize(block):  # midpoints as boundaries, uint8 codes, a float absmax
        absmax = float(block.abs().max())
        codes = torch.bucketize(block / absmax, (L[1:] + L[:-1]) / 2)
        return codes.to(torch.uint8), absmax

    assert_passed(ex.check_nf4(quantize_bucketize, lambda c, a: L[c.long()] * a))


def test_nf4_test_blocks_cover_what_the_hints_need():
    blocks = dict(ex._nf4_blocks())
    assert all(b.shape == (64,) and b.dtype == torch.float32 for b in blocks.values())
    assert any((b < 0).any() for b in blocks.values())
    negative = blocks["a block whose largest magnitude is negative (-3.0)"]
    assert negative[negative.abs().argmax()] == -3.0 and negative.max() < 3.0
    on = blocks["values exactly on the levels (times 0.5)"] / 0.5
    assert torch.isin(on, L).all() and torch.isin(L, on).all()
    # the near-midpoint values sit close to a boundary, on both sides of every one
    near = blocks["values near the midpoints between levels"] / 2.0
    gaps = (near[:, None] - (L[1:] + L[:-1]) / 2).abs().min(dim=0).values
    assert (gaps <= 0.005).all()


def test_nf4_blocks_agree_with_the_lab_whichever_way_nearest_is_computed():
    # No value sits on a boundary: argmin, bucketize and lab.quant give the same codes.
    for _, block in ex._nf4_blocks():
        codes, absmax = quantize_blockwise(block, "nf4", 64)
        assert torch.equal(nearest(block / absmax), codes.long())


@pytest.mark.parametrize(("quantize", "dequantize", "phrases"), NF4_WRONG)
def test_nf4_wrong_answers_get_their_own_hint(quantize, dequantize, phrases):
    assert_not_yet(ex.check_nf4(quantize, dequantize), *phrases)


def test_nf4_an_unknown_rounding_is_shown_where_it_differs():
    def off_by_one(b, a):
        codes = nearest(b / a)
        codes[3] = (codes[3] + 1) % 16
        return codes

    assert_not_yet(
        ex.check_nf4(with_codes(off_by_one), dequantize_ok),
        "1 of your 64 codes differ",
        "your code is",
        "the nearest NF4 level is",
    )


def quantize_uint8(block):
    codes, absmax = quantize_ok(block)
    return codes.to(torch.uint8), absmax


def quantize_in_place(block):
    absmax = block.abs().max().clone()
    block /= absmax
    return nearest(block), absmax


@pytest.mark.parametrize(
    ("quantize", "dequantize", "phrase"),
    [
        (stub, dequantize_ok, "my_quantize is still the stub"),
        (quantize_ok, stub, "my_dequantize is still the stub"),
        (None, dequantize_ok, "should be a function, got NoneType"),
        (quantize_ok, "L[codes]", "should be a function, got str"),
        (no_args, dequantize_ok, "The check calls it as my_quantize(block)"),
        (quantize_ok, no_args, "my_dequantize(codes, absmax)"),
        (exits, dequantize_ok, "raised SystemExit"),
        (lambda b: undefined_name, dequantize_ok, "raised NameError"),  # noqa: F821
        (lambda b: None, dequantize_ok, "(codes, absmax)"),
        (lambda b: quantize_ok(b)[0], dequantize_ok, "returned a Tensor"),
        (lambda b: (*quantize_ok(b), 0), dequantize_ok, "returned 3 values"),
        (lambda b: ([0] * 64, b.abs().max()), dequantize_ok, "got list"),
        (lambda b: (L[quantize_ok(b)[0]], b.abs().max()), dequantize_ok, "levels themselves"),
        (lambda b: (quantize_ok(b)[0].float(), b.abs().max()), dequantize_ok, "integer tensor"),
        (lambda b: (quantize_ok(b)[0] > 7, b.abs().max()), dequantize_ok, "torch.bool"),
        (lambda b: (quantize_ok(b)[0][None], b.abs().max()), dequantize_ok, "shape (1, 64)"),
        (lambda b: (quantize_ok(b)[0] - 7, b.abs().max()), dequantize_ok, "codes run from -7"),
        (lambda b: (quantize_ok(b)[0], b.abs()), dequantize_ok, "shape (64,)"),
        (lambda b: (quantize_ok(b)[0], float("nan")), dequantize_ok, "absmax is nan"),
        (lambda b: (quantize_ok(b)[0], "max"), dequantize_ok, "should be a number"),
        (quantize_in_place, dequantize_ok, "changed the block in place"),
        (quantize_ok, lambda c, a: None, "my_dequantize returned None"),
        (quantize_ok, lambda c, a: torch.full((64,), float("nan")), "inf or nan"),
        (quantize_ok, lambda c, a: (L[c] * a).double(), "torch.float64"),
        (quantize_ok, lambda c, a: (L[c] * a)[None], "shape (1, 64)"),
        (quantize_ok, lambda c, a: (L[c] * a).tolist(), "returned a list"),
        (quantize_ok, lambda c, a: c.mul_(0).float(), "changed codes or absmax in place"),
        (quantize_uint8, dequantize_ok, "codes.long()"),
    ],
)
def test_nf4_bad_answers_are_feedback(quantize, dequantize, phrase):
    assert_not_yet(ex.check_nf4(quantize, dequantize), phrase)


def test_nf4_round_trip_uses_what_my_quantize_returns():
    def quantize_float_absmax(block):
        codes, absmax = quantize_ok(block)
        return codes, float(absmax)

    def dequantize_tensor_only(codes, absmax):  # right on the lab's 0-d tensor absmax only
        return L[codes] * absmax if isinstance(absmax, torch.Tensor) else torch.zeros(64)

    feedback = ex.check_nf4(quantize_float_absmax, dequantize_tensor_only)
    assert_not_yet(feedback, "my_dequantize(*my_quantize(block)) differs", "round trip")


def test_nf4_keyboard_interrupt_goes_through():
    def answer(block):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.check_nf4(answer, dequantize_ok)


def test_nf4_round_trip_error_is_at_most_half_the_widest_gap():
    _, block = ex._nf4_blocks()[0]
    codes, absmax = quantize_blockwise(block, "nf4", 64)
    back = dequantize_blockwise(codes, absmax, "nf4", 64)
    assert float((back - block).abs().max() / absmax) <= float((L[1:] - L[:-1]).max()) / 2
