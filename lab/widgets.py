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

import dataclasses
import functools
import html
import os
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as W
import torch
from matplotlib.figure import Figure

from . import plots, threads
from .analysis import ATTENTION, canonical_targets, describe_counts, lora_counts
from .config import ALL_LINEAR, INITS, VARIANTS, LoRAConfig
from .model import PRESETS, ToyTransformer
from .practice import LR_GRID, PRACTICE_GRID_PATH, learn_forget
from .quant import SCHEMES
from .surgery import add_lora, count_parameters
from .sweeps import (
    ALL_TARGETS,
    DEFAULT_ALPHA,
    DEFAULT_GRID_PATH,
    DEFAULT_STEPS,
    DEFAULT_TARGETS,
    LORA_LR,
    SweepCache,
    SweepPoint,
    SweepResult,
    accuracy_table,
    by_rank,
    dropout_series,
    full_point,
    grid,
    load_base_config,
    select,
    sweep,
    trainable_counts,
)
from .tasks import FINETUNE_TASKS

__all__ = [
    "CONFIRM_SECONDS",
    "METHODS",
    "PLOTS",
    "SHIPPED_GRIDS",
    "SHORT_TITLES",
    "SWEEP_LRS",
    "Selection",
    "SweepExplorer",
    "count_explorer",
    "estimate_seconds",
    "format_duration",
    "method_name",
    "missing_choices",
    "plot_specs",
    "point_label",
    "scaling_name",
    "seed_shipped",
    "slowdown",
    "sweep_explorer",
    "targets_text",
]

RANK_OPTIONS = (1, 2, 4, 8, 16, 32, 64)
ALPHA_OPTIONS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DROPOUT_OPTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
TARGET_OPTIONS = (
    ("q", "q_proj"),
    ("k", "k_proj"),
    ("v", "v_proj"),
    ("o", "o_proj"),
    ("up", "up_proj"),
    ("down", "down_proj"),
)
SECONDS_PER_STEP = 0.06  # a LoRA step at batch 64 on one laptop CPU core, when nothing is cached
RECENT_RUNS = 8  # the estimate follows the pace of this many runs trained last in this kernel
# Run asks before training more than this (an estimate): a few minutes is a pause, an hour is not.
CONFIRM_SECONDS = 5 * 60
SMALL_TASK = "sort_desc_small"  # where the dropout plot looks when the chosen task is not small
LOSS_SMOOTHING = 20  # steps in the loss curves' moving average: per-batch losses are noisy
# Tab key -> tab title, in display order.
PLOTS = {
    "trainable": "Parameters",
    "memory": "Memory",
    "loss": "Loss curves",
    "accuracy": "Accuracy (r × α)",
    "dropout": "Dropout",
    "lr": "Learning rate",
    "forgetting": "Forgetting",
}
# Shorter tab titles for narrow layouts (the dashboard), same keys and order as PLOTS.
SHORT_TITLES = {
    "trainable": "Parameters",
    "memory": "Memory",
    "loss": "Loss",
    "accuracy": "Accuracy",
    "dropout": "Dropout",
    "lr": "LR",
    "forgetting": "Forgetting",
}


# The grids that ship with the lab: LoRA's default grid, the grid of its variants (DoRA,
# LoRA+, PiSSA, a 4-bit base) and the practitioners' grid (learning rate sweeps, which layers,
# replay; every run with its forgetting). A notebook seeds its cache from them with seed_shipped.
SHIPPED_GRIDS = (
    DEFAULT_GRID_PATH,
    DEFAULT_GRID_PATH.with_name("variants_grid.json"),
    PRACTICE_GRID_PATH,
)
# Learning rates the lr control offers (plus any other a cached run used): the methods are
# compared each at its own best lr, and LoRA+'s base lr sits lower (B's is 16 times larger).
LR_OPTIONS = (1.25e-3, 2.5e-3, 5e-3, 1e-2, LORA_LR, 4e-2)
# What "sweep lr" adds for the adapters and for full fine-tuning: the practice grid's rates,
# half a decade apart from where full fine-tuning trains to where LoRA diverges.
SWEEP_LRS = LR_GRID
LORA_PLUS_RATIO = 16.0  # LoRA+'s λ (B's learning rate over A's), the paper's default
QUANT_SCHEME = "nf4"  # the explorer's 4-bit base: QLoRA's NormalFloat code
_NAMES = {"dora": "DoRA", "pissa": "PiSSA"}  # how the lab writes registered flavours
_PLAIN = {"variant": "lora", "init": "default", "lr_ratio": 1.0}


