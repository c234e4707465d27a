"""lab/widgets.py, headless: set control values, press Run with a fake trainer, read the images."""

from __future__ import annotations

import math

import ipywidgets as W
import pytest

from lab import plots
from lab.sweep import (
    SweepCache,
    SweepPoint,
    SweepResult,
    grid,
)
from lab.widgets import PLOTS, Selection, SweepExplorer, plot_specs, sweep_explorer

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(value: bytes | memoryview) -> bool:
    """Image.value holds bytes (ipywidgets may hand back a memoryview)."""
    return bytes(value).startswith(PNG)


def fake_result(point: SweepPoint) -> SweepResult:
    """Made-up but plausible numbers: accuracy grows with rank, memory with trainable size."""
    rank = point.rank or 128
    return SweepResult(
        point=point,
        losses=[3.0 / (1 + i * rank / 64) for i in range(40)],
        heldout={"loss": 1.0 / rank + point.dropout, "accuracy": min(1.0, rank / 16), "n": 512},
        train_eval=(
            {"loss": 0.1 + point.dropout / 2, "accuracy": 1.0, "n": 256}
            if point.task.endswith("_small")
            else None
        ),
        trainable_parameters=rank * 512,
        total_parameters=406_784,
        memory={
            "parameters": 1_600_000,
            "gradients": rank * 2048,
            "optimizer": rank * 4096,
            "activations": 20_000_000,
        },  # fmt: skip
        wall_seconds=0.1,
        tokens_per_second=1e5,
        device="cpu",
        date="2026-01-01T00:00:00+00:00",
    )


class FakeTrainer:
    """run_fn that counts calls and returns fake results instantly."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[SweepPoint] = []
        self.fail = fail

    def __call__(self, point, device=None, progress=True):
        self.calls.append(point)
        if self.fail:
            raise RuntimeError("out of memory (fake)")
        return fake_result(point)


@pytest.fixture
def seeded(tmp_path) -> SweepCache:
    """A cache holding the default selection's grid (fake numbers)."""
    cache = SweepCache(tmp_path / "cache")
    for point in Selection().points():
        cache.put(fake_result(point))
    return cache


def test_explorer_opens_with_facts_and_a_drawn_plot(seeded):
    trainer = FakeTrainer()
    explorer = sweep_explorer(seeded, run_fn=trainer)
    assert explorer.facts() == {"selected": 22, "cached": 22, "to_train": 0}
    assert explorer.status_text() == "sort_desc: 22 points selected, 22 cached, 0 to train"
    assert "22 cached" in explorer.status.value
    assert is_png(explorer.images["trainable"].value)
    assert isinstance(explorer.widget, W.VBox) and explorer.tabs.children == tuple(
        explorer.images.values()
    )
    assert trainer.calls == []  # opening never trains


def test_changing_controls_updates_facts_without_training(seeded):
    trainer = FakeTrainer()
    explorer = SweepExplorer(seeded, run_fn=trainer)
    explorer.ranks.value = (4, 8)
    explorer.alphas.value = (16.0,)
    assert explorer.facts() == {"selected": 3, "cached": 3, "to_train": 0}
    explorer.steps.value = 200  # another step count: nothing of it is cached
    assert explorer.facts() == {"selected": 3, "cached": 0, "to_train": 3}
    explorer.targets.value = ()
    assert explorer.facts()["selected"] == 0 and "select at least one" in explorer.status_text()
    assert trainer.calls == []
    assert all(c.continuous_update is False for c in (explorer.steps,))


def test_run_trains_only_new_points_caches_them_and_redraws(tmp_path):
    trainer = FakeTrainer()
    cache = SweepCache(tmp_path)
    explorer = SweepExplorer(cache, run_fn=trainer)
    explorer.ranks.value, explorer.alphas.value = (2, 8), (16.0,)
    explorer.tabs.selected_index = list(PLOTS).index("loss")
    before = explorer.images["loss"].value
    assert explorer.facts()["to_train"] == 3  # two ranks and full fine-tuning

    explorer.on_run(explorer.run_button)
    assert sorted(p.rank or 0 for p in trainer.calls) == [0, 2, 8]
    assert all(p in SweepCache(tmp_path) for p in explorer.selection.points())
    assert bytes(explorer.images["loss"].value) != bytes(before) and is_png(
        explorer.images["loss"].value
    )
    assert explorer.facts() == {"selected": 3, "cached": 3, "to_train": 0}
    assert "last run trained 3 points" in explorer.status_text()
    assert not explorer.run_button.disabled

    explorer.on_run()
    assert len(trainer.calls) == 3  # everything cached: nothing retrained
    assert "nothing to train" in explorer.status_text()


def test_a_failing_run_is_reported_in_the_status(tmp_path):
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=FakeTrainer(fail=True))
    explorer.ranks.value = (1,)
    explorer.on_run()
    assert "error: RuntimeError: out of memory (fake)" in explorer.status.value
    assert not explorer.run_button.disabled


def test_every_tab_draws_a_png_and_hidden_tabs_draw_when_opened(seeded):
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    assert bytes(explorer.images["accuracy"].value) == b""  # hidden: not drawn yet
    explorer.tabs.selected_index = list(PLOTS).index("accuracy")
    assert is_png(explorer.images["accuracy"].value)
    explorer.refresh(all_tabs=True)
    assert all(is_png(image.value) for image in explorer.images.values())


def test_plot_specs_feed_the_plots_the_cached_numbers(seeded):
    sel = Selection(ranks=(1, 8, 64), alphas=(8.0, 16.0), dropouts=(0.0,))
    small = grid("sort_desc_small", [8], [16], [0.0, 0.3])
    for p in small:
        seeded.put(fake_result(p))
    specs = plot_specs(seeded.results(), sel)
    assert set(specs) == set(PLOTS)

    fn, (ranks, counts, full), _ = specs["trainable"]
    assert fn is plots.trainable_vs_rank and ranks == [1, 8, 64]
    assert counts == [r * 2 * 2 * 256 for r in ranks] and full == 406_784

    fn, (ranks, breakdowns), kwargs = specs["memory"]
    assert ranks == [1, 8, 64] and breakdowns[1]["gradients"] == 8 * 2048
    assert kwargs["full"]["gradients"] == 128 * 2048

    fn, (curves,), kwargs = specs["loss"]
    assert list(curves) == ["r1 α16", "r8 α16", "r64 α16", "full fine-tuning"]
    assert "α=16" in kwargs["title"]

    fn, (ranks, alphas, table), _ = specs["accuracy"]
    assert alphas == [8.0, 16.0] and table == [[1 / 16] * 2, [0.5] * 2, [1.0] * 2]

    fn, (dropouts, train, heldout), kwargs = specs["dropout"]
    assert dropouts == [0.0, 0.3] and train == [0.1, 0.25]
    assert "sort_desc_small" in kwargs["title"]


def test_plot_specs_of_an_empty_cache_still_draw(tmp_path):
    specs = plot_specs([], Selection())
    fn, args, kwargs = specs["accuracy"]
    assert args == ([], [], [])  # an all-missing table becomes the plot's "no results yet" figure
    assert is_png(plots.savefig_bytes(fn(*args, **kwargs)))
    assert specs["loss"][1] == ({},) and specs["dropout"][1] == ([], [], [])


def test_selection_points_sort_values_and_add_full_fine_tuning():
    points = Selection(ranks=(8, 2), alphas=(16.0,), dropouts=(0.0,), steps=100).points()
    assert [p.rank for p in points] == [2, 8, None]
    assert all(p.steps == 100 for p in points)
    assert not math.isnan(points[0].lr)
