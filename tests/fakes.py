"""Shared fakes for the engine's tests: a result with made-up numbers, a trainer that counts."""

from __future__ import annotations

import os

from lab.engine.points import SweepPoint
from lab.engine.results import SweepResult

TINY = {"task": "sort_desc_small", "rank": 4, "steps": 30, "batch_size": 16}


def listing(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def fake_result(point: SweepPoint, accuracy: float = 0.5, train_loss: float | None = None):
    """A SweepResult with made-up numbers (no training)."""
    return SweepResult(
        point=point,
        losses=[2.0, 1.0, 0.5],
        heldout={"loss": 1.0 - accuracy / 2, "accuracy": accuracy, "n": 512},
        train_eval=None if train_loss is None else {"loss": train_loss, "accuracy": 0.9, "n": 256},
        trainable_parameters=(point.rank or 100) * 512,
        total_parameters=415_000,
        memory={"parameters": 10, "gradients": 2, "optimizer": 4, "activations": 30},
        wall_seconds=1.0,
        tokens_per_second=1000.0,
        device="cpu",
        date="2026-01-01T00:00:00+00:00",
    )


class CountingTrainer:
    """A fake run_fn that records which points it was asked to train."""

    def __init__(self) -> None:
        self.calls: list[SweepPoint] = []

    def __call__(self, point, device=None, progress=True):
        self.calls.append(point)
        return fake_result(point, accuracy=(point.rank or 128) / 128)
