"""The sweep explorer's plots: for a Selection, which figure each tab shows and from which
cached results (`plot_specs`), drawn by lab.plots. Pure functions: tested without widgets.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
from collections.abc import Callable, Sequence

import torch
from matplotlib.figure import Figure

from .. import plots
from ..config import ALL_LINEAR, LoRAConfig
from ..model import ToyTransformer
from ..practice import learn_forget
from ..surgery import add_lora, count_parameters
from ..sweeps import (
    ALL_TARGETS,
    DEFAULT_ALPHA,
    LORA_LR,
    SweepPoint,
    SweepResult,
    accuracy_table,
    by_rank,
    dropout_series,
    full_point,
    load_base_config,
    select,
    trainable_counts,
)
from .choices import (
    _PLAIN,
    LOSS_SMOOTHING,
    METHODS,
    PLOTS,
    SMALL_TASK,
    SWEEP_LRS,
    Selection,
    _problem,
    cached_elsewhere,
    method_name,
    missing_choices,
    point_label,
    scaling_name,
    targets_text,
)
from .estimates import estimate_seconds, format_duration


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
