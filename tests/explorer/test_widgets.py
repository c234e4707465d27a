"""lab/widgets.py, headless: set control values, press Run with a fake trainer, read the images."""

from __future__ import annotations

import ipywidgets as W
import pytest
from explorer_fakes import (
    ALL6,
    FLAVOURS,
    PRACTICE,
    FakeTrainer,
    _is_plain,
    fake_result,
    figure_texts,
    is_png,
    lora_at,
    variants_grid_fixture,
)

from lab import plots
from lab.sweeps import (
    SweepCache,
    SweepPoint,
    describe,
    grid,
    load_grid_file,
)
from lab.widgets import (
    ALPHA_OPTIONS,
    METHODS,
    PLOTS,
    RANK_OPTIONS,
    SHIPPED_GRIDS,
    SHORT_TITLES,
    SWEEP_LRS,
    Selection,
    SweepExplorer,
    count_explorer,
    draw,
    estimate_seconds,
    method_name,
    plot_specs,
    point_label,
    seed_shipped,
    sweep_command,
    sweep_explorer,
    targets_text,
)


def test_explorer_opens_with_facts_and_a_drawn_plot(seeded):
    trainer = FakeTrainer()
    explorer = sweep_explorer(seeded, run_fn=trainer)
    assert explorer.facts() == {"selected": 22, "cached": 22, "to_train": 0}
    assert explorer.status_text() == "sort_desc: 22 points selected, 22 cached, 0 to train"
    assert "estimate" not in explorer.status_text()  # nothing to train: nothing to estimate
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
    assert explorer.facts()["selected"] == 0
    assert explorer.status_text() == "select at least one target"
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


# -- what each control and plot says -----------------------------------------------------------


def test_unchecking_full_fine_tuning_leaves_it_out_of_every_plot(seeded):
    on = plot_specs(seeded.results(), Selection())
    off = plot_specs(seeded.results(), Selection(full=False))
    assert "full fine-tuning" in on["loss"][1][0] and on["memory"][2]["full"] is not None
    assert "full fine-tuning" not in off["loss"][1][0]  # no curve
    assert off["memory"][2]["full"] is None  # no memory line
    assert off["trainable"][1][2] is None  # no count line
    assert all("full fine-tuning" not in figure_texts(draw(spec)) for spec in off.values())
    assert Selection(full=False).points() == Selection().points()[:-1]


def test_every_run_plot_title_names_the_scaling_rule(seeded):
    for rslora, rule in ((False, "α/r"), (True, "α/√r (rsLoRA)")):
        specs = plot_specs(seeded.results(), Selection(rslora=rslora))
        for name in ("memory", "loss", "accuracy", "dropout"):
            assert rule in specs[name][2]["title"], (name, specs[name][2]["title"])
    assert "α/√r" not in plot_specs(seeded.results(), Selection())["loss"][2]["title"]


def test_status_estimates_the_time_of_the_points_to_train(seeded):
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    explorer.ranks.value, explorer.alphas.value = (4, 8), (16.0,)
    explorer.steps.value = 1200  # nothing cached at 1200 steps: 2 LoRA points + full
    # fake cached runs took 0.1 s for 600 steps: 2 * 1200 / 600 * 0.1 + 1200 / 600 * 0.1
    assert (
        "3 to train (estimate: under a second at the cached runs' pace)" in explorer.status_text()
    )
    assert "estimate" in explorer.status.value


def test_legends_sit_outside_the_plot_area(seeded):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    specs = plot_specs(seeded.results(), Selection())
    for name in ("trainable", "memory", "loss"):
        fig = draw(specs[name])
        FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert legend is not None, name
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1, name