def _methods() -> dict[str, dict[str, Any]]:
    """Method name -> the SweepPoint fields it sets, built from the variant and init registries.

    Plain LoRA first, then every registered variant (DoRA), LoRA+, then every registered
    initialisation (PiSSA): a flavour registered in lab/variants/ appears here by itself.
    """
    methods: dict[str, dict[str, Any]] = {"LoRA": dict(_PLAIN)}
    for name in VARIANTS:
        if name != _PLAIN["variant"]:
            methods[_NAMES.get(name, name)] = {**_PLAIN, "variant": name}
    methods["LoRA+"] = {**_PLAIN, "lr_ratio": LORA_PLUS_RATIO}
    for name in INITS:
        if name != _PLAIN["init"]:
            methods[_NAMES.get(name, name)] = {**_PLAIN, "init": name}
    return methods


METHODS = _methods()


def _method_tooltip(name: str) -> str:
    """One line on a method button: the registry's summary of the flavour."""
    fields = METHODS[name]
    if fields["lr_ratio"] != 1.0:
        return f"LoRA+ (Hayou et al. 2024): B learns {fields['lr_ratio']:g}x faster than A"
    if fields["init"] != _PLAIN["init"]:
        return INITS[fields["init"]].summary
    return VARIANTS[fields["variant"]].summary


def seed_shipped(cache: SweepCache) -> int:
    """Copy every shipped grid that exists (SHIPPED_GRIDS) into `cache`; how many were added.

    A grid not built yet (the practice grid takes a while) is skipped. Like
    SweepCache.seed_from, never overwrites a result already cached.
    """
    return sum(cache.seed_from(path) for path in SHIPPED_GRIDS if os.path.exists(path))


@dataclass(frozen=True)
class Selection:
    """What the controls select; a plain value, so plot_specs can be called without widgets."""

    task: str = "sort_desc"
    ranks: tuple[int, ...] = RANK_OPTIONS
    alphas: tuple[float, ...] = (8.0, 16.0, 32.0)
    dropouts: tuple[float, ...] = (0.0,)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    steps: int = DEFAULT_STEPS
    full: bool = True  # also train the full fine-tuning reference
    method: str = "LoRA"  # a key of METHODS: LoRA, DoRA, LoRA+, PiSSA
    quant: str | None = None  # a 4-bit frozen base ("nf4"), or None for the fp32 base
    lr: float = LORA_LR  # the adapters' learning rate (full fine-tuning keeps its own)
    lr_sweep: bool = False  # also every rate of SWEEP_LRS, for LoRA and full fine-tuning

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        if self.quant is not None and self.quant not in SCHEMES:
            raise ValueError(
                f"quant={self.quant!r}: expected None (fp32 base) or one of {', '.join(SCHEMES)}"
            )

    @property
    def flavour(self) -> dict[str, Any]:
        """The SweepPoint fields the method and base set: variant, init, lr_ratio, quant."""
        return {**METHODS[self.method], "quant": self.quant}

    @property
    def is_plain(self) -> bool:
        """True for plain LoRA on the fp32 base at the default lr: the explorer's first view."""
        return self.method == "LoRA" and self.quant is None and self.lr == LORA_LR

    @property
    def one_lr(self) -> Selection:
        """The same selection at its one learning rate (what the rank and alpha plots show)."""
        return dataclasses.replace(self, lr_sweep=False) if self.lr_sweep else self

    def points(self) -> list[SweepPoint]:
        """The grid's points (empty when a choice is missing or the method and base conflict).

        With lr_sweep, each LoRA setting also at every rate of SWEEP_LRS, and full fine-tuning
        at each of them (its usual FULL_LR among them) after the LoRA points.
        """
        if missing_choices(self) or conflict(self):
            return []
        sorted_ = (sorted(self.ranks), sorted(self.alphas), sorted(self.dropouts))
        lrs = sorted({self.lr, *SWEEP_LRS}) if self.lr_sweep else [self.lr]
        points = grid(self.task, *sorted_, self.targets, self.rslora, self.steps, lrs=lrs,
                      **self.flavour)  # fmt: skip
        if not self.full:
            return points
        fulls = [full_point(self.task, self.steps)]
        if self.lr_sweep:
            fulls += [full_point(self.task, self.steps, lr) for lr in SWEEP_LRS]
        return points + list(dict.fromkeys(fulls))


