"""Recall tasks: N random key -> value pairs of known information content, trained and scored."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import lab
import lab.tasks as tasks
from lab.base import load_base_config
from lab.model import IGNORE_INDEX
from lab.sweeps import ALL_TARGETS, SweepPoint, load_grid_file, trainable_counts
from lab.tasks import (
    FINETUNE_TASKS,
    PRETRAIN_TASKS,
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
    # 100 steps: at 60 it already recalls every pair (30: 6%, 45: 59%, measured), so a margin.
    result = lab.train(model, task, steps=100, lr=3e-3, progress=False, measure_memory=False)
    assert result.heldout["accuracy"] >= 0.9


# --- the shipped capacity grid (lab/data/capacity_grid.json) -------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_capacity_grid.py"


def _load_script():
    """scripts/make_capacity_grid.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_capacity_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(scope="module")
def results():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another base model or a malformed entry: a failure
        return load_grid_file(script.OUT)


@pytest.fixture(scope="module")
def header():
    data = json.loads(script.OUT.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k != "results"}


@pytest.fixture(scope="module")
def accuracy(results):
    """Held-out (= training) accuracy by (N, rank), rank None for full fine-tuning."""
    return {(int(r.point.task.removeprefix("recall_")), r.point.rank): r.heldout["accuracy"]
            for r in results}  # fmt: skip


def test_the_script_trains_every_size_at_every_rank_on_one_budget():
    assert set(script.SIZES) <= set(RECALL_SIZES) and list(script.SIZES) == sorted(script.SIZES)
    by_size = script.size_points()
    assert list(by_size) == list(script.SIZES)
    for n, group in by_size.items():
        assert [p.rank for p in group] == [None, *script.RANKS], n
        for p in group:
            assert (p.task, p.steps, p.batch_size) == (f"recall_{n}", script.STEPS,
                                                       script.BATCH_SIZE)  # fmt: skip
            if p.is_full:
                assert p.lr == script.FULL_LR
            else:  # every linear of the blocks, update scale alpha / rank = 2 at every rank
                assert p.lr == script.LORA_LR and p.alpha == 2 * p.rank
                assert p.targets == tuple(sorted(ALL_TARGETS)) and p.batchable
    assert script.points() == [p for g in by_size.values() for p in g]


def test_shipped_grid_holds_exactly_the_scripts_points(results, header):
    expected = script.points()
    assert len(results) == len(expected) == len({r.point for r in results})
    assert {r.point for r in results} == set(expected)
    assert header["sizes"] == list(script.SIZES) and header["ranks"] == list(script.RANKS)
    assert header["steps"] == script.STEPS and header["batch_size"] == script.BATCH_SIZE
    assert header["lora_lr"] == script.LORA_LR and header["full_lr"] == script.FULL_LR
    assert header["bits"] == {str(n): round(recall_bits(n), 1) for n in script.SIZES}


def test_every_result_trained_and_carries_forgetting(results):
    for r in results:
        assert not r.diverged, r.point
        assert len(r.losses) == r.point.steps and all(math.isfinite(x) for x in r.losses)
        assert r.train_eval == r.heldout, r.point  # recall is scored on the training pairs
        assert r.forgetting is not None and set(r.forgetting) == set(PRETRAIN_TASKS), r.point
        assert r.memory is not None and r.wall_seconds > 0


def test_trainable_parameters_are_the_all_linear_counts(results, header):
    lora, full = trainable_counts(script.RANKS, tuple(sorted(ALL_TARGETS)))
    count = dict(zip(script.RANKS, lora, strict=True))
    assert header["trainable"] == {"full": full, **{str(r): c for r, c in count.items()}}
    for r in results:
        assert r.trainable_parameters == (full if r.point.is_full else count[r.point.rank])


def knee(accuracy, rank, at_least=0.9):
    """The largest N of the grid that `rank` still recalls at `at_least` or better."""
    return max((n for n in script.SIZES if accuracy[n, rank] >= at_least), default=None)


def test_full_fine_tuning_recalls_every_size_so_the_budget_suffices(accuracy):
    assert all(accuracy[n, None] >= 0.99 for n in script.SIZES), accuracy


def test_more_rank_never_recalls_less(accuracy):
    for n in script.SIZES:
        row = [accuracy[n, r] for r in (*script.RANKS, None)]
        assert all(a <= b + 0.01 for a, b in zip(row, row[1:], strict=False)), (n, row)


def test_every_rank_tracks_full_fine_tuning_then_falls_behind(accuracy):
    smallest, largest = script.SIZES[0], script.SIZES[-1]
    for r in script.RANKS:
        assert accuracy[smallest, r] >= 0.99, r  # a few pairs: every adapter holds them
        assert accuracy[largest, None] - accuracy[largest, r] >= 0.5, r  # too many: it cannot
        past = [n for n in script.SIZES if n > knee(accuracy, r)]
        assert all(accuracy[n, r] < 0.9 for n in past), r  # once behind, it stays behind


def test_the_knee_moves_to_more_pairs_with_rank(accuracy):
    knees = [knee(accuracy, r) for r in script.RANKS]
    assert knees == sorted(set(knees)), knees  # strictly increasing: 4x the rank holds more
