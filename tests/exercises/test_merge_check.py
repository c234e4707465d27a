"""Tests for lab/exercises/merge_check.py: exercise 2, each mistake named."""

from __future__ import annotations

import math

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
    no_args,
    stub,
)
from torch import nn

from lab import exercises as ex


@torch.no_grad()
def merge_ok(layer):
    if layer.merged:
        return
    w = layer.base.weight
    w.copy_((w.float() + layer.scaling * layer.lora_B @ layer.lora_A).to(w.dtype))
    layer.merged = True


def test_merge_accepts_the_reference_and_explains_bf16_unmerge():
    feedback = ex.check_merge(merge_ok)
    assert feedback.passed, feedback
    assert "comes back to within 2e-07 in float32" in feedback.message
    assert "only to within 0.008 in bfloat16" in feedback.message
    assert "almost exactly" not in feedback.message


@torch.no_grad()
def merge_no_cast(layer):
    if layer.merged:
        return
    layer.base.weight.data = layer.base.weight.float() + layer.scaling * layer.lora_B @ layer.lora_A
    layer.merged = True


@torch.no_grad()
def merge_in_bf16(layer):
    if not layer.merged:
        layer.base.weight += layer.delta_weight()  # delta_weight is already in W's dtype
        layer.merged = True


@torch.no_grad()
def merge_every_time(layer):
    layer.base.weight += layer.scaling * layer.lora_B @ layer.lora_A
    layer.merged = True


@torch.no_grad()
def merge_without_flag(layer):
    layer.base.weight += layer.scaling * layer.lora_B @ layer.lora_A


@torch.no_grad()
def merge_new_parameter(layer):
    w = layer.base.weight
    layer.base.weight = nn.Parameter((w.float() + layer.delta_weight().float()).to(w.dtype))
    layer.merged = True


@torch.no_grad()
def merge_unscaled(layer):
    layer.base.weight += layer.lora_B @ layer.lora_A
    layer.merged = True


def merge_returning(layer):
    return layer.base.weight + layer.delta_weight()


def merge_breaking_the_layer(layer):
    layer.base = None


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (stub, "still the stub"),
        (merge_no_cast, "cast the merged weight back"),
        (merge_in_bf16, "rounded twice"),
        (merge_every_time, "ΔW is now in it twice"),
        (merge_without_flag, "layer.merged is still False"),
        (merge_new_parameter, "requires grad"),
        (merge_unscaled, "scaling is not applied"),
        (merge_returning, "left layer.base.weight as it was"),
        (merge_breaking_the_layer, "replaced layer.base"),
    ],
)
def test_merge_names_the_mistake(answer, phrase):
    assert_not_yet(ex.check_merge(answer), phrase)


def test_merge_without_no_grad_is_feedback_not_an_exception():
    def answer(layer):
        layer.base.weight += layer.scaling * layer.lora_B @ layer.lora_A
        layer.merged = True

    feedback = ex.check_merge(answer)
    assert not feedback.passed and "no_grad" in feedback.message, feedback


def merge_then(extra):
    """merge_ok followed by `extra(layer)`, the first time only."""

    @torch.no_grad()
    def answer(layer):
        if layer.merged:
            return
        merge_ok(layer)
        extra(layer)

    return answer


def merge_factor(k):
    @torch.no_grad()
    def answer(layer):
        if not layer.merged:
            w = layer.base.weight
            w.copy_((w.float() + k * layer.scaling * layer.lora_B @ layer.lora_A).to(w.dtype))
            layer.merged = True

    return answer


@torch.no_grad()
def merge_transposed(layer):
    if not layer.merged:
        layer.base.weight += layer.scaling * layer.lora_A.T @ layer.lora_B.T
        layer.merged = True


@torch.no_grad()
def merge_zeroes_b_when_merged(layer):
    if layer.merged:
        layer.lora_B.zero_()
        return
    merge_ok(layer)


def merge_calls_the_lab(layer):
    layer.merge()


@torch.no_grad()
def merge_new_linear(layer):
    w = (layer.base.weight.float() + layer.scaling * layer.lora_B @ layer.lora_A).to(
        layer.base.weight.dtype
    )
    base = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.dtype).requires_grad_(False)
    base.weight.copy_(w)
    layer.base = base
    layer.merged = True


def set_scaling(value):
    def extra(layer):
        layer.scaling = value

    return extra


MERGE_WRONG = [
    (merge_then(lambda layer: layer.lora_B.zero_()), "changed layer.lora_B"),
    (merge_then(lambda layer: layer.lora_A.mul_(2)), "changed layer.lora_A"),
    (
        merge_then(lambda layer: setattr(layer, "lora_B", nn.Parameter(layer.lora_B[:, :2]))),
        "replaced",
    ),
    (merge_then(set_scaling(0.0)), "changed layer.scaling"),
    (merge_zeroes_b_when_merged, "on an already merged layer"),
    (merge_factor(2.0), "added twice"),
    (merge_factor(-1.0), "that is unmerge"),
    (merge_factor(1 / ex.SCALING), "scaling is not applied"),
    (merge_factor(ex.SCALING), "scaling is applied twice"),
    (merge_factor(1 / ex.RANK), "divided by the rank again"),
    (merge_factor(1 / ex.SCALING**2), "you divided by `scaling`"),
    (merge_factor(float(ex.RANK)), "multiplied by the rank", "alpha, not alpha / r"),
    (merge_factor(math.sqrt(ex.RANK)), "added twice", "rsLoRA"),  # sqrt(4) = 2: both named
    (merge_factor(0.5), "is it W + scaling * B @ A?"),
    (merge_transposed, "W is (out, in) = (12, 16)"),
    (merge_calls_the_lab, "called the lab's layer.merge()"),
    (merge_new_linear, "replaced layer.base"),
]


def test_merge_accepts_the_reference_and_states_the_restore_error():
    feedback = ex.check_merge(merge_ok)
    assert_passed(feedback)
    assert "within 2e-07 in float32" in feedback.message
    assert "within 0.008 in bfloat16" in feedback.message


@pytest.mark.parametrize(("answer", *["phrases"]), [(a, p) for a, *p in MERGE_WRONG])
def test_merge_wrong_answers_get_their_own_hint(answer, phrases):
    assert_not_yet(ex.check_merge(answer), *phrases)


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (None, "should be a function"),
        (42, "should be a function, got int"),
        (no_args, "The check calls it as my_merge(layer)"),
        (exits, "raised SystemExit"),
        (lambda layer: setattr(layer.base, "weight", None), "no longer a weight"),
        (lambda layer: 1 / 0, "ZeroDivisionError"),
    ],
)
def test_merge_bad_input_is_feedback(answer, phrase):
    assert_not_yet(ex.check_merge(answer), phrase)
