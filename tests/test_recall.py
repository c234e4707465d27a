"""Recall tasks: N random key -> value pairs of known information content, trained and scored."""

from __future__ import annotations

import math

import pytest
import torch

import lab
import lab.tasks as tasks
from lab.base import load_base_config
from lab.model import IGNORE_INDEX
from lab.sweeps import SweepPoint
from lab.tasks import (
    FINETUNE_TASKS,
    RECALL_KEY_LEN,
    RECALL_SIZES,
    RECALL_TASKS,
    RECALL_VALUE_LEN,
    SKILL_TASKS,
    TASKS,
    TOKEN_ID,
    VOCAB,
    decode,
    get_task,
    recall_bits,
)

# The 50 tokens the base model was pretrained with, at their ids: a new token must not move them.
PRETRAINED_VOCAB = [
    "<pad>", "<sep>", "<eos>", *"0123456789", *"abcdefghijklmnopqrstuvwxyz", "+", "-",
    "<copy>", "<reverse>", "<sort>", "<add>",
    "<sort_desc>", "<shift>", "<rotate>", "<swap>", "<evens>",
]  # fmt: skip


def pairs(task):
    """(key, value) strings of every training example, in order."""
    out = []
    for x, y in zip(task.train_inputs, task.train_targets, strict=True):
        sep = int((x == TOKEN_ID["<sep>"]).nonzero()[0])
        assert int(x[0]) == TOKEN_ID["<recall>"]
        out.append((decode(x[1:sep]), decode(y[y != IGNORE_INDEX])))
    return out


def test_recall_tasks_are_finetuning_tasks_after_the_skills():
    assert tuple(f"recall_{n}" for n in RECALL_SIZES) == RECALL_TASKS
    assert FINETUNE_TASKS == SKILL_TASKS + RECALL_TASKS
    assert set(RECALL_TASKS) <= set(TASKS)
    assert list(RECALL_SIZES) == sorted(set(RECALL_SIZES))


def test_recall_token_is_appended_and_the_pretrained_ids_do_not_move():
    assert VOCAB[: len(PRETRAINED_VOCAB)] == PRETRAINED_VOCAB
    assert VOCAB[len(PRETRAINED_VOCAB) :] == ["<recall>"]
    assert len(VOCAB) <= load_base_config().vocab_size  # the base has a row for it


@pytest.mark.parametrize("name", RECALL_TASKS[:2])
def test_keys_are_distinct_letter_strings_and_values_have_fixed_length(name):
    task = get_task(name)
    found = pairs(task)
    n = int(name.removeprefix("recall_"))
    assert task.n_train == len(found) == n
    assert len({k for k, _ in found}) == n
    for key, value in found:
        assert len(key) == RECALL_KEY_LEN and key.isalpha() and key.islower()
        assert len(value) == RECALL_VALUE_LEN and value.isalpha() and value.islower()
    assert task.examples == [(f"<recall> {k}", v) for k, v in found[:4]]


def test_heldout_is_the_training_set_itself():
    task = get_task(RECALL_TASKS[0])
    assert torch.equal(task.heldout_inputs, task.train_inputs)
    assert torch.equal(task.heldout_targets, task.train_targets)
    assert "memoris" in task.description and "same pairs" in task.description


def test_a_larger_recall_task_only_adds_pairs():
    small, large = get_task(RECALL_TASKS[0]), get_task(RECALL_TASKS[1])
    assert torch.equal(large.train_inputs[: small.n_train], small.train_inputs)
    assert torch.equal(large.train_targets[: small.n_train], small.train_targets)


def test_recall_tasks_are_deterministic():
    name = RECALL_TASKS[1]
    fresh = tasks._build(name)
    assert torch.equal(fresh.train_inputs, get_task(name).train_inputs)
    assert torch.equal(fresh.train_targets, get_task(name).train_targets)


def test_values_look_uniform_so_each_letter_carries_log2_26_bits():
    # The bit count assumes uniform, independent value letters: check the largest task's counts
    # are what uniform draws give (chi-square with 25 degrees of freedom, below its 0.1% tail).
    task = get_task(RECALL_TASKS[-1])
    letters = "".join(v for _, v in pairs(task))
    counts = torch.tensor([letters.count(c) for c in tasks.LETTERS], dtype=torch.float64)
    expected = len(letters) / 26
    assert float(((counts - expected) ** 2 / expected).sum()) < 52.6


def test_bits_are_values_times_log2_26():
    assert recall_bits(1) == pytest.approx(RECALL_VALUE_LEN * math.log2(26))
    assert recall_bits(1) == pytest.approx(18.80, abs=0.01)  # 4 letters at 4.70 bits each
    for name, n in zip(RECALL_TASKS, RECALL_SIZES, strict=True):
        assert get_task(name).bits == recall_bits(n) == pytest.approx(n * recall_bits(1))
    assert get_task("rotate").bits is None  # a rule, not a table: no fixed content


@pytest.mark.parametrize("n", [0, -3, 2.0, True, "64", None])
def test_recall_bits_refuses_what_is_not_a_positive_count(n):
    with pytest.raises(ValueError, match=f"n={n!r}: expected a positive int"):
        recall_bits(n)


def test_sweep_points_accept_recall_tasks():
    point = SweepPoint("recall_256", 4, targets="all-linear")
    assert point.task == "recall_256" and point.rank == 4
    assert SweepPoint.from_dict(point.to_dict()) == point
    with pytest.raises(ValueError, match="recall_64"):  # the error lists them among the valid
        SweepPoint("recall_100", 4)


def test_full_fine_tuning_memorises_the_smallest_task():
    # The pairs are a function of the keys, so the base can learn them; the base itself knows
    # none (tests/test_base.py checks every fine-tuning task).
    torch.manual_seed(0)
    model = lab.load_base_model("cpu")
    task = get_task(RECALL_TASKS[0])
    result = lab.train(model, task, steps=200, lr=3e-3, progress=False, measure_memory=False)
    assert result.heldout["accuracy"] >= 0.9
