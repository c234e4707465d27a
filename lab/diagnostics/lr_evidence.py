"""The doctor's learning-rate check: an lr against those that trained in the lab's shipped sweeps.

Every *_grid.json in GRID_DIR is read; a run "trained" when it did not diverge and reached at
least USEFUL_FRACTION of the best accuracy its kind of run reached on the same task and grid.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_path as _check_path
from ..engine.cache import load_grid_file
from ..engine.results import SweepResult
from ..fileio import regular_file
from ..lora import LoRALinear
from ..text import plural
from ..variants.registry import flavour_label
from .findings import Finding, _span

__all__ = ["GRID_DIR", "LR_TOLERANCE", "LrEvidence", "lr_evidence"]

FULL = "full fine-tuning"

# Learning rates: the shipped grids space lrs by factors of 2, so an lr up to LR_TOLERANCE
# times beyond the extremes that trained may still train (never at or past one that failed).
LR_TOLERANCE = 2.0
# A run "trained" when it did not diverge and reached at least this fraction of the best
# held-out accuracy that the same kind of run (LoRA, LoRA+, full fine-tuning) reached on the
# same task in the same grid file: a stalled run keeps the base's accuracy, near zero.
USEFUL_FRACTION = 0.5
GRID_DIR = Path(__file__).parents[1] / "data"  # lab/data: every *_grid.json here is read

# ---------------------------------------------------------------------------------------------
# The learning rate, against the lab's shipped sweeps
# ---------------------------------------------------------------------------------------------


def _kind(variant: str, init: str, lr_ratio: float) -> str:
    """A run's kind: its flavour as the registry names it ('LoRA', 'DoRA', 'LoRA-FA', ...), with
    LoRA+'s rate ratio kept apart ('LoRA+', 'DoRA LoRA+'): flavours train at rates of their own
    (LoRA-FA's best on the toy is 8x LoRA's), so one's range is no evidence for another's."""
    label = flavour_label(variant, init)
    if lr_ratio != 1:
        return "LoRA+" if label == "LoRA" else f"{label} LoRA+"
    return label


def _point_kind(point) -> str:
    if point.rank is None:
        return FULL
    return _kind(point.variant, point.init, point.lr_ratio)


@dataclass(frozen=True)
class LrEvidence:
    """The learning rates that trained one kind of run in the lab's grid files."""

    kind: str  # "LoRA", "LoRA+", another flavour's name ("DoRA", "LoRA-FA") or "full fine-tuning"
    trained: tuple[float, ...]  # lrs at which some run trained (ascending)
    failed: tuple[float, ...]  # lrs at which every run diverged or stalled (ascending)
    runs: int  # results of this kind that the range comes from
    sources: tuple[str, ...]  # the grid files' names

    @property
    def low(self) -> float:
        return self.trained[0]

    @property
    def high(self) -> float:
        return self.trained[-1]


def _grid_results(directory: Path) -> list[tuple[str, SweepResult]]:
    out = []
    for path in sorted(directory.glob("*_grid.json")):
        try:  # a FIFO would block the read, a link to /dev/zero would never end it
            regular_file(path, "grid file")
        except OSError:
            continue
        with warnings.catch_warnings():  # a stale grid warns and gives []: nothing to use
            warnings.simplefilter("ignore")
            try:
                results = load_grid_file(path)
            except ValueError:
                continue
        out += [(path.name, r) for r in results]
    return out


def _kinds() -> list[str]:
    """Every kind a run can have: each registered flavour and combination, with and without
    LoRA+'s rate ratio, and full fine-tuning."""
    from ..config import INITS, VARIANTS

    kinds = [_kind(v, i, r) for v in VARIANTS for i in INITS for r in (1, 2)]
    return list(dict.fromkeys(kinds)) + [FULL]


def lr_evidence(kind: str, directory: str | os.PathLike | None = None) -> LrEvidence | None:
    """Which lrs trained runs of `kind` in every *_grid.json of `directory` (default: GRID_DIR).

    A run trained when it did not diverge and reached at least USEFUL_FRACTION of the best
    held-out accuracy of its kind on its task in its file. None when no run of that kind exists.
    """
    kinds = _kinds()
    if kind not in kinds:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(map(repr, kinds))}")
    if directory is None:
        directory = GRID_DIR
    else:  # a mistyped folder must not read as "no evidence"
        directory = _check_path(directory, "directory")
        if not directory.is_dir():
            raise NotADirectoryError(
                f"directory {directory} is not a folder (of the lab's *_grid.json sweep files)"
            )
    results = [(f, r) for f, r in _grid_results(directory) if _point_kind(r.point) == kind]
    if not results:
        return None

    def accuracy(r: SweepResult) -> float:
        acc = r.heldout.get("accuracy", math.nan)
        return math.nan if r.diverged or not math.isfinite(acc) else acc

    best: dict[tuple, float] = {}
    for f, r in results:
        acc = accuracy(r)
        if math.isfinite(acc):
            key = (f, r.point.task)
            best[key] = max(best.get(key, 0.0), acc)
    trained, tried = set(), set()
    for f, r in results:
        tried.add(r.point.lr)
        acc = accuracy(r)
        if math.isfinite(acc) and acc > 0 and acc >= USEFUL_FRACTION * best[(f, r.point.task)]:
            trained.add(r.point.lr)
    if not trained:
        return None
    return LrEvidence(
        kind,
        tuple(sorted(trained)),
        tuple(sorted(tried - trained)),
        len(results),
        tuple(sorted({f for f, _ in results})),
    )


def _learning_rate(layers: dict[str, LoRALinear], lr: float) -> list[Finding]:
    """lr-too-high / lr-too-low, against the runs of the model's kind in the shipped grids."""
    if not layers:
        kind = FULL
    else:  # the model's kind as its runs' kinds are named; a mix is read as its first layer's
        config = next(iter(layers.values())).config
        lr_ratio = max(layer.lr_ratio for layer in layers.values())
        kind = _kind(config.variant, config.init, lr_ratio)
    evidence = lr_evidence(kind)
    if evidence is None and kind == "LoRA+":
        kind, evidence = "LoRA", lr_evidence("LoRA")
    if evidence is None:
        return []  # no shipped run of this kind: nothing to compare with
    low, high = evidence.low, evidence.high
    failed_above = [f for f in evidence.failed if f > high]
    failed_below = [f for f in evidence.failed if f < low]
    too_high = lr > high * LR_TOLERANCE or any(f <= lr for f in failed_above)
    too_low = lr < low / LR_TOLERANCE or any(f >= lr for f in failed_below)
    if not (too_high or too_low):
        return []
    failed = failed_above if too_high else failed_below
    detail = (
        f"lr={lr:g} is {'above' if too_high else 'below'} every learning rate that trained "
        f"{kind} in the lab's grids: {_span(low, high, 'lr ')} trained (at least "
        f"{USEFUL_FRACTION:.0%} of the best held-out accuracy; {plural(evidence.runs, 'run')} in "
        f"{', '.join(evidence.sources)}; up to {LR_TOLERANCE:g}x beyond that is allowed)"
    )
    if failed:
        detail += f", and {', '.join(f'{f:g}' for f in failed)} failed (diverged or stalled)"
    other = lr_evidence("LoRA" if kind == FULL else FULL)
    if other is not None and other.low <= lr <= other.high:
        detail += f"; {lr:g} is where {other.kind} trained, a different range"
    return [
        Finding(
            "lr-too-high" if too_high else "lr-too-low",
            f"{'lower' if too_high else 'raise'} lr to {_span(low, high, '')}, where {kind} "
            "trained in the lab's grids",
            detail,
        )
    ]
