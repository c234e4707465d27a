"""Tests for lab/exercises/budget_check.py: exercise 4, the budget and the model."""

from __future__ import annotations

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
)
from torch import nn

import lab
from lab import exercises as ex
from lab.exercises import Feedback
from lab.sweeps import ALL_TARGETS


def lora_base(targets=("q_proj", "v_proj"), rank=4) -> lab.ToyTransformer:
    torch.manual_seed(0)
    model = lab.load_base_model("cpu")
    lab.add_lora(model, targets, rank=rank)
    return model


def test_budget_without_a_model_says_what_to_do():
    assert_not_yet(ex.check_budget(None), "no trained model yet", "4,096")
    assert_not_yet(ex.check_budget("model"), "expected the shipped base")


def test_budget_rejects_over_budget_targets():
    feedback = ex.check_budget(lora_base(rank=8))
    assert_not_yet(feedback, "adapters hold 8,192 values, over the budget of 4,096")


def test_budget_rejects_an_adapter_outside_the_projections():
    model = lab.load_base_model("cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    model.head = lab.LoRALinear(model.head, rank=2, alpha=4)  # the tied output head
    assert_not_yet(ex.check_budget(model), "['head'] are not LoRA targets here")


def test_budget_rejects_full_fine_tuning_and_unfrozen_tensors():
    assert_not_yet(ex.check_budget(lab.load_base_model("cpu")), "no LoRA layers")
    model = lora_base(rank=2)
    model.ln_f.weight.requires_grad_(True)
    assert_not_yet(ex.check_budget(model), "outside the adapters train (ln_f.weight)")


def test_budget_rejects_a_changed_base_and_merged_adapters():
    model = lora_base()
    with torch.no_grad():
        model.blocks[0].attn.k_proj.weight.add_(0.01)
    assert_not_yet(ex.check_budget(model), "blocks.0.attn.k_proj.weight differs")
    model = lora_base()
    lab.merge_lora(model)
    assert_not_yet(ex.check_budget(model), "unmerge_lora")


def test_budget_rejects_low_accuracy_and_accepts_enough(monkeypatch):
    model = lora_base()  # untrained: B = 0, the base knows nothing of rotate
    assert_not_yet(ex.check_budget(model), "below 0.90")
    monkeypatch.setattr(lab.Task, "evaluate", lambda self, model: {"accuracy": 0.95})
    feedback = ex.check_budget(model)
    assert feedback.passed, feedback
    assert "rank 4 on q_proj, v_proj: 4,096 adapter parameters" in feedback.message


def lora_model(targets=("q_proj", "v_proj"), rank=4, **kwargs):
    torch.manual_seed(0)
    model = lab.load_base_model("cpu")
    lab.add_lora(model, targets, rank=rank, **kwargs)
    return model


def freeze_a(model):
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    return model


def with_extra_parameter(model):
    model.blocks[0].extra = nn.Parameter(torch.zeros(3), requires_grad=False)
    return model


def with_replaced_forward(model):
    model.forward = lambda idx: torch.zeros(*idx.shape, 64)
    return model


def with_module_swapped(model):
    model.blocks[1].mlp = nn.Identity()
    return model


def with_changed_ln(model):
    with torch.no_grad():
        model.ln_f.weight.add_(0.1)  # a frozen parameter changed: the base is not the shipped one
    return model


def in_bfloat16(model):
    return model.to(torch.bfloat16)


def merged(model):
    lab.merge_lora(model)
    return model


def lying_rank(model):
    for layer in lab.lora_layers(model).values():
        layer.rank = 1
    return model


def head_adapter(_):
    model = lab.load_base_model("cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    model.head = lab.LoRALinear(model.head, rank=2, alpha=4)
    return model


BUDGET_WRONG = [
    (
        lambda: freeze_a(lora_model(rank=8)),
        "8,192 values",
        "Freezing lora_A does not make it cheaper",
    ),
    (lambda: lora_model(rank=8), "adapters hold 8,192 values, over the budget of 4,096"),
    (lambda: lying_rank(lora_model(rank=8)), "8,192 values"),
    (lambda: lora_model(("q_proj", "k_proj", "v_proj", "o_proj"), rank=4), "8,192 values"),
    (lambda: lora_model(("up_proj",), rank=8), "10,240 values"),
    (lambda: with_extra_parameter(lora_model()), "blocks.0.extra", "the shipped base lacks"),
    (lambda: with_replaced_forward(lora_model()), "forward replaced"),
    (lambda: with_module_swapped(lora_model()), "blocks.1.mlp is a Identity"),
    (lambda: with_changed_ln(lora_model()), "ln_f.weight differs from the shipped base"),
    (lambda: in_bfloat16(lora_model()), "differs from the shipped base"),
    (lambda: merged(lora_model()), "unmerge_lora"),
    (lambda: head_adapter(None), "['head'] are not LoRA targets"),
    (lambda: lab.load_base_model("cpu"), "no LoRA layers"),
    (lambda: lab.ToyTransformer(lab.get_preset("tiny")), "expected the shipped base"),
    (lambda: lora_model(), "below 0.90"),  # untrained: B = 0
]


@pytest.mark.parametrize(("make", *["phrases"]), [(m, p) for m, *p in BUDGET_WRONG])
def test_budget_wrong_answers_get_their_own_hint(make, phrases):
    assert_not_yet(ex.check_budget(make()), *phrases)


def test_budget_accepts_a_right_answer(monkeypatch):
    monkeypatch.setattr(lab.Task, "evaluate", lambda self, model: {"accuracy": 0.95})
    assert_passed(ex.check_budget(lora_model()))


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (None, "no trained model yet"),
        ("model", "expected the shipped base"),
        (nn.Linear(2, 2), "got Linear"),
        (exits, "got function"),
    ],
)
def test_budget_bad_input_is_feedback(answer, phrase):
    assert_not_yet(ex.check_budget(answer), phrase)


