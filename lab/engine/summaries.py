"""Summaries of cached results as the plain lists and tables that lab.plots draws."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..analysis import count_full, count_lora
from ..base import load_base_config
from ..model import ModelConfig
from .points import DEFAULT_TARGETS, POINT_FIELDS
from .results import SweepResult

__all__ = ["accuracy_table", "by_rank", "dropout_series", "select", "trainable_counts"]


def select(results: Iterable[SweepResult], **filters: object) -> list[SweepResult]:
    """Results whose point has every given field equal to the given value (targets: any order)."""
    names = set(POINT_FIELDS)
    unknown = sorted(set(filters) - names)
    if unknown:
        raise ValueError(f"unknown SweepPoint fields {unknown}; valid: {sorted(names)}")
    if "targets" in filters:
        filters["targets"] = tuple(sorted(filters["targets"]))
    return [r for r in results if all(getattr(r.point, k) == v for k, v in filters.items())]


def by_rank(results: Iterable[SweepResult]) -> dict[int, SweepResult]:
    """LoRA results keyed by rank, ascending; the first result of each rank wins (not diverged)."""
    out: dict[int, SweepResult] = {}
    for r in results:
        if not r.point.is_full and not r.diverged:
            out.setdefault(r.point.rank, r)
    return dict(sorted(out.items()))


def accuracy_table(
    results: Iterable[SweepResult], ranks: Sequence[int], alphas: Sequence[float]
) -> list[list[float]]:
    """Held-out accuracy, a row per rank and a column per alpha; nan where not run or diverged."""
    found = {
        (r.point.rank, r.point.alpha): math.nan if r.diverged else r.heldout["accuracy"]
        for r in results
    }
    return [[found.get((rank, float(a)), math.nan) for a in alphas] for rank in ranks]


def dropout_series(
    results: Iterable[SweepResult],
) -> tuple[list[float], list[float], list[float]]:
    """(dropouts, train losses, held-out losses) by dropout, from results with a train eval."""
    kept = [r for r in results if r.train_eval is not None and not r.diverged]
    rows = sorted({r.point.dropout: r for r in kept}.items())
    return (
        [p for p, _ in rows],
        [r.train_eval["loss"] for _, r in rows],
        [r.heldout["loss"] for _, r in rows],
    )


def trainable_counts(
    ranks: Sequence[int],
    targets: Sequence[str] = DEFAULT_TARGETS,
    config: ModelConfig | None = None,
) -> tuple[list[int], int]:
    """Exact trainable parameters per rank, and full fine-tuning's, counted on the meta device."""
    config = config or load_base_config()
    targets = tuple(sorted(targets))
    return [count_lora(config, rank, targets)[0] for rank in ranks], count_full(config)
