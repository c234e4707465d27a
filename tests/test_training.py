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
    task = get_task("sort_desc_small")
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


def test_the_memory_plan_counts_each_configuration_once_and_fits_what_it_counts():
    """lab.training.plan_memory: the one estimate behind lab.train's check, the sweep's check,
    the batched chunk size and the batched run's own check."""
    from lab.training import plan_memory

    config = get_preset("cpu")
    q_v = ("q_proj", "v_proj")
    lora = plan_memory(config, 64, 100, [(q_v, 4)])
    assert lora.bytes(3) - lora.bytes(2) == lora.per_config  # one more configuration, once
    assert lora.bytes(1) == lora.shared + lora.per_config
    for k in (1, 2, 7):  # it fits exactly what it counts, and no byte less
        assert lora.how_many_fit(lora.bytes(k)) == k
        assert lora.how_many_fit(lora.bytes(k) - 1) == k - 1
        assert lora.how_many_fit(2 * lora.bytes(k), fraction=0.5) == k
    full = plan_memory(config, 64, 100)
    assert full.per_config > lora.per_config  # every weight's gradient and Adam state
    bigger = plan_memory(config, 64, 100, [(q_v, 4), ("all-linear", 16)])
    assert bigger == plan_memory(config, 64, 100, [("all-linear", 16)])  # the largest for all
    assert bigger.per_config > lora.per_config
    assert plan_memory(config, 128, 100, [(q_v, 4)]).per_config > lora.per_config
    assert plan_memory(config, 64, 100, [(q_v, 4)], n_train=1000).shared > lora.shared


def test_the_sweep_and_the_batched_engine_refuse_by_the_memory_plan(monkeypatch):
    """A run is refused when the plan says it needs more than is free, and not otherwise."""
    import lab.engine.batched
    import lab.training
    from lab import LoRAConfig
    from lab.engine.batched import AdapterSpec, BatchedTrainer
    from lab.engine.plan import check_memory
    from lab.engine.points import SweepPoint
    from lab.training import plan_memory

    model = ToyTransformer(get_preset("tiny"))
    point = SweepPoint(task="sort_desc_small", rank=2, alpha=3, steps=5, batch_size=8)
    needed = plan_memory(model.config, 8, 5, [(point.lora.targets, 2)]).bytes()
    check_memory([point], torch.device("cpu"), needed, model.config)  # exactly enough
    with pytest.raises(MemoryError, match="batch_size=8 for steps=5 needs about"):
        check_memory([point], torch.device("cpu"), needed - 1, model.config)

    specs = [AdapterSpec(LoRAConfig(rank=2, alpha=3)) for _ in range(3)]
    plan = plan_memory(model.config, 8, 5, [(s.targets, s.rank) for s in specs])
    task = get_task("sort_desc_small")
    for free, refused in ((plan.bytes(3), False), (plan.bytes(3) - 1, True)):
        monkeypatch.setattr(lab.training, "available_bytes", lambda device, free=free: free)
        if refused:
            with pytest.raises(MemoryError, match="3 configurations with batch_size=8"):
                BatchedTrainer(model, task, specs, steps=5, batch_size=8, device="cpu")
        else:
            BatchedTrainer(model, task, specs, steps=5, batch_size=8, device="cpu")
    assert lab.engine.batched.check_fits is lab.training.check_fits