def method_name(sel: Selection) -> str:
    """The method as titles write it: 'LoRA', 'DoRA', 'LoRA+ λ16', 'PiSSA', '..., NF4 base'.

    A learning rate other than the default is added: 'DoRA, lr 0.01'.
    """
    name = sel.method
    if sel.method == "LoRA+":
        name += f" λ{METHODS['LoRA+']['lr_ratio']:g}"
    name += f", {sel.quant.upper()} base" if sel.quant else ""
    return name + (f", lr {sel.lr:g}" if sel.lr != LORA_LR else "")


def conflict(sel: Selection) -> str | None:
    """Why the method cannot run on the chosen base (PiSSA needs the fp32 W), or None."""
    if sel.quant is None:
        return None
    try:
        SweepPoint(sel.task, 1, **sel.flavour)
    except ValueError:
        return f"{sel.method} starts from the full-precision weights: choose the fp32 base"
    return None


def scaling_name(rslora: bool) -> str:
    """The scaling rule as the plots and the status line write it."""
    return "α/√r (rsLoRA)" if rslora else "α/r"


def targets_text(targets: Sequence[str]) -> str:
    """Targets in the lab's order q, k, v, o, up, down, short names: 'q,k,v,o'.

    Every linear of the blocks is written 'all-linear', as lab.sweeps.describe and PEFT write it.
    """
    if set(targets) == set(ALL_TARGETS):
        return ALL_LINEAR
    return ",".join(t.removesuffix("_proj") for t in canonical_targets(targets))


def point_label(point: SweepPoint) -> str:
    """A curve's label: 'r8 α16 p0.1' (plus targets and scaling when not the defaults)."""
    if point.is_full:
        return "full fine-tuning"
    text = f"r{point.rank} α{point.alpha:g}"
    if point.dropout:
        text += f" p{point.dropout:g}"
    if set(point.targets) != set(DEFAULT_TARGETS):
        text += " " + targets_text(point.targets)
    return text + (" rsLoRA" if point.rslora else "")


def _problem(sel: Selection) -> str | None:
    """What the selection needs before it names any point, as a hint; None if nothing."""
    missing = missing_choices(sel)
    return _select_hint(missing) if missing else conflict(sel)


def cached_elsewhere(results: Sequence[SweepResult], sel: Selection, groups: int = 3) -> str:
    """Where the cache holds runs of the selected method (another task, steps, rank...): a hint.

    '' when there are none. The heading says which learning rate the listed runs used: those at
    the selected lr if there are any ('cached DoRA runs at lr 0.02: sort_desc, 400 steps: r4
    α16'), else every other rate, each run with its own ('cached DoRA runs, none at lr 0.08:
    sort_desc, 400 steps: r4 α16 lr 0.005, ...'). The first six runs of each task and step
    count, and the first `groups` of those.
    """
    fields = sel.flavour
    runs = [
        r.point
        for r in results
        if not r.point.is_full and all(getattr(r.point, k) == v for k, v in fields.items())
    ]
    if not runs:
        return ""
    same_lr = [p for p in runs if p.lr == sel.lr]
    name = method_name(dataclasses.replace(sel, lr=LORA_LR))  # the method and base, no lr
    if same_lr:
        heading, runs = f"cached {name} runs at lr {sel.lr:g}", same_lr
    else:
        heading = f"cached {name} runs, none at lr {sel.lr:g}"
    by_group: dict[tuple[str, int], list[str]] = {}
    for p in sorted(runs, key=lambda p: (p.task, p.steps, p.rank, p.alpha, p.dropout, p.lr)):
        label = point_label(p) + ("" if same_lr else f" lr {p.lr:g}")
        by_group.setdefault((p.task, p.steps), []).append(label)
    parts = []
    for (task, steps), labels in list(by_group.items())[:groups]:
        shown = ", ".join(dict.fromkeys(labels[:6])) + (", ..." if len(labels) > 6 else "")
        parts.append(f"{task}, {steps} steps: {shown}")
    more = len(by_group) - groups
    return f"{heading}: " + "; ".join(parts) + (f"; and {more} more grids" if more > 0 else "")


