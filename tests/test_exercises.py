"""lab.exercises: every checker accepts the reference answer and names the usual mistakes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lab
from lab import exercises as ex
from lab.exercises import Feedback

# ----------------------------------------------------------------------------- reference answers


def forward_ok(x, base, A, B, scaling, dropout):
    return base(x) + (dropout(x) @ A.T @ B.T) * scaling


@torch.no_grad()
def merge_ok(layer):
    if layer.merged:
        return
    w = layer.base.weight
    w.copy_((w.float() + layer.scaling * layer.lora_B @ layer.lora_A).to(w.dtype))
    layer.merged = True


def count_ok(config, targets, rank):
    d, f = config.d_model, config.d_ff
    dims = {"up_proj": d + f, "down_proj": f + d}
    return config.n_layers * sum(rank * dims.get(t, 2 * d) for t in targets)


def assert_not_yet(feedback: Feedback, *phrases: str) -> None:
    assert isinstance(feedback, Feedback) and not feedback.passed, feedback
    assert str(feedback).startswith("not yet: ")
    for phrase in phrases:
        assert phrase in feedback.message, feedback.message


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- Feedback


def test_feedback_shows_its_verdict_and_message():
    assert repr(Feedback(True, "ok")) == str(Feedback(True, "ok")) == "passed: ok"
    assert str(Feedback(False, "fix it")) == "not yet: fix it"


# ----------------------------------------------------------------------------- exercise 1


def test_forward_accepts_the_reference():
    feedback = ex.check_forward(forward_ok)
    assert feedback.passed, feedback
    assert str(feedback).startswith("passed: ")


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


# ----------------------------------------------------------------------------- exercise 2


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


# ----------------------------------------------------------------------------- exercise 3


def test_count_accepts_the_reference_and_shows_the_paper_count():
    feedback = ex.check_count(count_ok)
    assert feedback.passed, feedback
    assert "4,718,592" in feedback.message  # GPT-3 175B, q and v at rank 1: the paper's 4.7M


def base_size(c):
    """The frozen model's parameters, by hand: embeddings, blocks, final LayerNorm (head tied)."""
    d, f = c.d_model, c.d_ff
    biases = (4 * d + f + d) if c.bias else 0
    block = 4 * d * d + 2 * d * f + 4 * d + biases  # linears, two LayerNorms (weight, bias)
    return c.vocab_size * d + c.max_seq_len * d + c.n_layers * block + 2 * d


def total_params(config, targets, rank):
    return base_size(config) + count_ok(config, targets, rank)


def with_biases(config, targets, rank):
    d, f = config.d_model, config.d_ff
    out = {"up_proj": f}
    return count_ok(config, targets, rank) + config.n_layers * sum(out.get(t, d) for t in targets)


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (total_params, "the frozen base does not train"),
        (with_biases, "one bias per output"),
        (lambda c, t, r: count_ok(c, t, r) // c.n_layers, "one block's worth"),
        (lambda c, t, r: c.n_layers * len(t) * r * c.d_model**2, "r * (in + out)"),
        (
            lambda c, t, r: c.n_layers * len(t) * r * 2 * c.d_model,
            "up_proj is d_model -> d_ff, down_proj d_ff",
        ),
        (lambda c, t, r: None, "returned None"),
        (lambda c, t, r: "8192", "expected an int"),
        (lambda c, t, r: 0.5, "whole number"),
        (stub, "still the stub"),
    ],
)
def test_count_names_the_mistake(answer, phrase):
    assert_not_yet(ex.check_count(answer), phrase)


def test_the_base_size_by_hand_is_the_labs():
    for preset in ("tiny", "cpu", "gpt3-175b"):
        config = lab.get_preset(preset, bias=preset == "tiny")
        with torch.device("meta"):
            model = lab.ToyTransformer(config)
        assert base_size(config) == lab.count_parameters(model).total, preset


def test_count_names_the_case_and_the_answer_but_never_the_expected_count(monkeypatch):
    from lab.exercises import core

    case = (lab.get_preset("cpu"), ("q_proj", "v_proj"), 8)  # the lab counts 8,192
    monkeypatch.setattr(core, "_count_cases", lambda: [case])
    feedback = ex.check_count(lambda c, t, r: 2 * count_ok(c, t, r))
    assert_not_yet(feedback, "for cpu, targets q_proj, v_proj, rank 8: you count 16,384, more")
    assert "8,192" not in feedback.message


def test_count_cases_are_new_every_check():
    """No table of answers can pass: the cases are drawn afresh, from the system's entropy."""
    from lab.exercises import core

    draws = [tuple(core._count_cases()[:-1]) for _ in range(20)]
    assert len(set(draws)) == 20
    for cases in draws:
        configs = [c for c, _, _ in cases]
        assert any(c.bias for c in configs) and not all(c.bias for c in configs)
        assert any({"up_proj", "down_proj"} & set(t) for _, t, _ in cases)
        for config, targets, rank in cases:
            core._lab_count(config, targets, rank)  # the lab accepts every case (rank fits)


# ----------------------------------------------------------------------------- exercise 4


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


# ----------------------------------------------------------------------------- exercise 5


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


# ----------------------------------------------------------------------------- exercise 6

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