def test_targets_are_written_q_k_v_o_up_down_everywhere(seeded):
    assert targets_text(("v_proj", "down_proj", "q_proj", "o_proj", "k_proj")) == "q,k,v,o,down"
    point = SweepPoint("sort_desc", 8, targets=("v_proj", "o_proj", "k_proj", "q_proj"))
    assert point_label(point) == "r8 α16 q,k,v,o"
    sel = Selection(targets=("v_proj", "k_proj", "q_proj", "o_proj"))
    assert "LoRA on q,k,v,o)" in plot_specs([], sel)["trainable"][2]["title"]
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    explorer.targets.value = ("v_proj", "q_proj")
    assert explorer.selection.targets == ("q_proj", "v_proj")
    counts = count_explorer(targets=("v_proj", "q_proj"))
    assert "on q_proj, v_proj" in counts.children[-1].value


def test_an_empty_selection_says_what_to_select_in_every_plot(seeded):
    specs = plot_specs(seeded.results(), Selection(alphas=(), targets=()))
    for name, spec in specs.items():
        text = figure_texts(draw(spec))
        assert "select at least one alpha and one target" in text, name
        assert PLOTS[name] in text  # the plot keeps its title
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    explorer.dropouts.value = ()
    assert explorer.status_text() == "select at least one dropout"
    assert is_png(explorer.images["trainable"].value)


def test_count_explorer_chooses_units_by_size():
    tiny = count_explorer("tiny", rank=1, targets=("q_proj",)).children[-1].value
    assert "128 B" in tiny and "0.0 MB" not in tiny and "0.00 GB" not in tiny
    big = count_explorer().children[-1].value
    assert "75.5 MB" in big and "349 GB" in big


@pytest.mark.parametrize("method, quant", list(FLAVOURS))
def test_each_method_plots_its_own_runs_only(mixed, method, quant):
    sel = Selection(method=method, quant=quant, ranks=(1, 8, 64), alphas=(8.0, 16.0))
    offset = FLAVOURS[method, quant]
    specs = plot_specs(mixed.results(), sel)
    _, (ranks, alphas, table), _ = specs["accuracy"]
    expected = [[round(offset + r / 1000, 6)] * 2 for r in (1, 8, 64)]
    assert ranks == [1, 8, 64] and table == expected
    _, (curves,), _ = specs["loss"]
    assert list(curves) == ["r1 α16", "r8 α16", "r64 α16", "full fine-tuning"]
    assert curves["r8 α16"][0] == pytest.approx(offset + 3.0)  # this method's curve
    _, (mem_ranks, breakdowns), _ = specs["memory"]
    assert mem_ranks == [1, 8, 64] and len(breakdowns) == 3
    explorer = SweepExplorer(mixed, run_fn=FakeTrainer())
    explorer.method.value, explorer.quant.value = method, quant or "fp32"
    assert explorer.selection.flavour == {**METHODS[method], "quant": quant}
    assert explorer.facts() == {"selected": 22, "cached": 22, "to_train": 0}


def test_the_dropout_plot_shows_the_method_too(mixed):
    for method in ("LoRA", "DoRA"):
        _, (dropouts, train, _), _ = plot_specs(mixed.results(), Selection(method=method))[
            "dropout"
        ]
        assert dropouts == [0.0, 0.3]
        assert train == [FLAVOURS[method, None] + d for d in (0.0, 0.3)]
    assert plot_specs(mixed.results(), Selection(method="PiSSA"))["dropout"][1] == ([], [], [])


