"""Tests for lab/exercises/dora_check.py: exercise 8, each mistake named."""

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

from lab import exercises as ex


def dora_ok(x, W, A, B, m, scaling):
    V = W + scaling * B @ A
    return m / V.norm(dim=1) * (x @ W.T + scaling * (x @ A.T @ B.T))


def dora_merged_form(x, W, A, B, m, scaling):
    V = W + scaling * B @ A
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T


def dora_detached_norm(x, W, A, B, m, scaling):  # as the paper and the lab do
    V = W + scaling * B @ A
    return m / V.norm(dim=1).detach() * (x @ W.T + scaling * (x @ A.T @ B.T))


def dora(norm_of, path_scale=None, mag=True):
    """A DoRA forward with the norm of `norm_of(W, A, B, s)` (rows) and the update scaled by
    `path_scale(s)`; mag=False leaves m out."""

    def forward(x, W, A, B, m, s):
        k = s if path_scale is None else path_scale(s)
        n = norm_of(W, A, B, s)
        return (m if mag else 1) / n * (x @ W.T + k * (x @ A.T @ B.T))

    return forward


def dora_merged(weight):
    """A DoRA forward through the merged weight `weight(W + ΔW, m)`."""

    def forward(x, W, A, B, m, s):
        return x @ weight(W + s * B @ A, m).T

    return forward


def rows(W, A, B, s):
    return (W + s * B @ A).norm(dim=1)


DORA_WRONG = [
    # norm over the wrong axis
    (dora(lambda W, A, B, s: (W + s * B @ A).norm(dim=0)), ["wrong axis", "norm(dim=1)"]),
    (dora_merged(lambda V, m: m[:, None] * V / V.norm(dim=0)), ["wrong axis", "per output row"]),
    (dora_merged(lambda V, m: m * V / V.norm(dim=1)), ["input columns", "[:, None]"]),
    (dora_merged(lambda V, m: m * V / V.norm(dim=1)[:, None]), ["m scales the input columns"]),
    (dora(lambda W, A, B, s: (W + s * B @ A).norm()), ["whole matrix", "per output row"]),
    # magnitude not applied
    (dora(rows, mag=False), ["magnitude is not applied", "by m"]),
    (lambda x, W, A, B, m, s: x @ W.T + s * (x @ A.T @ B.T), ["plain LoRA"]),
    (lambda x, W, A, B, m, s: m * (x @ W.T + s * (x @ A.T @ B.T)), ["did not divide"]),
    # norm of W instead of W + ΔW
    (dora(lambda W, A, B, s: W.norm(dim=1)), ["norm of W", "||W + ΔW||"]),
    # scaling missing or applied twice
    (dora(lambda W, A, B, s: rows(W, A, B, 1), lambda s: 1), ["scaling is not applied"]),
    (
        dora(lambda W, A, B, s: rows(W, A, B, s * s), lambda s: s * s),
        ["applied twice, in the norm and in the update"],
    ),
    (dora(rows, lambda s: 1), ["scaling is missing from the update"]),
    (dora(lambda W, A, B, s: rows(W, A, B, 1)), ["scaling is missing from the norm"]),
    (dora(rows, lambda s: s * s), ["applied twice in the update"]),
    (dora(lambda W, A, B, s: rows(W, A, B, s * s)), ["applied twice in the norm"]),
    (dora(rows, lambda s: 0), ["low-rank update is missing"]),
    # gradients and fixed numbers
    (
        lambda x, W, A, B, m, s: dora_ok(x, W, A, B, m.detach(), s),
        ["gradient reaching m"],
    ),
    (lambda x, W, A, B, m, s: dora_ok(x, W, A.detach(), B, m, s), ["no gradient reaches A"]),
    (
        lambda x, W, A, B, m, s: dora_ok(x.detach(), W, A.detach(), B.detach(), m.detach(), s),
        ["carries no gradient"],
    ),
    (lambda x, W, A, B, m, s: dora_ok(x, W, A, B, m, 1.5), ["right for the first layer"]),
]


