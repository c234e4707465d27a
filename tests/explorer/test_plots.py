"""lab/explorer/plots.py: which figure each tab draws, from which cached results."""

from __future__ import annotations

import dataclasses

from explorer_fakes import (
    PRACTICE,
    PRACTICE_SWEPT,
    fake_result,
    figure_texts,
    is_png,
    practice_result,
)

from lab import plots
from lab.sweeps import (
    SweepCache,
    SweepPoint,
    grid,
)
from lab.widgets import (
    PLOTS,
    Selection,
    draw,
    plot_specs,
)


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


def test_the_lr_plot_draws_a_curve_per_rank_and_full_fine_tuning(practice):
    fn, (curves, full), kwargs = plot_specs(practice.results(), PRACTICE)["lr"]
    assert fn is plots.accuracy_vs_lr
    assert curves == {
        "r1": [(1e-3, 0.7), (1e-2, 0.9), (1e-1, None)],
        "r4": [(1e-3, 0.7), (1e-2, 0.9), (1e-1, None)],
    }  # the replay run is left out: it is another experiment
    assert full == [(1e-4, 0.7), (1e-3, 0.9), (1e-2, 0.7)]
    assert kwargs["title"] == "Accuracy vs lr (sort_desc, 200 steps, all-linear, α/r, α=16)"
    fig = draw(plot_specs(practice.results(), PRACTICE)["lr"])
    text = figure_texts(fig)
    assert "r4 (best lr 0.01)" in text and "full fine-tuning (best lr 0.001)" in text
    assert "diverged (loss nan/inf)" in text and "learning rate (log scale)" in text
    off = plot_specs(practice.results(), dataclasses.replace(PRACTICE, full=False))["lr"]
    assert off[1][1] is None  # no full fine-tuning curve when it is unchecked
    rs = plot_specs(practice.results(), dataclasses.replace(PRACTICE, rslora=True))["lr"]
    assert rs[1] == ({}, full) and "α/√r (rsLoRA)" in rs[2]["title"]  # no rsLoRA run cached


def test_the_forgetting_plot_shows_the_selected_grids_runs_at_every_lr(practice):
    for sel in (PRACTICE, PRACTICE_SWEPT):  # the lr axis is the forgetting plot's: every lr
        fn, (rows,), kwargs = plot_specs(practice.results(), sel)["forgetting"]
        kinds = sorted((r["rank"] or 0, r["replay"], r["source_accuracy"]) for r in rows)
        # every trained lr of r1 and r4 (0.1 diverged: no forgetting) and full at 3 lrs; the
        # replay run is another experiment, left out as the Learning rate tab leaves it out
        assert kinds == [(0, 0.0, 0.1)] * 3 + [(1, 0.0, 0.5)] * 2 + [(4, 0.0, 0.5)] * 2
        assert kwargs["title"].splitlines() == [
            "Learned vs kept (sort_desc, 200 steps, all-linear, α/r)",
            "runs at every lr: 4 LoRA (r1, r4), 3 full fine-tuning",
        ]
    text = figure_texts(draw(plot_specs(practice.results(), PRACTICE)["forgetting"]))
    assert "LoRA r4" in text and "full fine-tuning" in text
    assert "new task: held-out accuracy (%)" in text
    no_full = plot_specs(practice.results(), dataclasses.replace(PRACTICE, full=False))
    assert all(r["rank"] is not None for r in no_full["forgetting"][1][0])
    only_r1 = plot_specs(practice.results(), dataclasses.replace(PRACTICE, ranks=(1,)))
    assert {r["rank"] for r in only_r1["forgetting"][1][0]} == {1, None}


def test_the_forgetting_plot_never_borrows_another_grids_runs(seeded, practice):
    """The default selection (600 steps, q,v) is not shown the practice grid's 200-step runs."""
    both = seeded.results() + practice.results()
    fn, (title, message), _ = plot_specs(both, Selection())["forgetting"]
    assert fn is not plots.learn_forget and title == "Forgetting"
    assert "no cached sort_desc, 600 steps, q,v, α/r run of the selected ranks and alphas" in (
        " ".join(message.split())
    )
    assert "cached before forgetting was measured (the shipped default grid) have none" in message
    assert "Run new points" in message and "python -m lab sweep --task sort_desc" in message
    assert "sort_desc runs with it: LoRA 200 steps all-linear α/r (5): select those" in message
    text = figure_texts(draw(plot_specs(both, Selection())["forgetting"]))
    assert "shipped default grid" in text


def test_the_forgetting_plot_says_when_it_shows_full_fine_tuning_only(practice):
    sel = dataclasses.replace(PRACTICE, targets=("q_proj", "v_proj"))  # no q,v LoRA run cached
    fn, (rows,), kwargs = plot_specs(practice.results(), sel)["forgetting"]
    assert {r["rank"] for r in rows} == {None}
    assert kwargs["title"].splitlines()[0] == "Learned vs kept (sort_desc, 200 steps, q,v, α/r)"
    title = " ".join(kwargs["title"].split())
    assert (
        "runs at every lr: 3 full fine-tuning; no LoRA run of this selection measured it" in title
    )


def test_lora_runs_that_kept_nothing_are_explained_in_the_plot(tmp_path):
    cache = SweepCache(tmp_path)
    for point in grid("sort_desc", [4], [16.0], targets="all-linear", steps=200, lrs=(1e-2,)):
        cache.put(practice_result(point, kept=0.0))
    fn, (rows,), kwargs = plot_specs(cache.results(), PRACTICE)["forgetting"]
    assert [r["source_accuracy"] for r in rows] == [0.0]
    title = " ".join(kwargs["title"].split())
    assert "LoRA at 0% kept: trained on the new task alone (no replay), it overwrote" in title
    assert "overwrote the pretraining skills" in " ".join(
        figure_texts(draw((fn, (rows,), kwargs))).split()
    )
    cache.put(practice_result(SweepPoint("sort_desc", 4, targets="all-linear", steps=200,
                                         lr=1e-3), kept=0.4))  # fmt: skip
    kept = plot_specs(SweepCache(tmp_path).results(), PRACTICE)["forgetting"][2]["title"]
    assert "0% kept" in kept  # one run still kept nothing
    alone = SweepCache(tmp_path / "kept")
    alone.put(practice_result(SweepPoint("sort_desc", 4, targets="all-linear", steps=200,
                                         lr=1e-3), kept=0.4))  # fmt: skip
    assert "0% kept" not in plot_specs(alone.results(), PRACTICE)["forgetting"][2]["title"]