def test_the_default_selection_is_what_the_explorer_showed_before(seeded, mixed):
    """Plain LoRA on the fp32 base: the same points, numbers and titles as before methods."""
    assert Selection().points() == [
        *grid("sort_desc", [1, 2, 4, 8, 16, 32, 64], [8.0, 16.0, 32.0]),
        SweepPoint("sort_desc", None),
    ]
    plain = [r for r in mixed.results() if _is_plain(r.point)]
    assert len(plain) == 22 + 2  # the default grid and the two small-data runs
    with_others = plot_specs(mixed.results(), Selection())  # other methods in the cache
    assert repr(with_others) == repr(plot_specs(plain, Selection()))
    before = plot_specs(seeded.results(), Selection())
    first_view = ("trainable", "memory", "loss", "accuracy", "dropout")
    assert list(PLOTS)[:5] == list(first_view)  # the new tabs come after the old ones
    titles = {name: before[name][2]["title"] for name in first_view}
    assert titles == {
        "trainable": "Trainable parameters vs rank (LoRA on q,v)",
        "memory": "Memory of one training step vs rank (sort_desc, α/r)",
        "loss": "Training loss (sort_desc, 600 steps, α/r, α=16)",
        "accuracy": "Held-out accuracy (sort_desc, 600 steps, α/r, dropout 0)",
        "dropout": "Adapter dropout, small data (sort_desc_small, r8 α16, α/r, 600 steps)",
    }
    assert before["trainable"][0] is plots.trainable_vs_rank
    explorer = SweepExplorer(mixed, run_fn=FakeTrainer())
    assert (explorer.method.value, explorer.quant.value) == ("LoRA", "fp32")
    assert explorer.quant.index == 0 and explorer.method.index == 0  # a button shows as chosen
    assert explorer.selection == Selection()
    assert explorer.status_text() == "sort_desc: 22 points selected, 22 cached, 0 to train"


def test_every_title_names_a_method_other_than_plain_lora(mixed):
    for method, quant in FLAVOURS:
        sel = Selection(method=method, quant=quant)
        name = method + (" λ16" if method == "LoRA+" else "") + (", NF4 base" if quant else "")
        specs = plot_specs(mixed.results(), sel)
        assert f"({method} on q,v" in specs["trainable"][2]["title"]
        for plot in ("memory", "loss", "accuracy", "dropout"):
            title = specs[plot][2]["title"]
            assert (f"({name}, sort_desc" in title) == (not sel.is_plain), (plot, title)
        if quant:
            assert specs["trainable"][2]["title"].endswith("q,v, NF4 base)")
    dora = plot_specs(mixed.results(), Selection(method="DoRA"))["trainable"]
    assert "DoRA" in figure_texts(draw(dora))  # the curve's legend entry, not "LoRA"


def test_dora_counts_its_magnitude_vector(tmp_path):
    ranks = [1, 8, 64]
    _, (_, lora, full), _ = plot_specs([], Selection(ranks=tuple(ranks)))["trainable"]
    _, (_, dora, full_d), _ = plot_specs([], Selection(ranks=tuple(ranks), method="DoRA"))[
        "trainable"
    ]
    # one magnitude per output feature of each adapted layer: q and v (128 each) in 2 blocks
    assert [d - n for d, n in zip(dora, lora, strict=True)] == [2 * 2 * 128] * 3
    assert full_d == full
    for method in ("LoRA+", "PiSSA"):  # same A and B as LoRA: the same count
        sel = Selection(ranks=tuple(ranks), method=method, quant=None)
        assert plot_specs([], sel)["trainable"][1][1] == lora


def test_pissa_on_a_4_bit_base_says_what_to_change(mixed):
    sel = Selection(method="PiSSA", quant="nf4")
    assert sel.points() == []
    for name, spec in plot_specs(mixed.results(), sel).items():
        text = figure_texts(draw(spec))
        assert "PiSSA starts from the full-precision weights: choose the fp32 base" in text, name
    explorer = SweepExplorer(mixed, run_fn=FakeTrainer())
    explorer.quant.value = "nf4"
    explorer.method.value = "PiSSA"
    assert explorer.facts()["selected"] == 0
    assert "choose the fp32 base" in explorer.status_text()
    explorer.on_run()  # nothing selected: nothing trained
    assert explorer.run_fn.calls == []