def missing_choices(sel: Selection) -> list[str]:
    """What the selection lacks before it names any point: 'rank', 'alpha', 'dropout', 'target'."""
    chosen = {"rank": sel.ranks, "alpha": sel.alphas, "dropout": sel.dropouts}
    return [name for name, values in (*chosen.items(), ("target", sel.targets)) if not values]


def _select_hint(missing: Sequence[str]) -> str:
    """'select at least one alpha and one target (Ctrl or Shift selects several)'."""
    names = [f"one {m}" for m in missing]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"select at least {listed}"


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _cached_pace(results: Sequence[SweepResult]) -> Callable[[SweepPoint], float]:
    """point -> seconds per step, from the median of comparable cached runs (see estimate)."""
    rates: dict[tuple, list[float]] = {}
    for r in results:
        if r.wall_seconds > 0 and r.point.steps > 0:
            key = (r.point.is_full, r.point.batch_size)
            rates.setdefault(key, []).append(r.wall_seconds / r.point.steps)
            rates.setdefault((*key, *_flavour_key(r.point)), []).append(
                r.wall_seconds / r.point.steps
            )

    def pace(p: SweepPoint) -> float:
        key = (p.is_full, p.batch_size)
        known = rates.get((*key, *_flavour_key(p))) or rates.get(key, [])
        return _median(known) if known else SECONDS_PER_STEP * p.batch_size / 64

    return pace


def slowdown(results: Sequence[SweepResult], recent: Sequence[SweepResult]) -> float | None:
    """How many times slower than the cached runs' pace the `recent` runs trained (pure).

    Each recent run's seconds per step over what the other cached runs predict for it; the
    median of the last RECENT_RUNS of them. None without a usable recent run.
    """
    mine = [r for r in recent[-RECENT_RUNS:] if r.wall_seconds > 0 and r.point.steps > 0]
    if not mine:
        return None
    mine_points = {r.point for r in recent}
    pace = _cached_pace([r for r in results if r.point not in mine_points])
    return _median([r.wall_seconds / r.point.steps / pace(r.point) for r in mine])


def estimate_seconds(
    points: Sequence[SweepPoint],
    results: Sequence[SweepResult],
    recent: Sequence[SweepResult] = (),
) -> float:
    """How long training `points` should take, from the cached runs' seconds per step (pure).

    Each point is estimated from cached runs of the same kind (LoRA or full fine-tuning), batch
    size and flavour (DoRA's step costs more; a 4-bit base trains one by one), else of the same
    kind and batch size: their median seconds per step times the point's steps. Without such
    runs, a laptop CPU's pace (SECONDS_PER_STEP) is assumed. Cached runs were often measured on
    another machine or a quieter afternoon: `recent` runs, trained here just now, scale the
    whole estimate by how much slower (or faster) they went than that pace (`slowdown`).
    """
    mine = {r.point for r in recent}
    pace = _cached_pace([r for r in results if r.point not in mine])
    factor = slowdown(results, recent) or 1.0
    return sum(pace(p) * factor * p.steps for p in points)


def _flavour_key(point: SweepPoint) -> tuple:
    return (point.variant, point.init, point.lr_ratio, point.quant)


def format_duration(seconds: float) -> str:
    """A rough duration: 'under a second', 'about 40 s', 'about 3 min', 'about 1.5 h'."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def _message_figure(title: str, message: str, fontsize: float = 13) -> Figure:
    """A titled, empty plot area that says what to do (an empty selection)."""
    fig = Figure(figsize=plots.FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", wrap=True,
            color="0.3", fontsize=fontsize)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _legend_outside(fig: Figure) -> Figure:
    """Move each Axes' legend to the right of the plot, where it cannot cover a curve or bar."""
    for ax in fig.axes:
        if ax.get_legend() is not None:
            handles, labels = ax.get_legend_handles_labels()
            ax.get_legend().remove()
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def _points(n: int) -> str:
    """'1 point', '3 points'."""
    return f"{n} point" if n == 1 else f"{n} points"


def _closest(values: Sequence[float], target: float) -> float:
    """The value nearest `target` (the smaller one on a tie)."""
    return min(sorted(values), key=lambda v: abs(v - target))


