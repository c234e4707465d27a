"""What practitioners learned about LoRA since 2021, as sweeps the lab can rerun on the toy.

The shipped grid `lab/data/practice_grid.json` (rebuilt by scripts/make_practice_grid.py)
holds three experiments, each defined here once so that the script, notebook 09, the
exercises and the tests all read the same points:

- `lr_points()`: learning rate x rank x {LoRA under alpha/r, full fine-tuning}, and LoRA
  under rsLoRA at rank 16 ("LoRA Without Regret", Schulman et al. 2025: the best LoRA rate
  is about 10x full fine-tuning's and, under alpha/r with alpha fixed, barely moves with rank).
- `layer_points()`: attention-only (q,v), MLP-only and all-linear targets at matched trainable
  parameters, each at its own learning rates, on shift (the same source and
  QLoRA, Dettmers et al. 2023, section 4: all linear layers, MLP especially, win).
- `replay_points()`: LoRA ranks and full fine-tuning learning rates with 5% of each batch
  replayed from the pretraining mix, for the learn-forget curve ("LoRA Learns Less and
  Forgets Less", Biderman et al. 2024). Every result of every experiment carries
  `forgetting`, so the runs without replay give the curve without it.

The helpers below pick the best learning rate per setting and lay results out for plots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .engine.cache import load_grid_file
from .engine.points import ALL_TARGETS_SORTED, POINT_FIELDS, SweepPoint, full_point
from .engine.results import SweepResult
from .forgetting import source_summary

__all__ = [
    "LAYER_LRS",
    "LAYER_SETS",
    "LR_GRID",
    "LR_RANKS",
    "RSLORA_RANKS",
    "PRACTICE_GRID_PATH",
    "REPLAY",
    "STEPS",
    "best_by_lr",
    "best_lr",
    "layer_points",
    "learn_forget",
    "load_practice_grid",
    "lr_curve",
    "lr_points",
    "replay_points",
]

PRACTICE_GRID_PATH = Path(__file__).parent / "data" / "practice_grid.json"
STEPS = 200  # every run: a third of the default grid's 600 keeps 51 runs near 12 CPU minutes
ALPHA = 16.0  # fixed while rank moves, as in LoRA Without Regret
LR_TASK = "sort_desc"
# Seven log-spaced rates, a half-decade apart, from where full fine-tuning trains to where
# LoRA diverges: the sweep must bracket both methods' best.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_RANKS = (1, 4, 16)
RSLORA_RANKS = (16,)  # alpha/sqrt(r) is 4x alpha/r here (at r1 they are equal)
RSLORA_LRS = (1e-3, 3e-3, 1e-2, 3e-2)  # around where alpha/r trains best
# Which layers: trainable parameters matched to within 3% per block (d_model 128, d_ff 512):
# q,v at r18: 9,216; up,down at r7: 8,960; all six at r4: 9,216.
LAYER_SETS: dict[str, tuple[tuple[str, ...], int]] = {
    "q,v": (("q_proj", "v_proj"), 18),  # attention-only, the LoRA paper's choice
    "MLP": (("up_proj", "down_proj"), 7),
    "all-linear": (ALL_TARGETS_SORTED, 4),
}
LAYER_TASKS = ("shift",)
LAYER_LRS = (1e-3, 3e-3, 1e-2)
LAYER_FULL_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
REPLAY = 0.05
REPLAY_RANKS = (16,)
REPLAY_LORA_LRS = (3e-3, 1e-2, 3e-2)
REPLAY_FULL_LRS = (3e-4, 1e-3, 3e-3)


def lr_points(steps: int = STEPS) -> list[SweepPoint]:
    """LR_GRID x LR_RANKS under alpha/r, RSLORA_LRS x RSLORA_RANKS under rsLoRA (all-linear),
    and full fine-tuning x LR_GRID."""
    points = [
        SweepPoint(LR_TASK, r, ALPHA, targets=ALL_TARGETS_SORTED, rslora=rs, steps=steps, lr=lr)
        for rs, ranks, lrs in ((False, LR_RANKS, LR_GRID), (True, RSLORA_RANKS, RSLORA_LRS))
        for r in ranks
        for lr in lrs
    ]
    return points + [full_point(LR_TASK, steps, lr) for lr in LR_GRID]


def layer_points(steps: int = STEPS) -> list[SweepPoint]:
    """LAYER_SETS x LAYER_LRS on shift, and full fine-tuning on shift x LAYER_FULL_LRS.

    On sort_desc the lr sweep's all-linear rank-4 runs stand for the comparison (same budget).
    """
    points = [
        SweepPoint(task, rank, ALPHA, targets=targets, steps=steps, lr=lr)
        for task in LAYER_TASKS
        for targets, rank in LAYER_SETS.values()
        for lr in LAYER_LRS
    ]
    return points + [full_point("shift", steps, lr) for lr in LAYER_FULL_LRS]


# At 200 steps no target set learns shift whole (full fine-tuning does); each set's rate with
# the lowest held-out loss at 200 steps then trains 3x longer.
LONG_STEPS = 600
LAYER_LONG_LRS = {"q,v": 1e-2, "MLP": 3e-3, "all-linear": 3e-3}


def layer_long_points(steps: int = LONG_STEPS) -> list[SweepPoint]:
    """Each target set at the rate its 200-step sweep liked best, trained `steps` on shift."""
    return [
        SweepPoint(
            "shift", LAYER_SETS[name][1], ALPHA, targets=LAYER_SETS[name][0], steps=steps, lr=lr
        )  # fmt: skip
        for name, lr in LAYER_LONG_LRS.items()
    ]


def replay_points(steps: int = STEPS) -> list[SweepPoint]:
    """LoRA (all-linear) ranks x rates and full fine-tuning x rates, 5% pretraining replay."""
    lora = [
        SweepPoint(
            LR_TASK, r, ALPHA, targets=ALL_TARGETS_SORTED, steps=steps, lr=lr, replay=REPLAY
        )  # fmt: skip
        for r in REPLAY_RANKS
        for lr in REPLAY_LORA_LRS
    ]
    return lora + [full_point(LR_TASK, steps, lr, replay=REPLAY) for lr in REPLAY_FULL_LRS]


def all_points(steps: int = STEPS) -> list[SweepPoint]:
    """Every point of the shipped practice grid, each once."""
    long = layer_long_points(3 * steps)
    return list(dict.fromkeys(lr_points(steps) + layer_points(steps) + replay_points(steps) + long))


def load_practice_grid(path: str | Path = PRACTICE_GRID_PATH) -> list[SweepResult]:
    """The shipped practice grid's results (see lab.engine.cache.load_grid_file)."""
    return load_grid_file(path)


