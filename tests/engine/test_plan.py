"""lab.engine.plan: groups, chunk sizes and the memory fit, before anything trains."""

from __future__ import annotations

import pytest
from fakes import TINY, CountingTrainer, listing

from lab.engine.cache import SweepCache
from lab.engine.points import SweepPoint
from lab.sweeps import sweep


def test_a_huge_batch_is_refused_by_its_memory_estimate_before_training(tmp_path):
    trainer = CountingTrainer()
    point = SweepPoint(**(TINY | {"batch_size": 10**9}))
    with pytest.raises(MemoryError) as info:
        sweep([SweepPoint(**TINY), point], SweepCache(tmp_path), progress=False, run_fn=trainer)
    assert "batch_size=1,000,000,000" in str(info.value) and "TiB" in str(info.value)
    assert trainer.calls == [] and [f for f in listing(tmp_path) if f.endswith(".json")] == []


def test_free_memory_is_read_once_per_plan_with_one_probe(tmp_path, monkeypatch):
    import psutil

    import lab.engine.devices
    import lab.engine.plan
    import lab.sweeps
    from lab.engine.plan import memory_fit
    from lab.sweeps import grid

    asked, loaded = [], []
    probe = lab.engine.devices.free_memory

    def counted(device):
        asked.append(str(device))
        return probe(device)

    real_config = lab.sweeps.load_base_config

    def config():
        loaded.append(1)
        return real_config()

    for module in (lab.sweeps, lab.engine.plan, lab.engine.devices):
        monkeypatch.setattr(module, "free_memory", counted, raising=False)
    monkeypatch.setattr(lab.sweeps, "load_base_config", config)
    monkeypatch.setattr(lab.engine.plan, "load_base_config", config)
    points = grid("sort_desc_small", [1, 2, 4, 8], steps=3, batch_size=16)
    trained = []
    monkeypatch.setattr(lab.sweeps, "run_group", lambda unit, *a, **k: trained.append(unit))
    sweep(points, SweepCache(tmp_path), progress=False, device="cpu")
    assert asked == ["cpu"] and len(loaded) == 1  # one probe, one config, for the whole plan
    assert sum(map(len, trained)) == 4
    # The probe is psutil's available memory (MemAvailable), not the free pages (MemFree).
    assert probe("cpu") == pytest.approx(psutil.virtual_memory().available, rel=0.2)
    assert memory_fit(points, 0) == 1 and memory_fit(points, 1 << 50) > 1000


def test_the_chunk_fit_follows_the_largest_adapter_the_batch_and_the_free_memory():

    from lab.base import load_base_config
    from lab.engine.plan import FREE_FRACTION, memory_fit
    from lab.training import plan_memory

    config = load_base_config()
    small = SweepPoint(**(TINY | {"rank": 1, "targets": ("q_proj",)}))
    big = SweepPoint(**(TINY | {"rank": 64, "targets": ("all-linear",)}))
    free = 1 << 32
    mixed = memory_fit([small, big], free, config)
    assert mixed == memory_fit([big, big], free, config) < memory_fit([small, small], free, config)
    plan = plan_memory(config, big.batch_size, big.steps, [(big.lora.targets, 64)])
    assert mixed == plan.how_many_fit(free, FREE_FRACTION)  # half the free memory
    wider = SweepPoint(**(TINY | {"rank": 1, "targets": ("q_proj",), "batch_size": 256}))
    assert memory_fit([wider, wider], free, config) < memory_fit([small, small], free, config)
    assert memory_fit([big, big], 1, config) == 1  # never below one configuration
    assert memory_fit([big, big], None, config) == memory_fit([big, big], 4 << 30, config)


def test_the_static_chunk_on_a_cpu_holds_about_128_sequences():
    import torch

    from lab.engine.plan import static_chunk

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [static_chunk(100, b, cpu) for b in (64, 8, 512)] == [2, 16, 1]
    assert static_chunk(1, 8, cpu) == 1  # memory still caps it
    assert static_chunk(100, 64, cuda) == 100  # a GPU takes what fits