def plot_specs(
    results: Sequence[SweepResult], sel: Selection
) -> dict[str, tuple[Callable[..., Figure], tuple, dict]]:
    """For each plot, the function that draws it and its arguments, from cached results (pure).

    Full fine-tuning appears (curve, memory line) only when `sel.full` is set; every title names
    the scaling rule of the runs it shows, and the method unless it is plain LoRA on the fp32
    base; the plots show only runs of the selected method and base. An empty selection (or a
    method that cannot run on the chosen base) draws, in every plot, what to select; a method
    none of whose selected runs is cached says, in the run plots, where its cached runs are.
    """
    rule = scaling_name(sel.rslora)
    problem = _problem(sel)
    if problem:
        hint = problem + ("\n(Ctrl or Shift selects several values in a list)"
                          if missing_choices(sel) else "")  # fmt: skip
        return {name: (_message_figure, (title, hint), {}) for name, title in PLOTS.items()}
    chosen = set(sel.one_lr.points())  # the rank and alpha plots show one lr; "lr" shows them all
    mine = sorted(
        (r for r in results if r.point in chosen and not r.point.is_full),
        key=lambda r: (r.point.rank, r.point.alpha, r.point.dropout),
    )
    full_pt = full_point(sel.task, sel.steps)
    full = next((r for r in results if r.point == full_pt), None) if sel.full else None
    ranks = sorted(sel.ranks)
    targets = targets_text(sel.targets)
    name = method_name(sel)
    label = "" if sel.is_plain else f"{name}, "  # titles name any method but plain LoRA
    where = f"{label}{sel.task}, {sel.steps} steps, {rule}"
    specs: dict[str, tuple[Callable[..., Figure], tuple, dict]] = {}

    # Exact counts need no training: they are counted on the meta device.
    counts, full_count = trainable_counts(ranks, sel.targets)
    if METHODS[sel.method]["variant"] != _PLAIN["variant"]:  # DoRA also trains its magnitude
        counts = [variant_count(r, sel.targets, METHODS[sel.method]["variant"]) for r in ranks]
    on = f"{sel.method} on {targets}" + (f", {sel.quant.upper()} base" if sel.quant else "")
    specs["trainable"] = (
        plots.trainable_vs_rank if sel.method == "LoRA" else _trainable_of,
        (ranks, counts, full_count if sel.full else None),
        {"title": f"Trainable parameters vs rank ({on})"},
    )
    if sel.method != "LoRA":
        specs["trainable"][2]["method"] = sel.method

    # Memory does not depend on alpha; one measured run per rank is enough.
    per_rank = by_rank(r for r in mine if r.memory)
    specs["memory"] = (
        plots.memory_vs_rank,
        (list(per_rank), [r.memory for r in per_rank.values()]),
        {
            "full": full.memory if full and full.memory else None,
            "title": f"Memory of one training step vs rank ({label}{sel.task}, {rule})",
        },
    )

    # One curve per rank (and dropout) at one alpha: every alpha at once would be unreadable.
    alpha = _closest(sel.alphas, DEFAULT_ALPHA)
    curves = {point_label(r.point): r.losses for r in mine if r.point.alpha == alpha}
    if full is not None:
        curves[point_label(full.point)] = full.losses
    specs["loss"] = (
        plots.loss_curves,
        (curves,),
        {"smooth": LOSS_SMOOTHING, "title": f"Training loss ({where}, α={alpha:g})"},
    )

    dropout = min(sel.dropouts)
    table = accuracy_table(select(mine, dropout=dropout), ranks, sorted(sel.alphas))
    has_any = any(v == v for row in table for v in row)  # nan != nan
    specs["accuracy"] = (
        plots.accuracy_heatmap,
        (ranks, sorted(sel.alphas), table) if has_any else ([], [], []),
        {"title": f"Held-out accuracy ({where}, dropout {dropout:g})"},
    )

    # Dropout matters where data are scarce: every cached dropout of the small-data task.
    small = sel.task if sel.task.endswith("_small") else SMALL_TASK
    rank = int(_closest(ranks, 8))
    series = dropout_series(
        select(
            results,
            task=small,
            steps=sel.steps,
            rank=rank,
            alpha=alpha,
            targets=sel.targets,
            rslora=sel.rslora,
            **sel.flavour,
            lr=sel.lr,  # the settings the explorer trains with; other runs in the cache
            batch_size=64,  # (lab.sweep with another lr or seed, say) are left out
            seed=0,
        )
    )
    specs["dropout"] = (
        plots.dropout_effect,
        series,
        {
            "title": f"Adapter dropout, small data ({label}{small}, r{rank} α{alpha:g}, "
            f"{rule}, {sel.steps} steps)"
        },
    )
    elsewhere = cached_elsewhere(results, sel) if not (mine or sel.is_plain) else ""
    if elsewhere:  # nothing of this method here, but some elsewhere: say where to look
        hint = f"no {name} run of this selection is cached\n{elsewhere}\nselect those, or Run"
        for plot in ("memory", "loss", "accuracy"):
            specs[plot] = (_message_figure, (PLOTS[plot], hint), {})
    specs["lr"] = _lr_spec(results, sel, alpha, dropout)
    specs["forgetting"] = _forgetting_spec(results, sel)
    return specs