def test_a_method_cached_elsewhere_says_where_to_look(tmp_path):
    cache = SweepCache(tmp_path)
    for point in grid("sort_desc", [4, 8], [16.0], steps=300, variant="dora"):
        cache.put(fake_result(point))
    sel = Selection(method="DoRA")
    specs = plot_specs(cache.results(), sel)
    where = "cached DoRA runs at lr 0.02: sort_desc, 300 steps: r4 α16, r8 α16"
    for name in ("memory", "loss", "accuracy"):
        assert where in figure_texts(draw(specs[name])), name
    assert specs["trainable"][0] is not plots.trainable_vs_rank  # counts need no runs
    explorer = SweepExplorer(cache, run_fn=FakeTrainer())
    explorer.method.value = "DoRA"
    assert where in explorer.status_text() and "0 cached, 22 to train" in explorer.status_text()
    explorer.steps.value = 300
    assert explorer.facts() == {"selected": 22, "cached": 2, "to_train": 20}
    assert "cached DoRA" not in explorer.status_text()
    # plain LoRA keeps its old empty plots: nothing of it is cached, no hint
    assert plot_specs(cache.results(), Selection())["loss"][1] == ({},)


def test_run_trains_the_selected_method(tmp_path):
    trainer = FakeTrainer()
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=trainer)
    explorer.ranks.value, explorer.alphas.value, explorer.full.value = (4,), (16.0,), False
    explorer.method.value, explorer.quant.value = "DoRA", "nf4"
    explorer.on_run()
    (point,) = trainer.calls
    assert (point.rank, point.variant, point.quant) == (4, "dora", "nf4")
    assert explorer.facts() == {"selected": 1, "cached": 1, "to_train": 0}


@pytest.mark.parametrize(
    "method, quant, lr, index",
    [
        ("LoRA", None, 1e-2, 0),
        ("DoRA", None, 2e-2, 3),
        ("LoRA+", None, 5e-3, 5),
        ("PiSSA", None, 1e-2, 6),
        ("LoRA", "nf4", 2e-2, 9),
    ],
)
def test_the_shipped_variants_grid_shows_in_the_explorer(tmp_path, method, quant, lr, index):
    grid_file = tmp_path / "variants_grid.json"
    points = variants_grid_fixture(grid_file)
    cache = SweepCache(tmp_path / "cache")
    cache.seed_from(grid_file)
    explorer = SweepExplorer(cache, run_fn=FakeTrainer())
    assert {2.5e-3, 5e-3, 1e-2, 2e-2} <= {value for _, value in explorer.lr.options}
    assert explorer.lr.value == 2e-2  # the default lr, as before
    explorer.ranks.value, explorer.alphas.value = (4,), (16.0,)
    explorer.steps.value, explorer.full.value = 400, False
    explorer.method.value, explorer.quant.value = method, quant or "fp32"
    explorer.lr.value = lr
    assert explorer.selection.points() == [points[index]]
    assert explorer.facts() == {"selected": 1, "cached": 1, "to_train": 0}
    specs = plot_specs(cache.results(), explorer.selection)
    assert specs["accuracy"][1][2] == [[round(0.1 * index + 4 / 1000, 6)]]
    assert "r4 α16" in specs["loss"][1][0]
    assert method_name(explorer.selection) in specs["loss"][2]["title"]
    assert f"lr {lr:g}" in specs["loss"][2]["title"] or lr == 2e-2


def test_a_method_at_an_uncached_lr_lists_the_cached_lrs(tmp_path):
    grid_file = tmp_path / "variants_grid.json"
    variants_grid_fixture(grid_file)
    cache = SweepCache(tmp_path / "cache")
    cache.seed_from(grid_file)
    sel = Selection(method="LoRA+", ranks=(4,), alphas=(16.0,), steps=400, full=False)
    text = figure_texts(draw(plot_specs(cache.results(), sel)["accuracy"]))
    assert "no LoRA+ λ16 run of this selection is cached" in text
    assert (
        "cached LoRA+ λ16 runs, none at lr 0.02: sort_desc, 400 steps: r4 α16 lr 0.0025, "
        "r4 α16 lr 0.005" in text
    )


