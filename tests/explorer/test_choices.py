"""lab/explorer/choices.py: the methods from the registry, a Selection, the shipped grids."""

from __future__ import annotations

import math
import re

import pytest
from explorer_fakes import (
    variants_grid_fixture,
)

from lab.config import INITS, VARIANTS
from lab.explorer.choices import conflict
from lab.sweeps import (
    SweepCache,
)
from lab.variants.registry import display_name
from lab.widgets import (
    METHODS,
    SHIPPED_GRIDS,
    Selection,
    seed_shipped,
)


def test_selection_points_sort_values_and_add_full_fine_tuning():
    points = Selection(ranks=(8, 2), alphas=(16.0,), dropouts=(0.0,), steps=100).points()
    assert [p.rank for p in points] == [2, 8, None]
    assert all(p.steps == 100 for p in points)
    assert not math.isnan(points[0].lr)


def test_the_methods_come_from_the_registries_in_order():
    """Plain LoRA, every registered variant, LoRA+, every registered init: by display name."""
    plain = {"variant": "lora", "init": "default", "lr_ratio": 1.0}
    expected = {"LoRA": plain}
    expected |= {
        display_name(r): {**plain, "variant": n} for n, r in VARIANTS.items() if n != "lora"
    }
    expected["LoRA+"] = {**plain, "lr_ratio": 16.0}
    expected |= {display_name(r): {**plain, "init": n} for n, r in INITS.items() if n != "default"}
    assert list(METHODS.items()) == list(expected.items())
    assert METHODS["DoRA"]["variant"] == "dora" and METHODS["PiSSA"]["init"] == "pissa"
    assert Selection(method="DoRA", quant="nf4").flavour == {
        "variant": "dora", "init": "default", "lr_ratio": 1.0, "quant": "nf4",
    }  # fmt: skip


def test_an_unknown_method_or_base_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match="method='QLoRA': expected one of " + re.escape(", ".join(METHODS))
    ):
        Selection(method="QLoRA")
    with pytest.raises(
        ValueError, match=r"quant=.nf8.: expected None \(fp32 base\) or one of nf4, fp4, int4"
    ):
        Selection(quant="nf8")


def test_seed_shipped_reads_every_grid_that_exists(tmp_path, monkeypatch):
    grid_file = tmp_path / "variants_grid.json"
    points = variants_grid_fixture(grid_file)
    monkeypatch.setattr(
        "lab.explorer.choices.SHIPPED_GRIDS", (grid_file, tmp_path / "missing.json")
    )
    cache = SweepCache(tmp_path / "cache")
    assert seed_shipped(cache) == len(points) == 10 and seed_shipped(cache) == 0
    assert {r.point for r in cache.results()} == set(points)


def test_seed_shipped_includes_the_practice_grid_when_it_exists(tmp_path, monkeypatch):
    from lab.practice import PRACTICE_GRID_PATH

    assert SHIPPED_GRIDS[2] == PRACTICE_GRID_PATH
    grid_file = tmp_path / "practice_grid.json"
    points = variants_grid_fixture(grid_file)
    monkeypatch.setattr("lab.explorer.choices.SHIPPED_GRIDS", (tmp_path / "absent.json", grid_file))
    assert seed_shipped(SweepCache(tmp_path / "c")) == len(points)
    monkeypatch.setattr("lab.explorer.choices.SHIPPED_GRIDS", (tmp_path / "absent.json",))
    assert seed_shipped(SweepCache(tmp_path / "d")) == 0  # not built yet: nothing, no error


def test_every_init_that_rewrites_w_says_to_choose_the_fp32_base():
    for name, record in INITS.items():
        method = display_name(record) if name != "default" else "LoRA"
        said = conflict(Selection(method=method, quant="nf4"))
        if record.changes_base:
            assert said == f"{method} starts from the full-precision weights: choose the fp32 base"
        else:
            assert said is None