def _flavour_label(sel: Selection) -> str:
    """'' for plain LoRA on the fp32 base, else the method as titles write it, then ', '."""
    if sel.method == "LoRA" and sel.quant is None:
        return ""
    return method_name(dataclasses.replace(sel, lr=LORA_LR)) + ", "


def sweep_command(sel: Selection) -> str:
    """The command line that trains `sel`'s learning-rate sweep outside the notebook.

    'python -m lab sweep --task sort_desc --ranks 4 8 --alphas 16 --targets q v --steps 600
    --lr 0.0001 ... 0.1 --full --full-lr 0.0001 ... 0.1' (plus the method's and scaling's flags).
    """
    rates = " ".join(f"{lr:g}" for lr in sorted({sel.lr, *SWEEP_LRS}))
    targets = ALL_LINEAR if set(sel.targets) == set(ALL_TARGETS) else targets_text(sel.targets)
    words = [
        f"python -m lab sweep --task {sel.task}",
        "--ranks " + " ".join(str(r) for r in sorted(sel.ranks)),
        "--alphas " + " ".join(f"{a:g}" for a in sorted(sel.alphas)),
        "--targets " + targets.replace(",", " "),
    ]
    if sel.dropouts and max(sel.dropouts) > 0:
        words.append("--dropouts " + " ".join(f"{d:g}" for d in sorted(sel.dropouts)))
    fields = sel.flavour
    words += ["--rslora"] if sel.rslora else []
    words += [f"--variant {fields['variant']}"] if fields["variant"] != "lora" else []
    words += [f"--init {fields['init']}"] if fields["init"] != "default" else []
    words += [f"--lr-ratio {fields['lr_ratio']:g}"] if fields["lr_ratio"] != 1.0 else []
    words += [f"--quant {sel.quant}"] if sel.quant else []
    words += [f"--steps {sel.steps}", f"--lr {rates}"]
    if sel.full:
        words.append("--full --full-lr " + " ".join(f"{lr:g}" for lr in SWEEP_LRS))
    return " ".join(words)


def _wrap_lines(lines: Sequence[str], width: int = 84) -> str:
    """Lines of a message figure, each wrapped to fit the plot area (continuations indented)."""
    wrapped = (textwrap.wrap(line, width, subsequent_indent="    ") for line in lines)
    return "\n".join("\n".join(parts) for parts in wrapped)


def _accuracy_or_none(r: SweepResult) -> float | None:
    return None if r.diverged else float(r.heldout["accuracy"])


def _lr_sweeps_cached(results: Sequence[SweepResult], sel: Selection) -> str:
    """Where the cache holds lr sweeps (2+ rates) of the task and method: a hint, or ''.

    E.g. 'cached lr sweeps of sort_desc: 300 steps, all-linear, α16, α/r: r1, r4, r16, r64'.
    """
    groups: dict[tuple, dict[int, set[float]]] = {}
    for r in select(results, task=sel.task, replay=0.0, batch_size=64, seed=0, **sel.flavour):
        p = r.point
        if not p.is_full:
            key = (p.steps, targets_text(p.targets), p.alpha, p.dropout, p.rslora)
            groups.setdefault(key, {}).setdefault(p.rank, set()).add(p.lr)
    parts = []
    for (steps, targets, alpha, dropout, rslora), ranks in sorted(groups.items()):
        swept = sorted(rank for rank, lrs in ranks.items() if len(lrs) > 1)
        if swept:
            where = f"{steps} steps, {targets}, α{alpha:g}" + (f" p{dropout:g}" if dropout else "")
            parts.append(f"{where}, {scaling_name(rslora)}: " + ", ".join(f"r{k}" for k in swept))
    return f"cached lr sweeps of {sel.task}: " + "; ".join(parts[:3]) if parts else ""