def test_every_shipped_variant_run_can_be_shown_by_the_controls(tmp_path):
    """Each run of lab/data/variants_grid.json is one setting of the explorer's controls away."""
    path = SHIPPED_GRIDS[1]
    assert path.name == "variants_grid.json"
    if not path.exists():
        pytest.skip(f"{path} is not built yet (scripts/make_variants_grid.py)")
    cache = SweepCache(tmp_path)
    shipped_now = [p for p in SHIPPED_GRIDS if p.exists()]  # the practice grid may be missing
    assert seed_shipped(cache) == sum(len(load_grid_file(p)) for p in shipped_now)
    explorer = SweepExplorer(cache, run_fn=FakeTrainer())
    lrs = {value for _, value in explorer.lr.options}
    shipped = load_grid_file(path)
    assert shipped
    for result in shipped:
        p = result.point
        method = next(
            m for m, f in METHODS.items()
            if (f["variant"], f["init"], f["lr_ratio"]) == (p.variant, p.init, p.lr_ratio)
        )  # fmt: skip
        assert p.rank in RANK_OPTIONS and p.alpha in ALPHA_OPTIONS and p.lr in lrs, describe(p)
        assert (p.batch_size, p.seed, p.dropout) == (64, 0, 0.0), describe(p)
        explorer.method.value, explorer.quant.value = method, p.quant or "fp32"
        explorer.lr.value, explorer.steps.value = p.lr, p.steps
        explorer.scaling.value, explorer.targets.value = p.rslora, p.targets
        explorer.ranks.value, explorer.alphas.value = (p.rank,), (p.alpha,)
        explorer.full.value = False
        assert explorer.selection.points() == [p], describe(p)
        assert explorer.facts() == {"selected": 1, "cached": 1, "to_train": 0}, describe(p)


# -- learning rate, forgetting and all-linear -------------------------------------------------


def test_the_lr_plot_without_a_sweep_says_what_is_cached_and_what_to_run(seeded, practice):
    results = seeded.results() + practice.results()
    fn, (title, message), _ = plot_specs(results, Selection())["lr"]
    assert fn is not plots.accuracy_vs_lr and title == PLOTS["lr"]
    assert "only lr 0.02 is cached for this selection at α=16" in message
    assert "cached lr sweeps of sort_desc: 200 steps, all-linear, α16, α/r: r1, r4" in message
    todo = len(Selection(lr_sweep=True).points()) - 22
    assert f"press 'sweep lr' and Run: {todo} points" in message
    assert sweep_command(Selection()) in " ".join(message.split())  # wrapped to fit the plot
    assert sweep_command(Selection()) == (
        "python -m lab sweep --task sort_desc --ranks 1 2 4 8 16 32 64 --alphas 8 16 32 "
        "--targets q v --steps 600 --lr 0.0001 0.0003 0.001 0.003 0.01 0.02 0.03 0.1 "
        "--full --full-lr 0.0001 0.0003 0.001 0.003 0.01 0.03 0.1"
    )
    dora = sweep_command(Selection(method="DoRA", quant="nf4", targets=ALL6, rslora=True))
    assert "--targets all-linear --rslora --variant dora --quant nf4" in dora
    assert "only lr" not in plot_specs([], Selection())["lr"][1][1]  # nothing cached at all
    assert "no run is cached" in plot_specs([], Selection())["lr"][1][1]


def test_sweep_lr_makes_run_train_the_lr_axis_and_the_status_count_it(tmp_path):
    sel = Selection(ranks=(4,), alphas=(16.0,), lr_sweep=True)
    points = sel.points()
    lora = [p for p in points if not p.is_full]
    assert [p.lr for p in lora] == sorted({0.02, *SWEEP_LRS})  # the chosen lr and the sweep
    assert sorted(p.lr for p in points if p.is_full) == sorted(SWEEP_LRS)  # 1e-3 among them
    assert sel.one_lr.points() == Selection(ranks=(4,), alphas=(16.0,)).points()
    trainer = FakeTrainer()
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=trainer)
    explorer.ranks.value, explorer.alphas.value = (4,), (16.0,)
    explorer.lr_sweep.value = True
    assert list(PLOTS)[explorer.tabs.selected_index] == "lr"  # the sweep's plot opens
    n = len(points)
    assert explorer.status_text().startswith(f"sort_desc: {n} points selected, 0 cached, {n} to")
    assert "estimate" in explorer.status_text()
    explorer.on_run()  # nothing cached: about 9 min at a laptop's pace, so Run asks first
    assert trainer.calls == [] and explorer.pending is not None
    explorer.on_confirm()
    assert set(trainer.calls) == set(points)
    assert explorer.facts() == {"selected": n, "cached": n, "to_train": 0}
    assert is_png(explorer.images["lr"].value)


