"""The sweep explorer: ipywidgets controls over a cached grid of LoRA runs, and its plots.

Controls choose a grid (task, method, 4-bit base or not, ranks, alphas, dropouts, targets,
scaling rule, steps, learning rate, and whether learning rate is swept too); the plots
show whatever of that grid is already in the `SweepCache`, so moving a control only redraws
(from disk, in well under a second) and never trains. Training happens only when Run is pressed,
and only for points not cached yet. Plots are `ipywidgets.Image`s whose PNG bytes are replaced
in place, so nothing flickers, and a test can read them without a browser.

Everything the callbacks compute comes from pure functions: `lab.sweeps` for the data and
`lab.plots` for the figures; `plot_specs` joins the two and is tested on its own.

Two plots read across the grid's other axes: accuracy against learning rate (one curve per
rank, full fine-tuning dashed, each curve's best lr ringed) and the learn-forget scatter (new
task learned against the pretraining skills kept, for every cached run that measured them).

The method control picks the LoRA flavour of the plotted runs: plain LoRA, each registered
variant (DoRA), LoRA+ (B's learning rate 16 times A's) and each registered initialisation
(PiSSA); the base control picks runs on the fp32 base or on a 4-bit NF4 one (QLoRA).
"""

from __future__ import annotations

import html
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as W
from matplotlib.figure import Figure

from . import plots, threads
from .analysis import ATTENTION, canonical_targets, describe_counts, lora_counts
from .config import ALL_LINEAR

# What the explorer is made of, re-exported: lab.widgets stays the one place to import it from.
from .explorer.choices import (
    ALPHA_OPTIONS,
    CONFIRM_SECONDS,
    DROPOUT_OPTIONS,
    LR_OPTIONS,
    METHODS,
    PLOTS,
    QUANT_SCHEME,
    RANK_OPTIONS,
    RECENT_RUNS,
    SECONDS_PER_STEP,
    SHIPPED_GRIDS,
    SHORT_TITLES,
    SWEEP_LRS,
    TARGET_OPTIONS,
    Selection,
    _method_tooltip,
    _problem,
    cached_elsewhere,
    method_name,
    missing_choices,
    point_label,
    scaling_name,
    seed_shipped,
    targets_text,
)
from .explorer.estimates import estimate_seconds, format_duration, slowdown
from .explorer.plots import _points, draw, plot_specs, sweep_command
from .model import PRESETS
from .sweeps import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    SweepCache,
    SweepPoint,
    SweepResult,
    sweep,
)
from .tasks import FINETUNE_TASKS

__all__ = [
    "ALPHA_OPTIONS",
    "CONFIRM_SECONDS",
    "METHODS",
    "PLOTS",
    "RANK_OPTIONS",
    "SECONDS_PER_STEP",
    "SHIPPED_GRIDS",
    "SHORT_TITLES",
    "SWEEP_LRS",
    "count_explorer",
    "draw",
    "estimate_seconds",
    "format_duration",
    "method_name",
    "missing_choices",
    "plot_specs",
    "point_label",
    "scaling_name",
    "seed_shipped",
    "Selection",
    "slowdown",
    "sweep_command",
    "sweep_explorer",
    "SweepExplorer",
    "targets_text",
]