def _score(r: SweepResult) -> tuple[float, float]:
    """Higher is better: held-out accuracy, then lower held-out loss (diverged: worst)."""
    if r.diverged or not math.isfinite(r.heldout["loss"]):
        return (-1.0, -math.inf)
    return (r.heldout["accuracy"], -r.heldout["loss"])


def _results(results: object, where: str) -> list[SweepResult]:
    """`results` as a list of SweepResults, or a TypeError naming the first thing that is not."""
    if isinstance(results, str | bytes | Mapping) or not isinstance(results, Iterable):
        raise TypeError(
            f"{where}: results must be a list of SweepResults (lab.practice.load_practice_grid()"
            f" or lab.sweep(...)), got {type(results).__name__}"
        )
    results = list(results)
    for i, r in enumerate(results):
        if not isinstance(r, SweepResult):
            hint = ": pass the results, not their points" if isinstance(r, SweepPoint) else ""
            raise TypeError(
                f"{where}: results[{i}] is of type {type(r).__name__}, not a SweepResult{hint}"
            )
    return results


def _differing_fields(results: list[SweepResult]) -> list[str]:
    """The point fields other than lr in which `results` differ (empty: one setting)."""
    settings = [dict(_setting(r.point)) for r in results]  # a field at its default may be absent
    keys = {k for s in settings for k in s}
    return sorted({k for k in keys for s in settings[1:] if s.get(k) != settings[0].get(k)})