def test_all_linear_is_a_targets_choice_written_all_linear(seeded):
    assert targets_text(ALL6[::-1]) == "all-linear" and targets_text(ALL6[:5]) == "q,k,v,o,up"
    assert point_label(SweepPoint("sort_desc", 4, targets="all-linear")) == "r4 α16 all-linear"
    assert "LoRA on all-linear)" in plot_specs([], PRACTICE)["trainable"][2]["title"]
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    assert explorer.all_linear.value is False and explorer.all_linear.description == "all-linear"
    explorer.all_linear.value = True
    assert set(explorer.selection.targets) == set(ALL6)
    assert explorer.selection.points()[0] == SweepPoint("sort_desc", 1, 8.0, targets="all-linear")
    explorer.targets.value = ("q_proj", "k_proj")
    assert explorer.all_linear.value is False  # no longer every layer
    explorer.targets.value = ALL6
    assert explorer.all_linear.value is True
    explorer.all_linear.value = False
    assert explorer.selection.targets == ("q_proj", "v_proj")  # back to the paper's choice


def test_new_tabs_follow_the_old_ones_and_every_plot_has_a_short_title(seeded):
    assert list(PLOTS) == ["trainable", "memory", "loss", "accuracy", "dropout", "lr", "forgetting"]
    assert list(SHORT_TITLES) == list(PLOTS)
    explorer = SweepExplorer(seeded, run_fn=FakeTrainer())
    assert explorer.tabs.titles == tuple(PLOTS.values())
    assert bytes(explorer.images["lr"].value) == b""  # not drawn until opened: the first view
    explorer.refresh(all_tabs=True)
    assert all(is_png(image.value) for image in explorer.images.values())


# -- the status line, Run's confirmation, estimates that learn, interrupted runs -------------


def test_the_status_lists_runs_at_the_rate_its_heading_names(tmp_path):
    cache = SweepCache(tmp_path)
    for lr in (1e-3, 1e-2, 2e-2):
        cache.put(fake_result(lora_at(lr)))
    explorer = SweepExplorer(cache, run_fn=FakeTrainer())
    explorer.lr.value = 1e-2  # nothing of the 600-step grid at lr 0.01 is cached
    text = explorer.status_text()
    assert "cached LoRA runs at lr 0.01: sort_desc, 300 steps: r4 α16" in text
    assert "lr 0.001" not in text and "lr 0.02" not in text  # only what the heading names
    explorer.lr.value = 4e-2  # no run at all at lr 0.04: the heading says so, each run its lr
    text = explorer.status_text()
    assert "cached LoRA runs, none at lr 0.04: sort_desc, 300 steps: r4 α16 lr 0.001, " in text
    assert "r4 α16 lr 0.01, r4 α16 lr 0.02" in text


def test_the_status_hint_stays_short_with_many_grids_cached(tmp_path):
    cache = SweepCache(tmp_path)
    for steps in (100, 200, 300, 400, 500):
        cache.put(fake_result(lora_at(1e-2, steps=steps)))
    explorer = SweepExplorer(cache, run_fn=FakeTrainer())
    explorer.lr.value = 1e-2
    assert explorer.status_text().endswith("300 steps: r4 α16; and 2 more grids")


