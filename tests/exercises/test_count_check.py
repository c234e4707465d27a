"""Tests for lab/exercises/count_check.py: exercise 3, on models drawn at random."""

from __future__ import annotations

import pytest
import torch
from exercise_kit import (
    assert_not_yet,
    assert_passed,
    exits,
    no_args,
    returns_nan,
    stub,
)

import lab
from lab import exercises as ex
from lab.exercises import count_check


def count_ok(config, targets, rank):
    d, f = config.d_model, config.d_ff
    dims = {"up_proj": d + f, "down_proj": f + d}
    return config.n_layers * sum(rank * dims.get(t, 2 * d) for t in targets)


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

    case = (lab.get_preset("cpu"), ("q_proj", "v_proj"), 8)  # the lab counts 8,192
    monkeypatch.setattr(count_check, "_count_cases", lambda: [case])
    feedback = ex.check_count(lambda c, t, r: 2 * count_ok(c, t, r))
    assert_not_yet(feedback, "for cpu, targets q_proj, v_proj, rank 8: you count 16,384, more")
    assert "8,192" not in feedback.message


def test_count_cases_are_new_every_check():
    """No table of answers can pass: the cases are drawn afresh, from the system's entropy."""

    draws = [tuple(count_check._count_cases()[:-1]) for _ in range(20)]
    assert len(set(draws)) == 20
    for cases in draws:
        configs = [c for c, _, _ in cases]
        assert any(c.bias for c in configs) and not all(c.bias for c in configs)
        assert any({"up_proj", "down_proj"} & set(t) for _, t, _ in cases)
        for config, targets, rank in cases:
            count_check._lab_count(config, targets, rank)  # the lab accepts every case (rank fits)


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

    monkeypatch.setattr(
        count_check, "_count_cases", lambda: [(lab.get_preset("cpu"), ("q_proj", "v_proj"), 8)]
    )
    feedback = ex.check_count(only_a)
    assert_not_yet(feedback, "you count 4,096, fewer than the lab counts", "counts only A")
    assert "block" not in feedback.message and "layer's worth" not in feedback.message


def test_count_a_lookup_table_of_any_earlier_cases_does_not_pass():
    assert_not_yet(ex.check_count(lambda c, t, r: PAPER_TABLE.get(r, 0)))
    # Even a table of every case the check has ever drawn: the next check draws others.

    for _ in range(5):
        for case in count_check._count_cases():
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