def best_lr(results: Iterable[SweepResult]) -> SweepResult:
    """The result with the best held-out accuracy (ties: lower loss) among `results`.

    They must differ only in learning rate (one setting's lr sweep): ValueError naming the
    fields that differ otherwise, and when every run diverged or there are none.
    """
    results = _results(results, "best_lr")
    differ = _differing_fields(results)
    if differ:
        raise ValueError(
            f"best_lr compares one setting's learning rates, but these {len(results)} results "
            f"also differ in {', '.join(differ)}: pick one setting first (lab.practice."
            "best_by_lr gives each setting's best)"
        )
    trained = [r for r in results if not r.diverged]
    if not trained:
        raise ValueError(
            f"no trained run among {len(results)} results (all diverged or none given)"
        )
    return max(trained, key=_score)


def _setting(point: SweepPoint) -> tuple:
    """A point's settings without its learning rate."""
    data = point.to_dict()
    data.pop("lr")
    data["targets"] = tuple(data["targets"])
    return tuple(sorted(data.items()))


def best_by_lr(results: Iterable[SweepResult]) -> dict[tuple, SweepResult]:
    """For each setting (every field but lr), its best result over the learning rates."""
    groups: dict[tuple, list[SweepResult]] = {}
    for r in _results(results, "best_by_lr"):
        groups.setdefault(_setting(r.point), []).append(r)
    out = {}
    for key, group in groups.items():
        try:
            out[key] = best_lr(group)
        except ValueError:
            continue  # every rate diverged: no best
    return out


def lr_curve(results: Iterable[SweepResult], **fields: object) -> list[tuple[float, float | None]]:
    """(lr, held-out accuracy or None if diverged) for results matching `fields`, lr ascending.

    Example: lr_curve(results, task="sort_desc", rank=4, rslora=False, replay=0.0). A field
    that is not a SweepPoint field, or values that no result has, raise a ValueError naming
    the values the results hold.
    """
    results = _results(results, "lr_curve")
    valid = list(POINT_FIELDS)
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"lr_curve: {unknown} are not SweepPoint fields; valid: {valid}")
    chosen = [r for r in results if all(getattr(r.point, k) == v for k, v in fields.items())]
    if results and not chosen:
        have = {k: sorted({getattr(r.point, k) for r in results}, key=str) for k in fields}
        held = "; ".join(f"{k}={v!r} (the results have {have[k]})" for k, v in fields.items())
        raise ValueError(f"lr_curve: no result matches {held}")
    differ = _differing_fields(chosen)
    if differ:  # one curve is one setting: mixed ones would zigzag between settings
        raise ValueError(
            f"lr_curve: the {len(chosen)} matching results differ in {', '.join(differ)}, not "
            "only in lr: give those fields too, e.g. lr_curve(results, rank=4, ...)"
        )
    return sorted((r.point.lr, None if r.diverged else r.heldout["accuracy"]) for r in chosen)


def learn_forget(results: Sequence[SweepResult]) -> list[dict]:
    """One row per trained result: what it learned and what it kept of the pretraining skills.

    Keys: label ('r4 lr 0.01' or 'full lr 0.001'), rank (None: full), lr, replay, learned
    (held-out accuracy of the new task), target_loss, source_accuracy and source_loss (means
    over copy, reverse, sort, add). Results without `forgetting` are left out.
    """
    rows = []
    for r in _results(results, "learn_forget"):
        if r.diverged or r.forgetting is None:
            continue
        source = source_summary(r.forgetting)
        kind = "full" if r.point.is_full else f"r{r.point.rank}"
        rows.append(
            {
                "label": f"{kind} lr {r.point.lr:g}",
                "rank": r.point.rank,
                "lr": r.point.lr,
                "replay": r.point.replay,
                "learned": r.heldout["accuracy"],
                "target_loss": r.heldout["loss"],
                "source_accuracy": source["accuracy"],
                "source_loss": source["loss"],
            }
        )
    return rows