def big_selection(explorer: SweepExplorer) -> None:
    """Ranks 4 and 8 and full fine-tuning at 2000 steps on an empty cache: 3 points, about 6 min
    at a laptop's pace, over CONFIRM_SECONDS. Few points, so few redraws once confirmed."""
    explorer.ranks.value, explorer.alphas.value, explorer.full.value = (4, 8), (16.0,), True
    explorer.steps.value = 2000


def test_a_large_run_waits_for_a_confirmation_that_shows_its_count_and_time(tmp_path):
    trainer = FakeTrainer()
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=trainer)
    explorer.lr_sweep.value = True
    assert explorer.facts()["to_train"] == 175  # the default grid's lr sweep: hours of training
    explorer.lr_sweep.value = False
    big_selection(explorer)
    n = explorer.facts()["to_train"]
    assert n == 3
    explorer.on_run()
    explorer.on_run()  # a double click on Run asks once and trains nothing
    assert trainer.calls == []
    assert explorer.confirm_button.layout.display != "none"
    estimate = explorer.estimate_text(explorer._todo()).split(" at ")[0]
    assert explorer.confirm_button.description == f"Train {n} points ({estimate})"
    assert f"a large run: {n} points, {estimate} at the cached runs' pace" in (
        explorer.status_text()
    )
    explorer.on_cancel()
    assert explorer.pending is None and explorer.confirm_button.layout.display == "none"
    assert "cancelled: nothing trained" in explorer.status_text()
    explorer.on_confirm()  # a Confirm after Cancel trains nothing
    assert trainer.calls == []
    explorer.on_run()
    explorer.on_confirm()
    explorer.on_confirm()  # a double click on Confirm: the second finds nothing left to confirm
    assert len(trainer.calls) == n and len(set(trainer.calls)) == n
    assert explorer.confirm_button.layout.display == "none"


def test_a_confirmation_lapses_when_the_selection_changes(tmp_path):
    trainer = FakeTrainer()
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=trainer)
    big_selection(explorer)
    explorer.on_run()
    explorer.steps.value = 1000  # another grid: the count and time asked about no longer hold
    assert explorer.pending is None and explorer.confirm_button.layout.display == "none"
    assert "the selection changed: press Run again" in explorer.status_text()
    explorer.on_confirm()
    assert trainer.calls == []


def test_a_small_run_trains_at_once(tmp_path):
    trainer = FakeTrainer()
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=trainer)
    explorer.ranks.value, explorer.alphas.value, explorer.full.value = (4,), (16.0,), False
    explorer.on_run()  # 600 steps at a laptop's pace: about 36 s
    assert len(trainer.calls) == 1 and explorer.pending is None


class SlowTrainer(FakeTrainer):
    """Fake runs that report `seconds` of wall time each."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, point, device=None, progress=True):
        result = super().__call__(point, device, progress)
        result.wall_seconds = self.seconds
        return result


def test_the_estimate_learns_the_pace_of_the_runs_just_measured(tmp_path):
    """Cached runs took 59 s a point; a run here took 360 s: the next estimate says 360 s."""
    cache = SweepCache(tmp_path)
    for rank in (1, 2, 8, 16):
        result = fake_result(lora_at(2e-2, rank, steps=600))
        result.wall_seconds = 59.0
        cache.put(result)
    explorer = SweepExplorer(cache, run_fn=SlowTrainer(360.0))
    explorer.full.value, explorer.alphas.value = False, (16.0,)
    explorer.ranks.value = (4,)
    explorer.steps.value = 600
    todo = explorer._todo()
    assert estimate_seconds(todo, cache.results()) == pytest.approx(59.0)
    explorer.on_run()
    assert explorer.measured[-1].wall_seconds == 360.0
    explorer.ranks.value = (32, 64)  # two more points of the same kind
    assert estimate_seconds(explorer._todo(), cache.results(), explorer.measured) == (
        pytest.approx(720.0)
    )
    assert "(estimate: 12 min at the pace of the last run here)" in explorer.status_text()
    # 12 min is over the confirmation threshold now: Run asks instead of training
    explorer.on_run()
    assert explorer.pending is not None and len(explorer.run_fn.calls) == 1


class InterruptedTrainer(FakeTrainer):
    """Trains `n` points, then the student presses the kernel's stop button (Ctrl-C)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __call__(self, point, device=None, progress=True):
        if len(self.calls) == self.n:
            raise KeyboardInterrupt
        return super().__call__(point, device, progress)


