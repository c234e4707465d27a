"""lab/training.py: the loop trains what requires grad, reports results, refuses bad input."""

import pytest
import torch

from lab import ToyTransformer, add_lora, get_preset, get_task, train


def _model(seed=0):
    torch.manual_seed(seed)
    return ToyTransformer(get_preset("tiny"))


def test_full_fine_tuning_reduces_loss_and_reports_measurements():
    model = _model()
    result = train(model, get_task("rotate"), steps=40, lr=3e-3, batch_size=32, progress=False)
    assert len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert result.wall_seconds > 0 and result.tokens_per_second > 0
    assert 0.0 <= result.heldout["accuracy"] <= 1.0 and result.heldout["loss"] > 0
    assert result.memory.gradients > 0 and result.memory.optimizer > 0
    assert result.to_dict()["memory"]["parameters"] == result.memory.parameters


def test_lora_training_changes_only_adapters():
    model = _model()
    add_lora(model, rank=4, alpha=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, get_task("rotate"), steps=5, lr=1e-2, batch_size=16, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    assert result.trainable_parameters == 1 * 2 * 4 * (32 + 32)


def test_same_seed_gives_identical_losses_and_other_seed_differs():
    task = get_task("rotate")
    a = train(_model(), task, steps=6, lr=1e-3, batch_size=8, seed=3, progress=False)
    b = train(_model(), task, steps=6, lr=1e-3, batch_size=8, seed=3, progress=False)
    c = train(_model(), task, steps=6, lr=1e-3, batch_size=8, seed=4, progress=False)
    assert a.losses == b.losses
    assert a.losses != c.losses


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"steps": 0}, ValueError, "steps=0"),
        ({"batch_size": 2.5}, TypeError, "batch_size=2.5"),
        ({"lr": -1.0}, ValueError, "lr=-1.0"),
        ({"lr": float("nan")}, ValueError, "lr=nan"),
    ],
)
def test_bad_arguments_are_refused_before_training(kwargs, error, message):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"steps": 3, "lr": 1e-3, "batch_size": 4, "progress": False} | kwargs
    with pytest.raises(error, match=message):
        train(model, get_task("rotate"), **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_with_nothing_trainable_is_refused():
    model = _model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, get_task("rotate"), steps=2, lr=1e-3, progress=False)
