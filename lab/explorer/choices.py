"""The sweep explorer's choices: the options of each control, the methods (from the flavour
registry), a Selection of them, and how the explorer writes a method, a point and its targets.

lab.widgets builds the controls over these; lab.explorer.plots and lab.explorer.estimates read a
Selection. A flavour registered in lab/variants/ joins the method control by itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..analysis import canonical_targets
from ..config import ALL_LINEAR, INITS, VARIANTS
from ..practice import LR_GRID, PRACTICE_GRID_PATH
from ..quant import SCHEMES
from ..sweeps import (
    ALL_TARGETS,
    DEFAULT_GRID_PATH,
    DEFAULT_STEPS,
    DEFAULT_TARGETS,
    LORA_LR,
    SweepCache,
    SweepPoint,
    SweepResult,
    full_point,
    grid,
)
from ..variants.registry import display_name

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
_PLAIN = {"variant": "lora", "init": "default", "lr_ratio": 1.0}


def _methods() -> dict[str, dict[str, Any]]:
    """Method name -> the SweepPoint fields it sets, built from the variant and init registries.

    Plain LoRA first, then every registered variant (DoRA), LoRA+, then every registered
    initialisation (PiSSA): a flavour registered in lab/variants/ appears here by itself.
    """
    methods: dict[str, dict[str, Any]] = {"LoRA": dict(_PLAIN)}
    for name in VARIANTS:
        if name != _PLAIN["variant"]:
            methods[display_name(VARIANTS[name])] = {**_PLAIN, "variant": name}
    methods["LoRA+"] = {**_PLAIN, "lr_ratio": LORA_PLUS_RATIO}
    for name in INITS:
        if name != _PLAIN["init"]:
            methods[display_name(INITS[name])] = {**_PLAIN, "init": name}
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
    method: str = "LoRA"  # a key of METHODS: LoRA, LoRA+ or a registered flavour's display name
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
    if INITS[sel.flavour["init"]].changes_base:  # it rewrites W from W's own singular directions
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