def test_budget_a_passing_feedback_made_by_hand_is_no_model():
    forged = Feedback(True, "rank 4 on q_proj, v_proj: 4,096 adapter parameters")
    assert_not_yet(ex.check_budget(forged), "wants the trained model")


def test_budget_a_model_whose_forward_exits_is_feedback(monkeypatch):
    model = lora_model()
    monkeypatch.setattr(lab.Task, "evaluate", exits)
    assert_not_yet(ex.check_budget(model), "could not be checked", "SystemExit")


def test_train_budget_accepts_short_names_and_trains():
    model = ex.train_budget(("q", "v"), 4, steps=2)
    assert isinstance(model, lab.ToyTransformer)
    assert sorted({n.rpartition(".")[2] for n in lab.lora_layers(model)}) == ["q_proj", "v_proj"]
    model = ex.train_budget("q, v_proj", 2, steps=1)  # a string of names, not its letters
    assert len(lab.lora_layers(model)) == 4


@pytest.mark.parametrize(
    ("targets", "rank", "steps", "phrase"),
    [
        (("q", "head"), 4, 10, "['head'] are not LoRA targets here"),
        (("query",), 4, 10, "choose among q_proj (q), k_proj (k)"),
        (42, 4, 10, "TARGETS should be a tuple of names"),
        ((), 4, 10, "TARGETS is empty"),
        (("q", "v"), 0, 10, "RANK should be a whole number"),
        (("q", "v"), 2.5, 10, "RANK should be a whole number"),
        (("q", "v"), True, 10, "RANK should be a whole number"),
        (("q", "v"), 500, 10, "from 1 to 128"),
        (("q", "v"), 4, 1000, "STEPS should be a whole number from 1 to 300"),
        (("q", "v"), 4, "150", "STEPS should be"),
        (("q", "v"), 8, 10, "costs 8,192 parameters, over the budget of 4,096 (not trained)"),
    ],
)
def test_train_budget_bad_choices_are_feedback_not_training(targets, rank, steps, phrase):
    feedback = ex.train_budget(targets, rank, steps)
    assert_not_yet(feedback, phrase)
    assert ex.check_budget(feedback) is feedback  # the check shows the same words


def test_train_budget_offers_only_valid_targets():
    feedback = ex.train_budget(("q", "head"), 4)
    offered = feedback.message.split("choose among ")[1]
    assert "head" not in offered
    for target in ALL_TARGETS:
        assert target in offered


def test_train_budget_before_a_choice_is_none():
    assert ex.train_budget((), 0) is None
    assert_not_yet(ex.check_budget(ex.train_budget((), 0)), "no trained model yet")
