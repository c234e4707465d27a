"""The explorer's fixtures: caches of made-up results for each test that asks."""

from __future__ import annotations

import pytest
from explorer_fakes import FLAVOURS, fake_result, flavoured_result, practice_result

from lab.sweeps import (
    SweepCache,
    SweepPoint,
    grid,
)
from lab.widgets import (
    Selection,
)


@pytest.fixture
def seeded(tmp_path) -> SweepCache:
    """A cache holding the default selection's grid (fake numbers)."""
    cache = SweepCache(tmp_path / "cache")
    for point in Selection().points():
        cache.put(fake_result(point))
    return cache


@pytest.fixture
def mixed(tmp_path) -> SweepCache:
    """The default grid for every method and base (accuracy = offset + rank / 1000)."""
    cache = SweepCache(tmp_path / "mixed")
    for (method, quant), offset in FLAVOURS.items():
        for point in Selection(method=method, quant=quant, full=False).points():
            cache.put(flavoured_result(point, offset))
    cache.put(fake_result(Selection().points()[-1]))  # full fine-tuning, once
    small = [("LoRA", None), ("DoRA", None)]
    for method, quant in small:  # the dropout plot's small-data runs
        for p in grid("sort_desc_small", [8], [16], [0.0, 0.3], **Selection(method=method).flavour):
            r = fake_result(p)
            r.train_eval = {**r.train_eval, "loss": FLAVOURS[method, quant] + p.dropout}
            cache.put(r)
    return cache


@pytest.fixture
def practice(tmp_path) -> SweepCache:
    """An lr sweep on sort_desc, all-linear, 200 steps, ranks 1 and 4 and full; replay runs."""
    cache = SweepCache(tmp_path / "practice")
    lrs = (1e-3, 1e-2, 1e-1)
    for point in grid("sort_desc", [1, 4], [16.0], targets="all-linear", steps=200, lrs=lrs):
        cache.put(practice_result(point))
    for lr in (1e-4, 1e-3, 1e-2):
        cache.put(practice_result(SweepPoint("sort_desc", None, steps=200, lr=lr), kept=0.1))
    replayed = SweepPoint("sort_desc", 4, targets="all-linear", steps=200, lr=1e-2, replay=0.05)
    cache.put(practice_result(replayed, kept=0.9))
    return cache
