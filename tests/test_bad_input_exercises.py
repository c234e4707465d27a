"""Every checker against a table of typical wrong answers and hostile input: never a traceback.

Each wrong answer must get "not yet" and the hint for its own mistake; the right answer "passed".
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from test_exercises import base_size, merge_ok  # written once
from torch import nn

import lab
from lab import exercises as ex
from lab.exercises import Feedback
from lab.sweeps import ALL_TARGETS


def assert_not_yet(feedback: object, *phrases: str) -> None:
    assert isinstance(feedback, Feedback), feedback
    assert not feedback.passed and str(feedback).startswith("not yet: "), feedback
    for phrase in phrases:
        assert phrase in feedback.message, feedback.message


def assert_passed(feedback: object) -> None:
    assert isinstance(feedback, Feedback) and feedback.passed, feedback
    assert str(feedback).startswith("passed: ")


def exits(*args):
    sys.exit(0)


def returns_nan(*args):
    return float("nan")


def no_args():
    return 1


# ----------------------------------------------------------------------------- exercise 1


def forward_ok(x, base, A, B, s, d):
    return base(x) + (d(x) @ A.T @ B.T) * s


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


# ----------------------------------------------------------------------------- exercise 2


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


# ----------------------------------------------------------------------------- exercise 3


def count_ok(config, targets, rank):
    d, f = config.d_model, config.d_ff
    dims = {"up_proj": d + f, "down_proj": f + d}
    return config.n_layers * sum(rank * dims.get(t, 2 * d) for t in targets)


def dims(config, t):
    d, f = config.d_model, config.d_ff
    return {"up_proj": (d, f), "down_proj": (f, d)}.get(t, (d, d))


def only_a(c, targets, r):
    return c.n_layers * sum(r * dims(c, t)[0] for t in targets)


def only_b(c, targets, r):
    return c.n_layers * sum(r * dims(c, t)[1] for t in targets)


def dense(c, targets, r):
    return c.n_layers * sum(r * dims(c, t)[0] * dims(c, t)[1] for t in targets)


def target_weights(c, targets, r):
    return c.n_layers * sum(dims(c, t)[0] * dims(c, t)[1] for t in targets)


def no_rank(c, targets, r):
    return count_ok(c, targets, 1)


def every_param(c, targets, r):
    return base_size(c) + count_ok(c, targets, r)


def base_only(c, targets, r):
    return base_size(c)


def builds_a_model(c, targets, r):  # the lab's own count: not by hand
    with torch.device("meta"):
        model = lab.ToyTransformer(c)
    lab.add_lora(model, targets, rank=r)
    return lab.count_parameters(model).trainable


def four_times_d(c, targets, r):  # d_ff assumed to be 4 x d_model
    d = c.d_model
    dims = {"up_proj": 5 * d, "down_proj": 5 * d}
    return c.n_layers * sum(r * dims.get(t, 2 * d) for t in targets)


PAPER_TABLE = {8: 8192, 4: 10240, 2: 4096, 3: 672, 1: 4718592}  # the old fixed cases' answers
SEEN: dict = {}


def remembers(c, targets, r):  # a table filled from what earlier checks printed
    return SEEN.get((c, targets, r), count_ok(c, targets, r) + 1)


def with_biases(c, targets, r):
    return count_ok(c, targets, r) + c.n_layers * sum(dims(c, t)[1] for t in targets)


COUNT_WRONG = [
    (only_a, "counts only A"),
    (only_b, "counts only B"),
    (lambda c, t, r: count_ok(c, t, r) // c.n_layers, "one block's worth"),
    (every_param, "counts every parameter"),
    (base_only, "frozen base's size"),
    (with_biases, "one bias per output"),
    (dense, "not r * in * out"),
    (target_weights, "size of the target weights"),
    (no_rank, "the rank is missing"),
    (lambda c, t, r: c.n_layers * len(t) * r * 2 * c.d_model, "up_proj is d_model -> d_ff"),
    (lambda c, t, r: 2 * count_ok(c, t, r), "counted twice"),
    (lambda c, t, r: count_ok(c, t, r) + 1, "each adapted layer has A (r x in)"),
    (builds_a_model, "builds a model", "count by hand"),
    (four_times_d, "not 4 x d_model"),
    (lambda c, t, r: PAPER_TABLE.get(r, 0), "each adapted layer has A (r x in)"),
    (lambda c, t, r: PAPER_TABLE[r], "KeyError"),
    (lambda c, t, r: 4_718_592, "you count 4,718,592"),
    (lambda c, t, r: 0, "you count 0, fewer than the lab counts"),
    (remembers, "more than the lab counts"),
    (lambda c, t, r: count_ok(c, t, r) if c.d_model == 128 else 0, "fewer"),
    (lambda c, t, r: count_ok(c, t, r) * (2 if c.bias else 1), "more than the lab"),
]


def test_count_accepts_the_reference():
    assert_passed(ex.check_count(count_ok))


@pytest.mark.parametrize(("answer", *["phrases"]), [(a, p) for a, *p in COUNT_WRONG])
def test_count_wrong_answers_get_their_own_hint(answer, phrases):
    assert_not_yet(ex.check_count(answer), *phrases)


def test_count_only_a_is_not_told_one_layer(monkeypatch):
    # On q, v at rank 8 of the cpu preset A alone is 4,096: the same as one block's worth.
    from lab.exercises import core

    monkeypatch.setattr(
        core, "_count_cases", lambda: [(lab.get_preset("cpu"), ("q_proj", "v_proj"), 8)]
    )
    feedback = ex.check_count(only_a)
    assert_not_yet(feedback, "you count 4,096, fewer than the lab counts", "counts only A")
    assert "block" not in feedback.message and "layer's worth" not in feedback.message


def test_count_a_lookup_table_of_any_earlier_cases_does_not_pass():
    assert_not_yet(ex.check_count(lambda c, t, r: PAPER_TABLE.get(r, 0)))
    # Even a table of every case the check has ever drawn: the next check draws others.
    from lab.exercises import core

    for _ in range(5):
        for case in core._count_cases():
            SEEN[case] = count_ok(*case)
    assert_not_yet(ex.check_count(lambda c, t, r: SEEN.get((c, t, r), 0)), "fewer than the lab")


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (None, "should be a function"),
        (lambda c, t, r: None, "returned None"),
        (lambda c, t, r: "8192", "returned a str"),
        (lambda c, t, r: True, "returned a bool"),
        (returns_nan, "whole number"),
        (lambda c, t, r: float("inf"), "whole number"),
        (lambda c, t, r: torch.ones(2), "returned a Tensor"),
        (lambda c, t, r: torch.tensor(float("nan")), "whole number"),
        (lambda c, t, r: 1e30, "you count"),
        (lambda c, t, r: -count_ok(c, t, r), "fewer than the lab counts"),
        (lambda c, t, r: 1 + 2j, "returned a complex"),
        (lambda c, t, r: object.__setattr__(c, "d_model", 1) or 5, "changed the config"),
        (no_args, "The check calls it as my_count(config, targets, rank)"),
        (exits, "raised SystemExit"),
    ],
)
def test_count_bad_input_is_feedback(answer, phrase):
    assert_not_yet(ex.check_count(answer), phrase)


# ----------------------------------------------------------------------------- exercise 4


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


# ----------------------------------------------------------------------------- exercise 5


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


# ----------------------------------------------------------------------------- exercise 6

N_FULL, N_LORA = 406_784, 8_192
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


# ----------------------------------------------------------------------------- Feedback


def test_feedback_html_wraps_between_words_and_escapes():
    html = Feedback(False, "a <b> & c").__repr__(), Feedback(False, "a <b> & c")._repr_html_()
    assert html[0] == "not yet: a <b> & c"
    assert "word-break: normal" in html[1] and "pre-wrap" in html[1]
    assert "not yet: a &lt;b&gt; &amp; c" in html[1]