def test_a_run_stopped_midway_keeps_what_it_trained_and_says_how_far_it_got(tmp_path):
    cache = SweepCache(tmp_path)
    explorer = SweepExplorer(cache, run_fn=InterruptedTrainer(2))
    explorer.ranks.value, explorer.alphas.value, explorer.full.value = (1, 2, 4, 8), (16.0,), False
    explorer.steps.value = 100  # a small run: no confirmation
    with pytest.raises(KeyboardInterrupt):
        explorer.run()  # called from code: the interrupt reaches the caller
    assert sorted(r.point.rank for r in SweepCache(tmp_path).results()) == [1, 2]  # kept
    assert not explorer.run_button.disabled and not explorer.running
    assert "stopped after 2 of 4: the 2 points trained are cached; Run trains the rest" in (
        explorer.status_text()
    )
    assert explorer.facts() == {"selected": 4, "cached": 2, "to_train": 2}
    explorer.run_fn = InterruptedTrainer(1)
    explorer.on_run()  # from the button: said in the status, nothing raised
    assert "stopped after 1 of 2" in explorer.status_text()
    assert sorted(r.point.rank for r in SweepCache(tmp_path).results()) == [1, 2, 4]


def test_a_click_that_arrives_during_a_run_starts_nothing(tmp_path):
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=FakeTrainer())
    explorer.ranks.value, explorer.alphas.value = (4,), (16.0,)
    explorer.running = True  # as while run() trains
    explorer.on_run()
    explorer.on_confirm()
    assert explorer.run_fn.calls == []


def test_an_empty_cache_opens_estimates_and_draws_every_tab(tmp_path):
    explorer = SweepExplorer(SweepCache(tmp_path / "empty"), run_fn=FakeTrainer())
    assert explorer.facts() == {"selected": 22, "cached": 0, "to_train": 22}
    assert "22 to train (estimate: " in explorer.status_text()
    explorer.refresh(all_tabs=True)
    assert all(is_png(image.value) for image in explorer.images.values())
    explorer.ranks.value, explorer.alphas.value, explorer.dropouts.value = (), (), ()
    assert explorer.status_text() == "select at least one rank, one alpha and one dropout"
    explorer.on_run()
    assert explorer.run_fn.calls == [] and explorer.pending is None


def test_run_on_a_selection_that_names_no_point_leaves_no_message_behind(tmp_path):
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=FakeTrainer())
    explorer.method.value, explorer.quant.value = "PiSSA", "nf4"  # PiSSA needs the fp32 base
    explorer.on_run()
    explorer.quant.value = "fp32"
    assert explorer.message == "" and "nothing to train" not in explorer.status_text()
    assert explorer.run_fn.calls == []


def test_run_says_in_its_log_when_the_machine_is_busy(tmp_path, monkeypatch, capsys):
    """A batched run too (no lab.train call): the line goes where the run's progress goes (the
    log, in a kernel; stderr here)."""
    from lab import threads

    monkeypatch.setattr(threads, "_busy_said", False)
    monkeypatch.delenv(threads.BUSY_ENV_VAR, raising=False)
    monkeypatch.setattr(threads, "load_average", lambda: 50.0)
    explorer = SweepExplorer(SweepCache(tmp_path), run_fn=FakeTrainer())
    explorer.ranks.value, explorer.alphas.value, explorer.full.value = (4,), (16.0,), False
    explorer.on_run()
    assert "the machine is busy (load average 50.0" in capsys.readouterr().err