@pytest.mark.parametrize("answer", [dora_ok, dora_merged_form, dora_detached_norm])
def test_dora_forward_accepts_right_answers(answer):
    assert_passed(ex.check_dora_forward(answer))


def test_dora_case_makes_every_part_matter():
    layer, x = ex._dora_case()
    W, A, B, m = layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude
    assert layer.base.bias is None and B.abs().min() > 0
    folded = (W + layer.scaling * B @ A).norm(dim=1)
    assert ((m / folded - 1).abs() > 0.2).all()  # else DoRA would be LoRA on those rows
    assert ((m - W.norm(dim=1)).norm() / m.norm()) > 0.2
    assert layer.scaling not in (0.0, 1.0)
    with torch.no_grad():
        assert torch.allclose(layer(x), dora_ok(x, W, A, B, m, layer.scaling), atol=1e-5)


def test_dora_mistakes_are_told_apart_on_the_first_case():
    # each hint's output differs from the reference and from every other hint's
    layer, x = ex._dora_case()
    with torch.no_grad():
        ref = layer(x)
        mistakes = ex._dora_mistakes(
            x, layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling
        )
    outputs = [y for _, y in mistakes]
    assert not any(ex._close(y, ref) for y in outputs)
    for i, a in enumerate(outputs):
        assert not any(ex._close(a, b) for b in outputs[i + 1 :]), mistakes[i][0]


@pytest.mark.parametrize(("answer", "phrases"), DORA_WRONG)
def test_dora_forward_wrong_answers_get_their_own_hint(answer, phrases):
    assert_not_yet(ex.check_dora_forward(answer), *phrases)


def dora_in_place(x, W, A, B, m, s):
    with torch.no_grad():
        W += s * B @ A
    return m / W.norm(dim=1) * (x @ W.T)


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (stub, "still the stub"),
        (None, "should be a function, got NoneType"),
        (no_args, "The check calls it as my_dora_forward(x, W, A, B, m, scaling)"),
        (exits, "raised SystemExit"),
        (lambda *a: None, "returned None"),
        (lambda *a: 1.0, "returned a float"),
        (lambda *a: torch.zeros(3, 12), "shape (3, 12)"),
        (lambda *a: torch.zeros(2, 3, 12, dtype=torch.float64), "torch.float64"),
        (lambda *a: torch.full((2, 3, 12), float("nan")), "inf or nan"),
        (lambda x, W, A, B, m, s: m / (W + s * A @ B).norm(dim=1) * (x @ W.T), "B (out, r)"),
        (dora_in_place, "changed W in place"),
    ],
)
def test_dora_forward_bad_input_is_feedback(answer, phrase):
    assert_not_yet(ex.check_dora_forward(answer), phrase)


def test_dora_forward_wrong_axis_on_a_non_square_layer_names_the_shapes():
    # On the second layer (10 -> 6) norm(dim=0) cannot even broadcast: the shapes are named.
    def answer(x, W, A, B, m, s):
        if W.shape[0] == W.shape[1]:
            return dora_ok(x, W, A, B, m, s)
        return m / (W + s * B @ A).norm(dim=0) * (x @ W.T + s * (x @ A.T @ B.T))

    assert_not_yet(ex.check_dora_forward(answer), "on a second layer", "norm(dim=1)")


def test_new_checkers_are_exported_and_counted():
    import inspect

    checks = [n for n, f in inspect.getmembers(ex, inspect.isfunction) if n.startswith("check_")]
    assert {"check_nf4", "check_dora_forward"} <= set(checks) and len(checks) >= 8
    assert {"check_nf4", "check_dora_forward"} <= set(ex.__all__)


def test_dora_check_leaves_torch_seed_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ex.check_dora_forward(dora_ok)
    assert torch.equal(torch.rand(3), expected)  # a notebook's later random draws are unchanged
