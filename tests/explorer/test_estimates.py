"""lab/explorer/estimates.py: how long a Run takes, from cached runs and the kernel's pace."""

from __future__ import annotations

import dataclasses

import pytest
from explorer_fakes import (
    fake_result,
    lora_at,
)

from lab.sweeps import (
    SweepPoint,
)
from lab.widgets import (
    SECONDS_PER_STEP,
    estimate_seconds,
    format_duration,
)


def test_estimate_seconds_uses_cached_pace_else_a_default():
    lora, full = SweepPoint("sort_desc", 8, steps=600), SweepPoint("sort_desc", None, steps=600)
    done = [fake_result(lora), fake_result(full)]
    done[0].wall_seconds, done[1].wall_seconds = 30.0, 60.0
    todo = [SweepPoint("sort_desc", 4, steps=200), SweepPoint("sort_desc", None, steps=300)]
    assert estimate_seconds(todo, done) == pytest.approx(200 * 0.05 + 300 * 0.1)
    assert estimate_seconds(todo, []) == pytest.approx(500 * SECONDS_PER_STEP)
    assert estimate_seconds([], done) == 0
    assert format_duration(0.3) == "under a second" and format_duration(40) == "about 40 s"
    assert format_duration(200) == "about 3 min" and format_duration(5400) == "about 1.5 h"


def test_estimates_use_runs_of_the_same_flavour_when_there_are_some():
    slow = fake_result(SweepPoint("sort_desc", 8, variant="dora"))
    fast = fake_result(SweepPoint("sort_desc", 8))
    slow.wall_seconds, fast.wall_seconds = 60.0, 6.0
    dora, lora = SweepPoint("sort_desc", 4, variant="dora"), SweepPoint("sort_desc", 4)
    plus = dataclasses.replace(lora, lr_ratio=16.0)
    assert estimate_seconds([dora], [slow, fast]) == pytest.approx(60.0)
    assert estimate_seconds([lora], [slow, fast]) == pytest.approx(6.0)
    # no LoRA+ run cached: the median of every LoRA-kind run (the upper of two) stands in
    assert estimate_seconds([plus], [slow, fast]) == pytest.approx(60.0)


def test_the_pace_of_one_kind_scales_the_estimate_of_the_other():
    cached = [fake_result(lora_at(2e-2)), fake_result(SweepPoint("sort_desc", None, steps=300))]
    cached[0].wall_seconds, cached[1].wall_seconds = 3.0, 6.0
    slow = fake_result(lora_at(1e-2))
    slow.wall_seconds = 12.0  # four times the cached LoRA pace
    full = SweepPoint("sort_desc", None, steps=600)
    assert estimate_seconds([full], cached) == pytest.approx(12.0)
    assert estimate_seconds([full], [*cached, slow], [slow]) == pytest.approx(48.0)
    from lab.widgets import slowdown

    assert slowdown(cached, []) is None and slowdown([*cached, slow], [slow]) == pytest.approx(4)
