"""Tests for lab/exercises/forward_check.py: exercise 1, each mistake named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
    forward_ok,
    no_args,
    returns_nan,
    stub,
)

from lab import exercises as ex


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (stub, "still the stub"),
        (lambda x, base, A, B, s, d: None, "returned None"),
        ("not a function", "should be a function"),
        (lambda x, base, A, B, s, d: [1.0], "returned a list"),
        (lambda x, base, A, B, s, d: base(x) + d(x) @ A.T @ B.T, "scaling is not applied"),
        (lambda x, base, A, B, s, d: base(x) + d(x) @ B @ A * s, "A (r, in) = (4, 16)"),
        (lambda x, base, A, B, s, d: base(x) + d(x) @ A @ B.T * s, "x @ A.T @ B.T"),
        (lambda x, base, A, B, s, d: d(x) @ A.T * s, "apply B too"),
        (lambda x, base, A, B, s, d: base(x) + s * 4 / 4**0.5 * d(x) @ A.T @ B.T, "rsLoRA"),
        (lambda x, base, A, B, s, d: base(x) + s * s * d(x) @ A.T @ B.T, "applied twice"),
        (lambda x, base, A, B, s, d: s * (d(x) @ A.T @ B.T), "only the low-rank update"),
        (lambda x, base, A, B, s, d: s * (base(x) + d(x) @ A.T @ B.T), "frozen path too"),
        (lambda x, base, A, B, s, d: base(x), "frozen layer's alone"),
    ],
)
def test_forward_names_the_mistake(answer, phrase):
    assert_not_yet(ex.check_forward(answer), phrase)


def test_forward_missing_scaling_is_named_not_just_failed():
    feedback = ex.check_forward(lambda x, base, A, B, s, d: base(x) + d(x) @ A.T @ B.T)
    assert feedback.message.endswith(
        "the scaling is not applied: multiply the low-rank path by `scaling`"
    )


def test_forward_dropout_at_eval_is_detected():
    # F.dropout's training flag defaults to True: a classic way to drop at evaluation.
    def answer(x, base, A, B, s, dropout):
        return base(x) + F.dropout(x, dropout.p) @ A.T @ B.T * s

    assert_not_yet(ex.check_forward(answer), "dropout is active at evaluation")


def test_forward_dropout_on_the_base_path_is_detected():
    def answer(x, base, A, B, s, dropout):
        h = dropout(x)
        return base(h) + h @ A.T @ B.T * s

    assert_not_yet(ex.check_forward(answer), "dropout reached the frozen path")


def test_forward_dropout_on_the_sum_is_detected():
    def answer(x, base, A, B, s, dropout):
        out = base(x) + x @ A.T @ B.T * s
        return out if not dropout.training else F.dropout(out, dropout.p)

    assert_not_yet(ex.check_forward(answer), "dropout reached the frozen path")


def test_forward_ignoring_or_misplacing_dropout_in_train_mode_is_detected():
    assert_not_yet(
        ex.check_forward(lambda x, base, A, B, s, d: base(x) + x @ A.T @ B.T * s),
        "ignores dropout",
    )
    assert_not_yet(
        ex.check_forward(lambda x, base, A, B, s, d: base(x) + d(x @ A.T) @ B.T * s),
        "dropout to x @ A.T",
    )


def test_forward_with_its_own_dropout_is_asked_to_use_the_module():
    def answer(x, base, A, B, s, dropout):
        return base(x) + F.dropout(x, dropout.p, dropout.training) @ A.T @ B.T * s

    assert_not_yet(ex.check_forward(answer), "call the `dropout` module")


def test_forward_changing_an_input_in_place_is_detected():
    def answer(x, base, A, B, s, dropout):
        with torch.no_grad():
            base.weight += s * B @ A
        return base(x)

    assert_not_yet(ex.check_forward(answer), "changed base.weight in place")


def test_forward_exception_in_student_code_is_feedback():
    def answer(x, base, A, B, s, dropout):
        return undefined_name  # noqa: F821

    assert_not_yet(ex.check_forward(answer), "raised NameError")


def forward_no_grad(x, base, A, B, s, d):
    with torch.no_grad():
        return forward_ok(x, base, A, B, s, d)


def forward_hard_coded(x, base, A, B, s, d):
    return base(x) + (d(x) @ A.T @ B.T) * 1.5  # exercise 1's scaling, not the argument


def forward_meta(x, base, A, B, s, d):
    return torch.empty(*x.shape[:-1], base.out_features, device="meta")


FORWARD_WRONG = [
    (lambda x, base, A, B, s, d: x @ base.weight.T + d(x) @ A.T @ B.T * s, "left out the bias"),
    (lambda x, base, A, B, s, d: base(x) + base.bias + d(x) @ A.T @ B.T * s, "bias is added twice"),
    (lambda x, base, A, B, s, d: x @ base.weight.T + d(x) @ A.T @ B.T, "scaling is not applied"),
    (lambda x, base, A, B, s, d: base(x) + d(x) @ A.T @ B.T, "scaling is not applied"),
    (lambda x, base, A, B, s, d: base(x) + s * s * d(x) @ A.T @ B.T, "applied twice"),
    (lambda x, base, A, B, s, d: base(x) + s / 4 * d(x) @ A.T @ B.T, "divided by the rank"),
    (lambda x, base, A, B, s, d: base(x) - s * d(x) @ A.T @ B.T, "wrong sign"),
    (lambda x, base, A, B, s, d: base(x) + s * d(x) @ A.T @ B.T * 4, "multiplied by the rank"),
    (lambda x, base, A, B, s, d: base(x) + s * 2 * d(x) @ A.T @ B.T, "rsLoRA"),
    (lambda x, base, A, B, s, d: base(x), "frozen layer's alone"),
    (lambda x, base, A, B, s, d: s * d(x) @ A.T @ B.T, "only the low-rank update"),
    (lambda x, base, A, B, s, d: base(x) + d(x) @ B.T @ A.T * s, "A (r, in) = (4, 16)"),
    (lambda x, base, A, B, s, d: base(x) + d(x @ A.T @ B.T) * s, "dropout to the update"),
    (lambda x, base, A, B, s, d: base(x) + d(x @ A.T) @ B.T * s, "dropout to x @ A.T"),
    (lambda x, base, A, B, s, d: base(d(x)) + d(x) @ A.T @ B.T * s, "dropout reached the frozen"),
    (forward_no_grad, "carries no gradient"),
    (lambda x, base, A, B, s, d: base(x) + (d(x) @ A.detach().T @ B.T) * s, "gradient reaching A"),
    (forward_hard_coded, "use its arguments"),
    (lambda x, base, A, B, s, d: base(x) + d(x) @ A.T @ B.T / s, "you divided by `scaling`"),
    (lambda x, base, A, B, s, d: x @ base.weight.T + d(x) @ A.T @ B.T / s, "divided by `scaling`"),
]


def forward_merged(x, base, A, B, s, d):  # the merged weight, built on every call
    return F.linear(x, base.weight + s * B @ A, base.bias)


def forward_outer(x, base, A, B, s, d):  # B A as a broadcast product, summed over r
    return base(x) + s * d(x) @ (B[:, :, None] * A[None]).sum(1).T


def forward_only_in_train(x, base, A, B, s, d):  # thin in eval mode, B A in train mode
    if d.training:
        return base(x) + s * d(x) @ (B @ A).T
    return base(x) + s * d(x) @ A.T @ B.T


BUILDS_DELTA = [
    lambda x, base, A, B, s, d: base(x) + s * d(x) @ (B @ A).T,
    lambda x, base, A, B, s, d: base(x) + s * d(x) @ (A.T @ B.T),
    lambda x, base, A, B, s, d: base(x) + s * torch.einsum("...i,oi->...o", d(x), B @ A),
    lambda x, base, A, B, s, d: base(x) + s * d(x) @ torch.einsum("or,ri->io", B, A),
    lambda x, base, A, B, s, d: base(x) + s * d(x) @ torch.mm(B, A).t(),
    lambda x, base, A, B, s, d: base(x) + s * F.linear(d(x), torch.matmul(B, A)),
    forward_merged,
    forward_outer,
    forward_only_in_train,
]


@pytest.mark.parametrize("answer", BUILDS_DELTA)
def test_forward_that_builds_b_a_is_told_it_must_not(answer):
    assert_not_yet(ex.check_forward(answer), "builds B @ A", "(12, 16)", "Two thin matmuls")


@pytest.mark.parametrize(
    "answer",
    [
        forward_ok,
        lambda x, base, A, B, s, d: base(x) + s * torch.einsum("...i,ri,or->...o", d(x), A, B),
        lambda x, base, A, B, s, d: base(x) + s * F.linear(F.linear(d(x), A), B),
        lambda x, base, A, B, s, d: base(x) + s * ((d(x) @ A.T) @ B.T),
        lambda x, base, A, B, s, d: base(x) + (s * d(x) @ A.T) @ B.T,
        lambda x, base, A, B, s, d: (
            base(x) + s * (d(x).reshape(-1, x.shape[-1]) @ A.T @ B.T).reshape(*x.shape[:-1], -1)
        ),
    ],
)
def test_forward_with_thin_matmuls_in_any_spelling_passes(answer):
    assert_passed(ex.check_forward(answer))


def test_forward_accepts_the_reference():
    assert_passed(ex.check_forward(forward_ok))


@pytest.mark.parametrize(("answer", "phrase"), FORWARD_WRONG)
def test_forward_wrong_answers_get_their_own_hint(answer, phrase):
    assert_not_yet(ex.check_forward(answer), phrase)


def test_forward_dropping_the_bias_is_not_told_about_the_scaling():
    feedback = ex.check_forward(
        lambda x, base, A, B, s, d: x @ base.weight.T + d(x) @ A.T @ B.T * s
    )
    assert_not_yet(feedback, "bias")
    assert "scaling" not in feedback.message


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (None, "should be a function, got NoneType"),
        ("base(x)", "should be a function, got str"),
        (no_args, "The check calls it as my_forward(x, base, A, B, scaling, dropout)"),
        (returns_nan, "returned a float"),
        (lambda *a: torch.full((2, 3, 12), float("nan")), "inf or nan"),
        (exits, "raised SystemExit"),
        (forward_meta, "on meta"),
        (lambda *a: torch.zeros(2, 3, 12, dtype=torch.float64), "torch.float64"),
        (lambda *a: torch.zeros(3, 12), "shape (3, 12)"),
    ],
)
def test_forward_bad_input_is_feedback(answer, phrase):
    assert_not_yet(ex.check_forward(answer), phrase)