class SweepExplorer:
    """Controls, plots and a Run button over a SweepCache; display it in a notebook cell."""

    def __init__(
        self,
        cache: SweepCache | None = None,
        *,
        run_fn: Callable[..., SweepResult] | None = None,
        device: Any = None,
        selection: Selection | None = None,
    ) -> None:
        self.cache = cache if cache is not None else SweepCache()
        self.run_fn, self.device = run_fn, device
        sel = selection or Selection()
        self.message = ""  # what the last run did, shown after the counts
        self.measured: list[SweepResult] = []  # runs trained here, newest last: their pace
        self.pending: tuple[SweepPoint, ...] | None = None  # a large run waiting for Confirm
        self.running = False
        self.redraw_seconds = 0.0
        self._drawn: dict[str, str] = {}  # plot -> repr of the arguments it was drawn from
        self._specs: dict[str, tuple[Callable[..., Figure], tuple, dict]] = {}

        column = W.Layout(width="140px")
        self.task = W.Dropdown(options=FINETUNE_TASKS, value=sel.task, description="task")
        self.ranks = W.SelectMultiple(options=RANK_OPTIONS, value=sel.ranks, rows=7, layout=column)
        self.alphas = W.SelectMultiple(
            options=[(f"{a:g}", a) for a in ALPHA_OPTIONS], value=sel.alphas, rows=7, layout=column
        )
        self.dropouts = W.SelectMultiple(
            options=[(f"{d:g}", d) for d in DROPOUT_OPTIONS],
            value=sel.dropouts,
            rows=7,
            layout=column,
        )
        self.targets = W.SelectMultiple(
            options=TARGET_OPTIONS, value=sel.targets, rows=7, layout=column
        )
        # all-linear: every linear of the blocks, as PEFT's target_modules="all-linear" (the
        # six names of the list above: a point normalises "all-linear" to them).
        self.all_linear = W.ToggleButton(
            value=set(sel.targets) == set(ALL_TARGETS),
            description=ALL_LINEAR,
            tooltip="every linear layer of the blocks: q, k, v, o, up, down (never the head)",
            layout=W.Layout(width="140px"),
        )
        self.scaling = W.ToggleButtons(
            options=[("α/r", False), ("α/√r (rsLoRA)", True)],
            value=sel.rslora,
            description="scaling",
            # The label as wide as the dropdown's and the slider's above and below it.
            style={"button_width": "110px", "description_width": "80px"},
            # JupyterLab stacks a ToggleButtons' label above its buttons; keep them on one row.
            layout=W.Layout(display="flex", flex_flow="row", align_items="center"),
        )
        self.steps = W.IntSlider(
            value=sel.steps, min=20, max=2000, step=20, description="steps",
            continuous_update=False,
        )  # fmt: skip
        self.full = W.Checkbox(value=sel.full, description="with full fine-tuning", indent=False)
        # A menu, not a row of buttons: it holds every registered flavour, however many there
        # are, at the width of the task menu above it. Its tooltip names the chosen one's source.
        self.method = W.Dropdown(
            options=list(METHODS),
            value=sel.method,
            description="method",
            tooltip=_method_tooltip(sel.method),
        )
        self.method.observe(
            lambda change: setattr(self.method, "tooltip", _method_tooltip(change["new"])),
            names="value",
        )
        lrs = {r.point.lr for r in self.cache.results() if not r.point.is_full}
        self.lr = W.Dropdown(
            options=[(f"{lr:g}", lr) for lr in sorted({*LR_OPTIONS, *lrs, sel.lr})],
            value=sel.lr,
            description="lr",
        )
        self.lr_sweep = W.ToggleButton(
            value=sel.lr_sweep,
            description="sweep lr",
            tooltip="Run also trains every lr of " + ", ".join(f"{lr:g}" for lr in SWEEP_LRS)
            + " (full fine-tuning too); the Learning rate tab plots accuracy against lr",
            layout=W.Layout(width="110px"),
        )  # fmt: skip
        self.quant = W.ToggleButtons(  # the frozen base: 4-bit on or off
            # "fp32" stands for quant None: a ToggleButtons whose value is None shows no choice.
            options=[("fp32", "fp32"), (f"4-bit {QUANT_SCHEME.upper()}", QUANT_SCHEME)],
            value=sel.quant or "fp32",
            description="base",
            tooltips=["the shipped full-precision base", "QLoRA: the frozen base in 4 bits"],
            style={"button_width": "110px", "description_width": "80px"},
            layout=W.Layout(display="flex", flex_flow="row", align_items="center"),
        )
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        # A large run (over CONFIRM_SECONDS) waits for these: they show its count and time.
        hidden = W.Layout(display="none")
        self.confirm_button = W.Button(button_style="warning", icon="check", layout=hidden)
        self.cancel_button = W.Button(description="Cancel", layout=W.Layout(display="none"))
        self.status = W.HTML()
        self.log = W.Output(layout=W.Layout(max_height="120px", overflow="auto"))
        self.images = {
            name: W.Image(format="png", layout=W.Layout(width="700px", height="400px"))
            for name in PLOTS
        }

        def labelled(text: str, widget: W.Widget) -> W.VBox:
            return W.VBox([W.HTML(f"<b>{text}</b>"), widget])

        settings = W.VBox(
            [
                self.task,
                self.method,
                self.quant,
                self.scaling,
                self.steps,
                W.HBox([self.lr, self.lr_sweep]),
                self.full,
                W.HBox([self.run_button, self.confirm_button, self.cancel_button]),
            ]
        )
        lists = W.HBox(
            [
                labelled("rank r", self.ranks),
                labelled("alpha α", self.alphas),
                labelled("adapter dropout", self.dropouts),
                W.VBox([W.HTML("<b>targets</b>"), self.targets, self.all_linear]),
            ]
        )
        self.tabs = W.Tab(children=list(self.images.values()), titles=list(PLOTS.values()))
        # The two control groups wrap onto two rows when JupyterLab's side bar makes room scarce.
        top = W.HBox([settings, lists], layout=W.Layout(flex_flow="row wrap"))
        self.widget = W.VBox([top, self.status, self.tabs, self.log])  # log below: plots never move

        for control in self.controls:
            control.observe(lambda _change: self.refresh(), names="value")
        self.all_linear.observe(self._on_all_linear, names="value")
        self.targets.observe(self._sync_all_linear, names="value")
        self.lr_sweep.observe(self._on_lr_sweep, names="value")
        self.tabs.observe(lambda change: self._draw(list(PLOTS)[change["new"]]), "selected_index")
        self.run_button.on_click(self.on_run)
        self.confirm_button.on_click(self.on_confirm)
        self.cancel_button.on_click(self.on_cancel)
        self.refresh()

    # -- state ------------------------------------------------------------------------------

    @property
    def controls(self) -> list[W.ValueWidget]:
        """The widgets whose values make the selection."""
        return [
            self.task,
            self.ranks,
            self.alphas,
            self.dropouts,
            self.targets,
            self.scaling,
            self.steps,
            self.full,
            self.method,
            self.quant,
            self.lr,
            self.lr_sweep,
        ]

    @property
    def selection(self) -> Selection:
        """The controls' current values."""
        return Selection(
            task=self.task.value,
            ranks=tuple(self.ranks.value),
            alphas=tuple(float(a) for a in self.alphas.value),
            dropouts=tuple(float(d) for d in self.dropouts.value),
            targets=canonical_targets(self.targets.value),
            rslora=bool(self.scaling.value),
            steps=int(self.steps.value),
            full=bool(self.full.value),
            method=self.method.value,
            quant=None if self.quant.value == "fp32" else self.quant.value,
            lr=float(self.lr.value),
            lr_sweep=bool(self.lr_sweep.value),
        )

    def facts(self) -> dict[str, int]:
        """How many points are selected, cached and still to train."""
        points = self.selection.points()
        cached = sum(p in self.cache for p in points)
        return {"selected": len(points), "cached": cached, "to_train": len(points) - cached}

    def status_text(self) -> str:
        """The status line as plain text (the HTML label shows the same)."""
        sel = self.selection
        problem = _problem(sel)
        if problem:
            return problem
        points = sel.points()
        todo = [p for p in points if p not in self.cache]
        what = sel.task if sel.is_plain else f"{sel.task}, {method_name(sel)}"
        text = f"{what}: {_points(len(points))} selected, {len(points) - len(todo)} cached, "
        text += f"{len(todo)} to train"
        if todo:
            results = self.cache.results()
            text += f" (estimate: {self.estimate_text(todo, results)})"
            if not sel.is_plain and all(p in todo for p in points if not p.is_full):
                elsewhere = cached_elsewhere(results, sel)
                text += f"; {elsewhere}" if elsewhere else ""
        return f"{text}. {self.message}" if self.message else text

    def estimate_text(
        self, todo: Sequence[SweepPoint], results: Sequence[SweepResult] | None = None
    ) -> str:
        """'21 min at the cached runs' pace' or '2 h at the pace of the last 3 runs here'."""
        results = self.cache.results() if results is None else results
        seconds = estimate_seconds(todo, results, self.measured)
        duration = format_duration(seconds).removeprefix("about ")
        used = [r for r in self.measured[-RECENT_RUNS:] if r.wall_seconds > 0]
        if not used:
            return f"{duration} at the cached runs' pace"
        runs = "last run" if len(used) == 1 else f"last {len(used)} runs"
        return f"{duration} at the pace of the {runs} here"

    def _on_all_linear(self, change: dict) -> None:
        """all-linear pressed: select every target; released: back to the paper's q, v."""
        if change["new"]:
            self.targets.value = ALL_TARGETS
        elif set(self.targets.value) == set(ALL_TARGETS):
            self.targets.value = DEFAULT_TARGETS

    def _sync_all_linear(self, change: dict) -> None:
        """The all-linear button shows pressed exactly when every target is selected."""
        self.all_linear.value = set(change["new"]) == set(ALL_TARGETS)

    def _on_lr_sweep(self, change: dict) -> None:
        """Sweeping lr opens the Learning rate tab, where the sweep is plotted."""
        if change["new"]:
            self.tabs.selected_index = list(PLOTS).index("lr")

    # -- drawing ----------------------------------------------------------------------------

    def figures(self) -> dict[str, Figure]:
        """The plots for the current selection, from the cache."""
        specs = plot_specs(self.cache.results(), self.selection)
        return {name: draw(spec) for name, spec in specs.items()}

    def refresh(self, all_tabs: bool = False) -> None:
        """Update the status line and redraw the visible plot (or all) if its data changed.

        Hidden tabs are drawn when they are opened: each PNG takes a few tenths of a second to
        render, and drawing only what is seen keeps a redraw well under a second.
        """
        start = time.perf_counter()
        if self.pending is not None and tuple(self._todo()) != self.pending:
            self._ask(None)  # the selection changed: what Confirm would train is gone
            self.message = "the selection changed: press Run again to train it"
        self.status.value = html.escape(self.status_text())
        self._specs = plot_specs(self.cache.results(), self.selection)
        visible = list(PLOTS)[self.tabs.selected_index or 0]
        for name in list(PLOTS) if all_tabs else [visible]:
            self._draw(name)
        self.redraw_seconds = time.perf_counter() - start

    def _draw(self, name: str) -> None:
        """Render one plot into its Image, unless it already shows these data."""
        fn, args, kwargs = self._specs[name]
        drawn = repr((fn.__name__, args, kwargs))
        if self._drawn.get(name) != drawn:  # unchanged data: keep the image, skip the work
            self.images[name].value = plots.savefig_bytes(draw(self._specs[name]))
            self._drawn[name] = drawn

    # -- training ---------------------------------------------------------------------------

    def _todo(self) -> list[SweepPoint]:
        return [p for p in self.selection.points() if p not in self.cache]

    def _ask(self, todo: Sequence[SweepPoint] | None) -> None:
        """Show Confirm and Cancel for `todo` (a large run), or hide them (None)."""
        self.pending = None if todo is None else tuple(todo)
        shown = W.Layout(display="none") if todo is None else W.Layout(width="auto")
        if todo is not None:
            estimate = self.estimate_text(todo).split(" at ")[0]
            self.confirm_button.description = f"Train {_points(len(todo))} ({estimate})"
        self.confirm_button.layout, self.cancel_button.layout = (
            shown,
            W.Layout(display="none" if todo is None else "inline-flex"),
        )

    def run(self) -> list[SweepResult]:
        """Train the selected points that are not cached yet (with progress bars); redraw.

        Called from code it trains at once; the Run button asks first when the run is large
        (`on_run`). Each result is cached as it arrives, so an interrupted run (Ctrl-C, the
        kernel's stop button) keeps what it finished; the status line says how far it got.
        """
        points = self.selection.points()
        todo = [p for p in points if p not in self.cache]
        done: list[SweepResult] = []
        start = time.perf_counter()

        def after_each(result: SweepResult) -> None:
            done.append(result)
            self.measured.append(result)
            left = todo[len(done) :]
            self.message = f"trained {len(done)} of {len(todo)}"
            if left:
                self.message += f"; {self.estimate_text(left)} left"
            self.refresh()

        self._ask(None)
        self.running, self.run_button.disabled = True, True
        try:
            with self.log:
                threads.training_threads()  # the lab's thread rule; a busy machine is said here
                sweep(
                    todo, self.cache, progress=True, device=self.device,
                    run_fn=self.run_fn, on_result=after_each,
                )  # fmt: skip
        except KeyboardInterrupt:
            self.message = (
                f"stopped after {len(done)} of {len(todo)}: the {_points(len(done))} trained "
                f"are cached; Run trains the rest"
            )
            self.refresh()
            raise
        finally:
            self.running, self.run_button.disabled = False, False
        seconds = time.perf_counter() - start
        self.message = (
            f"last run trained {_points(len(todo))} in {seconds:.0f} s"
            if todo
            else "the last Run had nothing to train: every point it selected was cached"
        )
        self.refresh()
        return [self.cache.get(p) for p in points]

    def on_run(self, _button: W.Button | None = None) -> None:
        """The Run button's handler: run(), asking first when it is large; errors to the status.

        A run estimated at more than CONFIRM_SECONDS only shows Confirm (its point count and
        time) and Cancel; nothing trains until Confirm is pressed for the same selection.
        """
        if self.running or _problem(self.selection):  # a click during a run, or nothing to name
            return  # (the status line already says what to select)
        todo = self._todo()
        if todo and estimate_seconds(todo, self.cache.results(), self.measured) > CONFIRM_SECONDS:
            self._ask(todo)
            self.message = (
                f"a large run: {_points(len(todo))}, {self.estimate_text(todo)}; press "
                f"'{self.confirm_button.description}' to start it, or Cancel"
            )
            self.refresh()
            return
        self._guarded_run()

    def on_confirm(self, _button: W.Button | None = None) -> None:
        """Confirm: train the large run Run asked about, if the selection still names it."""
        if self.running or self.pending is None:
            return  # a second click, or one after the selection changed (refresh said so)
        if tuple(self._todo()) != self.pending:
            self._ask(None)
            self.message = "the selection changed: press Run again to train it"
            self.refresh()
            return
        self._guarded_run()

    def on_cancel(self, _button: W.Button | None = None) -> None:
        """Cancel: forget the large run Run asked about; nothing trains."""
        if self.pending is not None:
            self._ask(None)
            self.message = "cancelled: nothing trained"
            self.refresh()

    def _guarded_run(self) -> None:
        try:
            self.run()
        except KeyboardInterrupt:  # run() said how far it got; a button has no caller to tell
            pass
        except Exception as exc:  # a widget callback has nowhere else to report to
            self.message = f"error: {type(exc).__name__}: {exc}"
            self.status.value = (
                f"<span style='color:#D55E00'>{html.escape(self.status_text())}</span>"
            )
            with self.log:
                traceback.print_exc()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def sweep_explorer(
    cache: SweepCache | None = None,
    *,
    run_fn: Callable[..., SweepResult] | None = None,
    device: Any = None,
) -> SweepExplorer:
    """A SweepExplorer over `cache` (default: SweepCache()); display it as a cell's result."""
    return SweepExplorer(cache, run_fn=run_fn, device=device)


def count_explorer(
    preset: str = "gpt3-175b", rank: int = 8, targets: Sequence[str] = ("q_proj", "v_proj")
) -> W.VBox:
    """A widget tree (VBox: preset, rank, targets, readout) showing `lora_counts` live."""
    preset_w = W.Dropdown(options=list(PRESETS), value=preset, description="model")
    rank_w = W.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64], value=rank, description="rank")
    targets_w = W.SelectMultiple(options=ATTENTION, value=tuple(targets), description="on")
    readout = W.HTML()

    def update(_change: object = None) -> None:
        try:
            counts = lora_counts(preset_w.value, rank_w.value, targets_w.value)
            text = describe_counts(counts)
        except ValueError as exc:  # no target picked, or a rank the layers cannot take
            text = f"cannot count: {exc}"
        readout.value = f"<pre>{text}</pre>"

    for control in (preset_w, rank_w, targets_w):
        control.observe(update, names="value")
    update()
    return W.VBox([preset_w, rank_w, targets_w, readout])
