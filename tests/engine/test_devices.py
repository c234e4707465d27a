"""lab.engine.devices: the device a sweep trains on."""

from __future__ import annotations

import pytest
import torch
from fakes import TINY, CountingTrainer

from lab.engine.cache import SweepCache
from lab.engine.points import SweepPoint
from lab.sweeps import sweep


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_before_training(tmp_path):
    trainer = CountingTrainer()
    with pytest.raises(ValueError, match="CUDA is not available"):
        sweep([SweepPoint(**TINY)], SweepCache(tmp_path), progress=False, run_fn=trainer,
              device="cuda")  # fmt: skip
    assert trainer.calls == []


def test_free_memory_is_what_the_os_can_give_without_swapping(monkeypatch):
    import types

    import psutil

    from lab.engine import devices

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=12345))
    assert devices.free_memory("cpu") == 12345 and devices.free_memory(torch.device("cpu")) == 12345

    def broken():
        raise OSError("no /proc here")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    assert devices.free_memory("cpu") is None  # unknown: planning assumes 4 GiB, nothing refused


@pytest.mark.parametrize(
    "device, error, words",
    [("tpu", ValueError, "not a device"), (3, TypeError, "expected a str"),
     ("cpu:1", ValueError, "there is one cpu")],
)  # fmt: skip
def test_a_device_that_is_not_here_is_refused_by_name(device, error, words):
    from lab.engine.devices import resolve_device

    with pytest.raises(error, match=words):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_training_the_engine_and_the_batched_cap_share_one_free_memory_probe(monkeypatch):
    import types

    import psutil

    import lab.engine.plan
    import lab.training
    from lab.engine import devices

    assert devices.free_memory is lab.training.available_bytes
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1000))
    group = [SweepPoint(task="sort_desc_small", rank=1, steps=1, batch_size=1)] * 2
    fits = lab.engine.plan.memory_fit(group, devices.free_memory("cpu"))
    assert fits == 1  # the base model alone is more than 1,000 bytes: never below one
    with pytest.raises(MemoryError):
        lab.training.check_fits(2000, torch.device("cpu"), "a run")
