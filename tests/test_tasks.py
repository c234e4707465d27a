"""Generated tasks: deterministic, disjoint splits, correct masking, exact-match evaluation."""

import pytest
import torch

from lab import TASKS, get_task, load_base_model
from lab.model import IGNORE_INDEX
from lab.tasks import EOS, FINETUNE_TASKS, PRETRAIN_TASKS, SEQ_LEN, TOKEN_ID, VOCAB, decode


def test_task_list_has_pretraining_and_at_least_three_finetuning_tasks():
    assert set(PRETRAIN_TASKS) | set(FINETUNE_TASKS) | {"pretrain"} == set(TASKS)
    assert len(FINETUNE_TASKS) >= 3


@pytest.mark.parametrize("name", ["sort_desc", "rotate", "add"])
def test_examples_decode_to_what_the_generator_says(name):
    task = get_task(name)
    for x, y in zip(task.heldout_inputs[:20], task.heldout_targets[:20], strict=True):
        sep = int((x == TOKEN_ID["<sep>"]).nonzero()[0])
        prompt, answer = decode(x[1:sep]), decode(y[y != IGNORE_INDEX])
        if name == "sort_desc":
            assert answer == "".join(sorted(prompt, reverse=True))
        elif name == "rotate":
            assert answer == prompt[1:] + prompt[0]
        else:
            a, b = prompt.split("+")
            assert answer == str(int(a) + int(b))[::-1]


def test_shift_answer_is_caesar_shift_by_three():
    task = get_task("shift")
    x, y = task.heldout_inputs[0], task.heldout_targets[0]
    sep = int((x == TOKEN_ID["<sep>"]).nonzero()[0])
    prompt, answer = decode(x[1:sep]), decode(y[y != IGNORE_INDEX])
    assert answer == "".join(chr((ord(c) - 97 + 3) % 26 + 97) for c in prompt)


def test_targets_cover_exactly_answer_and_eos():
    task = get_task("swap")
    y = task.train_targets
    assert y.shape[1] == SEQ_LEN - 1
    last = [row[row != IGNORE_INDEX][-1].item() for row in y[:50]]
    assert set(last) == {EOS}
    # the input at each scored position is the token before the target: teacher forcing
    x = task.train_inputs
    scored = y != IGNORE_INDEX
    assert torch.equal(x[:, 1:][scored[:, :-1]], y[:, :-1][scored[:, :-1]])


def test_generation_is_deterministic_and_splits_are_disjoint():
    import lab.tasks as tasks

    fresh = tasks._build("rotate")
    cached = get_task("rotate")
    assert torch.equal(fresh.train_inputs, cached.train_inputs)
    assert torch.equal(fresh.heldout_inputs, cached.heldout_inputs)
    train_rows = {tuple(r) for r in cached.train_inputs.tolist()}
    assert not train_rows & {tuple(r) for r in cached.heldout_inputs.tolist()}


def test_small_data_variant_has_few_examples_and_same_heldout():
    small, full = get_task("sort_desc_small"), get_task("sort_desc")
    assert small.n_train == 256 < full.n_train
    assert torch.equal(small.heldout_inputs, full.heldout_inputs)


class _Oracle(torch.nn.Module):
    """A 'model' whose logits put all mass on the held-out targets; `wrong` rows miss one token."""

    def __init__(self, task, wrong=0):
        super().__init__()
        pairs = zip(task.heldout_inputs.tolist(), task.heldout_targets.tolist(), strict=True)
        self.lookup = {tuple(x): y for x, y in pairs}
        self.wrong = wrong  # how many of the first examples get their first answer token wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # evaluate() reads the device from here
        self.seen = 0

    def forward(self, idx):
        out = torch.full((*idx.shape, len(VOCAB)), -10.0)
        for i, row in enumerate(idx.tolist()):
            targets = self.lookup[tuple(row)]
            first = next(j for j, t in enumerate(targets) if t != IGNORE_INDEX)
            for j, t in enumerate(targets):
                if t != IGNORE_INDEX:
                    miss = self.seen + i < self.wrong and j == first
                    out[i, j, (t + 1) % len(VOCAB) if miss else t] = 10.0
        self.seen += len(idx)
        return out


def test_evaluate_scores_a_perfect_model_one_and_counts_wrong_rows():
    task = get_task("rotate")
    perfect = task.evaluate(_Oracle(task))
    assert perfect["accuracy"] == 1.0 and perfect["loss"] < 1e-3


def test_evaluate_counts_an_example_wrong_if_any_answer_token_is_wrong():
    task = get_task("rotate")
    result = task.evaluate(_Oracle(task, wrong=10), batch_size=100)
    assert result["n"] == len(task.heldout_inputs)
    assert result["accuracy"] == pytest.approx((result["n"] - 10) / result["n"])
    assert result["loss"] > task.evaluate(_Oracle(task))["loss"]


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="valid tasks: pretrain, copy"):
        get_task("subtract")


def test_task_helpers_refuse_bad_batch_sizes_and_names():
    task = get_task("sort_desc_small")
    with pytest.raises(ValueError, match="batch_size=0"):
        task.evaluate(load_base_model("cpu"), batch_size=0)
    with pytest.raises(ValueError, match="batch_size=-1"):
        task.batch(-1, torch.Generator())
    with pytest.raises(ValueError, match="unknown task"):
        get_task(None)
