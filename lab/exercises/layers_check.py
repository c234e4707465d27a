"""Exercise 10: which layers to adapt for shift under a parameter budget, and counting MLP LoRA."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from ..engine.points import ALL_TARGETS
from ..engine.results import SweepResult
from ..model import PRESETS
from ..practice import (
    LAYER_SETS,
    best_lr,
    layer_long_points,
)
from .budget_check import _budget_targets
from .compare import _as_number
from .count_check import _count_mistakes, _lab_count
from .feedback import Feedback, _no, _safe
from .practice_grid import (
    ATTENTION,
    MLP,
    MLP_RANK,
    SHIFT_BUDGET,
    SHIFT_LEARNED,
    SHIFT_TASK,
    _grid,
    _short,
)

__all__ = [
    "check_mlp_count",
    "check_shift_targets",
]


@_safe
def check_mlp_count(count: object) -> Feedback:
    """Exercise 10a: trainable parameters of LoRA on up_proj and down_proj at MLP_RANK, by hand."""
    config = PRESETS["cpu"]
    want, _ = _lab_count(config, MLP, MLP_RANK)
    todo = f"the trainable parameters of LoRA on up_proj and down_proj at rank {MLP_RANK}"
    if count is None:
        return _no(f"no count yet: set MLP_COUNT to {todo}")
    count = _as_number(count)
    if not isinstance(count, numbers.Real) or isinstance(count, bool):
        return _no(f"MLP_COUNT should be a whole number, {todo}; got {count!r}")
    if not (math.isfinite(count) and count == int(count)):
        return _no(f"MLP_COUNT is {count!r}; a parameter count is a whole number")
    d, f, n = config.d_model, config.d_ff, config.n_layers
    if int(count) == want:
        return Feedback(
            True,
            f"{want:,}: each block's up_proj ({d} -> {f}) and down_proj ({f} -> {d}) cost "
            f"r * ({d} + {f}) = {MLP_RANK * (d + f):,} each, 2 of them in each of {n} blocks.",
        )
    mistakes = [
        (
            f"that uses d_model ({d}) on both sides: up_proj is {d} -> {f} (d_ff) and down_proj "
            f"{f} -> {d}, so each costs r * ({d} + {f})",
            n * MLP_RANK * 2 * d * 2,
        ),
        (
            f"that uses d_ff ({f}) on both sides: each of up and down has one side of d_model "
            f"({d}) and one of d_ff ({f})",
            n * MLP_RANK * 2 * f * 2,
        ),
    ]
    mine = {v for _, v in mistakes}  # the lab's list says the first of these too, less plainly
    mistakes += [(h, v) for h, v in _count_mistakes(config, MLP, MLP_RANK) if v not in mine]
    hints = [h for h, v in mistakes if v == int(count)]  # one number, several ways to reach it
    hint = "; or ".join(hints[:3]) or (
        f"each adapted layer has A (r x in) and B (out x r), r * (in + out) numbers, in each of "
        f"the {n} blocks"
    )
    # The lab's count is not shown: it is the one answer, and a message must not hand it over.
    side = "more" if int(count) > want else "fewer"
    return _no(f"you count {int(count):,}, {side} than the lab counts: {hint}")


def _shift_targets(targets: object) -> tuple[tuple[str, ...], Feedback | None]:
    """Full target names ("all-linear", short names and lists welcome), or feedback."""
    if isinstance(targets, str) and targets.strip().lower() == "all-linear":
        return ALL_TARGETS, None
    return _budget_targets(targets)


def _layer_rows(grid: Iterable[SweepResult]) -> dict[str, dict] | None:
    """Per LAYER_SETS name, shift's long run at matched parameters; None if any is missing.

    The 600-step runs (lab.practice.layer_long_points), each at the rate its 200-step sweep
    liked best: at 200 steps no target set gets whole shift answers right yet.
    """
    wanted = {p for p in layer_long_points() if p.task == SHIFT_TASK}
    sweeps: dict[str, list[SweepResult]] = {}
    by_targets = {tuple(sorted(t)): name for name, (t, _) in LAYER_SETS.items()}
    for r in grid:
        if r.point in wanted and not r.point.is_full and not r.diverged:
            sweeps.setdefault(by_targets[r.point.targets], []).append(r)
    if set(sweeps) != set(LAYER_SETS):
        return None
    rows = {}
    for name, (targets, rank) in LAYER_SETS.items():
        best = best_lr(sweeps[name])
        rows[name] = {
            "targets": targets,
            "rank": rank,
            "trainable": best.trainable_parameters,
            "lr": best.point.lr,
            "steps": best.point.steps,
            "accuracy": best.heldout["accuracy"],
        }
    return rows


def _measured(rows: dict[str, dict]) -> str:
    return ", ".join(
        f"{name} r{row['rank']} {row['accuracy']:.2f} (lr {row['lr']:g})"
        for name, row in rows.items()
    )


@_safe
def check_shift_targets(
    targets: object, rank: object, results: Iterable[SweepResult] | None = None
) -> Feedback:
    """Exercise 10b: (targets, rank) within SHIFT_BUDGET that learns shift, as the grid measured.

    Only a setting the grid trained is judged (held-out accuracy >= SHIFT_LEARNED); any other
    is "not measured", whatever its layers: the check knows, it does not assume.
    """
    if not targets and not rank:
        return _no(
            f"no choice yet: set TARGETS (some of q k v o up down, or 'all-linear') and RANK, "
            f"at most {SHIFT_BUDGET:,} trainable parameters"
        )
    names, problem = _shift_targets(targets)
    if problem:
        return problem
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= 128:
        return _no(f"RANK should be a whole number from 1 to 128 (d_model), got {rank!r}")
    rank = int(rank)  # a numpy integer is a whole number too
    cost, _ = _lab_count(PRESETS["cpu"], names, rank)
    plan = f"rank {rank} on {_short(names)}"
    if cost > SHIFT_BUDGET:
        return _no(
            f"{plan} trains {cost:,} parameters (counted by lab.add_lora and "
            f"lab.count_parameters), over the budget of {SHIFT_BUDGET:,}. Each adapted layer "
            "costs r * (in + out) in each of the 2 blocks: q, k, v, o are 128 -> 128, up and "
            "down 128 <-> 512"
        )
    grid, problem = _grid(results)
    if problem:
        return problem
    rows = _layer_rows(grid)
    if rows is None:
        return _no(
            "the practice grid lacks the which-layers experiment on shift: rebuild it with "
            "scripts/make_practice_grid.py"
        )
    counts = sorted(row["trainable"] for row in rows.values())
    lo, hi = counts[0], counts[-1]
    matched = f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"
    grid_says = (
        f"On shift the shipped grid measured, at matched parameters ({matched} each, "
        f"{rows[next(iter(rows))]['steps']} steps, each at its best lr), held-out accuracy: "
        f"{_measured(rows)}"
    )
    why_mlp = (
        "shift remaps each letter where it stands, a per-token lookup: the MLP's job; "
        "attention mixes positions"
    )
    attention_only = set(names) <= set(ATTENTION)
    # "Can learn" is known only where the grid trained that very setting: a guess from a
    # similar one (fewer layers, another rank) can be far off.
    row = next(
        (r for r in rows.values() if set(r["targets"]) == set(names) and r["rank"] == rank),
        None,
    )
    if row is None:
        advice = f" It adapts attention only: {why_mlp}." if attention_only else ""
        return _no(
            f"{plan} ({cost:,} parameters) was not measured, so the check cannot know whether it "
            f"learns shift.{advice} {grid_says}. Choose one of those settings, or train yours "
            "(lab.add_lora, then lab.train on lab.get_task('shift')) to find out"
        )
    if row["accuracy"] < SHIFT_LEARNED:
        advice = f" It adapts attention only: {why_mlp}." if attention_only else ""
        return _no(
            f"{plan} ({cost:,} parameters) reached held-out accuracy {row['accuracy']:.2f} on "
            f"shift in the grid, short of learning it ({SHIFT_LEARNED:.2f}).{advice} "
            f"{grid_says}. Spend some of the budget on up_proj or down_proj"
        )
    return Feedback(
        True,
        f"{plan}: {cost:,} trainable parameters (budget {SHIFT_BUDGET:,}). The shipped grid "
        f"trained this very setting on shift: held-out accuracy {row['accuracy']:.2f} (lr "
        f"{row['lr']:g}, {row['steps']} steps); attention-only at matched parameters reached "
        f"at best {_attention_best(rows):.2f}: {why_mlp}.",
    )


def _attention_best(rows: dict[str, dict]) -> float:
    return max(r["accuracy"] for r in rows.values() if set(r["targets"]) <= set(ATTENTION))