def _lr_spec(
    results: Sequence[SweepResult], sel: Selection, alpha: float, dropout: float
) -> tuple[Callable[..., Figure], tuple, dict]:
    """Accuracy against learning rate: a curve per selected rank at `alpha`, full dashed.

    Runs match the rest of the selection (task, steps, targets, scaling rule, method, alpha,
    dropout; batch 64, seed 0, no replay). With no curve of two or more rates, the plot says
    which lr sweeps are cached elsewhere and what Run or the command line would train.
    """
    common = {"task": sel.task, "steps": sel.steps, "batch_size": 64, "seed": 0, "replay": 0.0}
    lora = select(results, **common, **sel.flavour, targets=sel.targets, rslora=sel.rslora,
                  alpha=alpha, dropout=dropout)  # fmt: skip
    curves = {
        f"r{rank}": sorted((r.point.lr, _accuracy_or_none(r)) for r in lora if r.point.rank == rank)
        for rank in sorted(sel.ranks)
    }
    curves = {label: curve for label, curve in curves.items() if curve}
    full = sorted(
        (r.point.lr, _accuracy_or_none(r)) for r in select(results, **common, rank=None)
    ) if sel.full else []  # fmt: skip
    title = (
        f"Accuracy vs lr ({_flavour_label(sel)}{sel.task}, {sel.steps} steps, "
        f"{targets_text(sel.targets)}, {scaling_name(sel.rslora)}, α={alpha:g})"
    )
    if any(len({lr for lr, _ in c}) > 1 for c in [*curves.values(), full]):
        return plots.accuracy_vs_lr, (curves, full or None), {"title": title}
    rates = sorted({lr for c in curves.values() for lr, _ in c})
    have = (f"only lr {', '.join(f'{lr:g}' for lr in rates)} is cached" if rates
            else "no run is cached")  # fmt: skip
    cached = {r.point for r in results}
    todo = [p for p in dataclasses.replace(sel, lr_sweep=True).points() if p not in cached]
    lines = [f"{have} for this selection at α={alpha:g}: no curve over learning rate yet"]
    elsewhere = _lr_sweeps_cached(results, sel)
    if elsewhere:
        lines.append(f"{elsewhere} (select those)")
    lines.append(
        f"press 'sweep lr' and Run: {_points(len(todo))}, "
        f"{format_duration(estimate_seconds(todo, results))}; or in a terminal:"
    )
    lines.append(sweep_command(sel))
    return _message_figure, (PLOTS["lr"], _wrap_lines(lines)), {"fontsize": 10}


def _method_of(point: SweepPoint) -> str:
    """The explorer's method name of a LoRA point, with its base: 'DoRA', 'LoRA, NF4 base'."""
    fields = (point.variant, point.init, point.lr_ratio)
    name = next(
        (m for m, f in METHODS.items() if (f["variant"], f["init"], f["lr_ratio"]) == fields),
        "LoRA",
    )
    return name + (f", {point.quant.upper()} base" if point.quant else "")


KEPT_NOTHING = 0.01  # pretraining skills kept below 1%: the plot says why


