"""lab.engine.run: training points alone and batched; bad training settings and divergence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fakes import TINY, CountingTrainer

import lab
import lab.sweeps
from lab.config import LoRAConfig
from lab.engine.batched import AdapterSpec, BatchedTrainer, train_batched
from lab.engine.cache import SweepCache
from lab.engine.points import SweepPoint, describe
from lab.engine.summaries import accuracy_table, by_rank
from lab.sweeps import sweep
from lab.training import TrainingDiverged


def make_spec(targets, rank, alpha, dropout=0.0, rslora=False, lr=2e-2, seed=0) -> AdapterSpec:
    """An AdapterSpec from the adapter's numbers (its LoRAConfig) and the optimizer's."""
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    return AdapterSpec(config, lr, seed)


def _lora_model():
    model = lab.load_base_model("cpu")
    lab.add_lora(model, rank=4, alpha=16)
    return model


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"seed": -1}, ValueError, ["seed=-1"]),
        ({"lr": True}, TypeError, ["lr=True"]),
        ({"targets": [3]}, TypeError, ["targets", "str"]),
        ({"rslora": "False"}, TypeError, ["rslora"]),
    ],
)
def test_bad_adapter_specs_are_refused(kwargs, error, words):
    with pytest.raises(error) as info:
        make_spec(**({"targets": ("q_proj",), "rank": 4, "alpha": 8.0} | kwargs))
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"weight_decay": math.inf}, ValueError, ["weight_decay=inf", ">= 0"]),
        ({"weight_decay": -0.1}, ValueError, ["weight_decay=-0.1"]),
        ({"weight_decay": "0"}, TypeError, ["weight_decay='0'"]),
        ({"seed": -1}, ValueError, ["seed=-1"]),
        ({"seed": 2**64}, ValueError, ["seed="]),
        ({"lr": True}, TypeError, ["lr=True"]),
        ({"steps": 10**12}, ValueError, ["steps=", "limit"]),
        ({"batch_size": 10**9}, MemoryError, ["batch_size=1,000,000,000", "available"]),
    ],
)
def test_bad_training_settings_are_refused_before_training(kwargs, error, words):
    model = _lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"steps": 3, "lr": 1e-2, "batch_size": 8, "progress": False} | kwargs
    with pytest.raises(error) as info:
        lab.train(model, lab.get_task("sort_desc_small"), **args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_a_merged_model_is_refused():
    model = _lora_model()
    lab.merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        lab.train(model, lab.get_task("sort_desc_small"), steps=3, lr=1e-2, progress=False)
    assert "merged" in str(info.value) and "unmerge_lora" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lr": 1e10}, ["diverged at step", "loss nan", "lr=1e+10", "smaller lr"]),
        ({"lr": 1e-2, "weight_decay": 1e30}, ["weight_decay=1e+30", "smaller weight_decay"]),
    ],
)
def test_a_diverging_run_stops_naming_the_setting(kwargs, words):
    with pytest.raises(TrainingDiverged) as info:
        lab.train(_lora_model(), lab.get_task("sort_desc_small"), steps=30, batch_size=16,
                  progress=False, **kwargs)  # fmt: skip
    assert all(w in str(info.value) for w in words), str(info.value)
    assert info.value.step < 30 and all(math.isfinite(x) for x in info.value.losses)


@pytest.mark.parametrize("batched", [True, False])
def test_a_diverged_point_is_cached_as_diverged_and_not_retrained(tmp_path, batched):
    cache = SweepCache(tmp_path)
    bad, good = SweepPoint(**TINY, lr=1e10), SweepPoint(**TINY)
    with pytest.warns(UserWarning, match="diverged"):
        results = sweep([bad, good], cache, progress=False, device="cpu", batched=batched)
    assert results[0].diverged and not results[1].diverged
    assert math.isfinite(results[1].heldout["loss"])
    stored = json.loads(cache.path(bad).read_text())  # strict JSON: no NaN token
    assert stored["diverged"] is True and stored["heldout"]["loss"] is None
    again = cache.get(bad)
    assert again.diverged and math.isnan(again.heldout["loss"])
    trainer = CountingTrainer()
    sweep([bad, good], cache, progress=False, run_fn=trainer)
    assert trainer.calls == []
    assert describe(again).endswith("(diverged)")
    assert by_rank([again]) == {} and math.isnan(accuracy_table([again], [4], [16.0])[0][0])


def test_a_diverged_configuration_does_not_poison_the_others():
    base, task = lab.load_base_model("cpu"), lab.get_task("sort_desc_small")
    good = make_spec(("q_proj", "v_proj"), 4, 16.0, lr=2e-2)
    bad = make_spec(("q_proj", "v_proj"), 4, 16.0, lr=1e10)
    together = train_batched(base, task, [good, bad], 30, 16, "cpu", progress=False)
    alone = train_batched(base, task, [good], 30, 16, "cpu", progress=False)
    assert together.diverged[0] is None and "diverged" in together.diverged[1]
    assert torch.equal(together.losses[0], alone.losses[0])
    assert all(torch.isfinite(p).all() for p in together.models[1].parameters())


def test_the_batched_trainer_validates_weight_decay_and_steps():
    base, task = lab.load_base_model("cpu"), lab.get_task("sort_desc_small")
    spec = make_spec(("q_proj",), 4, 8.0)
    with pytest.raises(ValueError, match="weight_decay=inf"):
        BatchedTrainer(base, task, [spec], 5, 8, "cpu", weight_decay=math.inf)
    with pytest.raises(ValueError, match="limit"):
        BatchedTrainer(base, task, [spec], 10**12, 8, "cpu")
    with pytest.raises(MemoryError, match="batch_size=1,000,000,000"):
        BatchedTrainer(base, task, [spec], 5, 10**9, "cpu")
    assert not any(isinstance(m, lab.LoRALinear) for m in base.modules())