def _forgetting_spec(
    results: Sequence[SweepResult], sel: Selection
) -> tuple[Callable[..., Figure], tuple, dict]:
    """The learn-forget scatter of the selected grid's cached runs that measured forgetting.

    The grid's own points at every learning rate, as the Learning rate tab reads them: LoRA
    runs of the selected method, ranks, alphas, dropouts, targets and scaling rule, and full
    fine-tuning when `sel.full` is set, all of the task and step count chosen (batch 64, seed 0,
    no replay). The title counts what is shown: LoRA runs and full fine-tuning runs, and says
    when only one kind is there. When a shown run kept almost none of its pretraining skills,
    the title's second line says why. Without any run, the plot says where runs that measured
    it are cached and how to get some.
    """
    common = {"task": sel.task, "steps": sel.steps, "batch_size": 64, "seed": 0, "replay": 0.0}
    measured = [r for r in select(results, **common) if r.forgetting is not None]
    chosen = (set(sel.ranks), set(sel.alphas), set(sel.dropouts))
    lora = [
        r
        for r in select(measured, **sel.flavour, targets=sel.targets, rslora=sel.rslora)
        if not r.point.is_full
        and (r.point.rank, r.point.alpha, r.point.dropout) in _product(*chosen)
    ]
    full = [r for r in measured if r.point.is_full] if sel.full else []
    rows = learn_forget(lora + full)
    where = (
        f"{_flavour_label(sel)}{sel.task}, {sel.steps} steps, {targets_text(sel.targets)}, "
        f"{scaling_name(sel.rslora)}"
    )
    if rows:
        n_lora = sum(r["rank"] is not None for r in rows)
        n_full = len(rows) - n_lora
        shown = []
        if n_lora:
            ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
            shown.append(f"{n_lora} LoRA ({', '.join(f'r{k}' for k in ranks)})")
        if n_full:
            shown.append(f"{n_full} full fine-tuning")
        lines = [f"Learned vs kept ({where})", f"runs at every lr: {', '.join(shown)}"]
        if not n_lora:
            lines[-1] += "; no LoRA run of this selection measured it"
        if any(r["source_accuracy"] < KEPT_NOTHING for r in rows if r["rank"] is not None):
            lines.append(
                "LoRA at 0% kept: trained on the new task alone (no replay), it overwrote the "
                "pretraining skills, as full fine-tuning does (notebook 9)"
            )
        title = "\n".join("\n".join(textwrap.wrap(line, 70)) for line in lines)
        return _learn_forget_titled, (rows,), {"title": title}
    others: dict[str, int] = {}
    for r in select(results, task=sel.task):
        if r.forgetting is not None and not r.point.is_full and not r.diverged:
            key = f"{_method_of(r.point)} {r.point.steps} steps {targets_text(r.point.targets)} "
            key += scaling_name(r.point.rslora)
            others[key] = others.get(key, 0) + 1
    lines = [
        f"no cached {where} run of the selected ranks and alphas has its forgetting measured:",
        "results cached before forgetting was measured (the shipped default grid) have none.",
    ]
    if others:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(others.items())[:4])
        lines.append(f"{sel.task} runs with it: {listed}: select those, or")
    lines.append("Run new points (every new run measures it), or in a terminal:")
    lines.append(sweep_command(sel))
    return _message_figure, (PLOTS["forgetting"], _wrap_lines(lines)), {"fontsize": 10}


def _product(ranks: set, alphas: set, dropouts: set) -> set[tuple]:
    return {(r, a, d) for r in ranks for a in alphas for d in dropouts}


def _learn_forget_titled(rows, *, title: str) -> Figure:
    """plots.learn_forget with a title of two lines in a smaller type, so that both fit."""
    fig = plots.learn_forget(rows, title=title)
    for ax in fig.axes:
        ax.title.set_fontsize(9)
    return fig


def _trainable_of(ranks, counts, full, *, title: str, method: str) -> Figure:
    """plots.trainable_vs_rank with the curve named after the method (DoRA, PiSSA...)."""
    fig = plots.trainable_vs_rank(ranks, counts, full, title=title)
    ax = fig.axes[0]
    if ax.lines:
        ax.lines[0].set_label(method)
        if ax.get_legend() is not None:
            ax.legend(loc="lower right")
    return fig


def variant_count(rank: int, targets: Sequence[str], variant: str) -> int:
    """Trainable parameters of `variant` at `rank` on the shipped base, counted on meta."""
    return _variant_count(rank, tuple(sorted(targets)), variant)


@functools.lru_cache(maxsize=256)
def _variant_count(rank: int, targets: tuple[str, ...], variant: str) -> int:
    config = LoRAConfig(rank=rank, targets=targets, variant=variant)
    with torch.device("meta"):
        model = ToyTransformer(load_base_config())
        add_lora(model, config)
        return count_parameters(model).trainable


def draw(spec: tuple[Callable[..., Figure], tuple, dict]) -> Figure:
    """The Figure of one plot_specs entry, its legend outside the plot so that it covers nothing."""
    fn, args, kwargs = spec
    return _legend_outside(fn(*args, **kwargs))


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
        self.method = W.ToggleButtons(
            options=list(METHODS),
            value=sel.method,
            description="method",
            tooltips=[_method_tooltip(m) for m in METHODS],
            style={"button_width": "64px", "description_width": "80px"},
            layout=W.Layout(display="flex", flex_flow="row", align_items="center"),
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
