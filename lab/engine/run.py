"""Training: a point alone (run_point), a group batched (run_group), a planned unit (run_chunk)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence

import torch

from ..base import load_base_model
from ..forgetting import forgetting
from ..memory import measure_step_memory
from ..model import ToyTransformer, default_device
from ..step import autocast_dtype, make_optimizer
from ..surgery import count_parameters
from ..tasks import get_task
from ..training import TrainingDiverged, check_count, train
from .batched import train_batched
from .devices import free_memory
from .plan import chunk_size, group_key, memory_fit
from .points import SweepPoint, describe
from .results import SweepResult, now_utc

__all__ = ["run_chunk", "run_group", "run_point"]

SMALL_DATA_LIMIT = 1000  # tasks with at most this many training examples also get a train eval


def _first_step_memory(point: SweepPoint, base: ToyTransformer, device: torch.device) -> dict:
    """The memory of the point's first training step, measured as run_point measures it.

    A scratch copy of `base` with a fresh adapter runs one tracked step on the same first
    batch the point trains on; the trained models are not touched.
    """
    task = point.training_task()
    with torch.random.fork_rng(devices=[]):
        model = copy.deepcopy(base).to(device)
        point.prepare(model)
        model.train()
        idx = torch.randint(task.n_train, (point.batch_size,),
                            generator=torch.Generator().manual_seed(point.seed))  # fmt: skip
        optimizer = make_optimizer(model, point.lr)
        x, y = task.train_inputs[idx].to(device), task.train_targets[idx].to(device)
        return measure_step_memory(model, x, y, optimizer, autocast_dtype(device)).to_dict()


def run_group(
    points: Sequence[SweepPoint],
    device: torch.device | str | None = None,
    progress: bool = True,
    max_configs: int | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Train LoRA points that share task, steps and batch size together (lab.engine.batched).

    Each point trains exactly as `run_point` would train it alone (same data order, adapter
    initialisation, dropout masks and optimizer; see tests/engine/test_batched.py) and is measured
    the same way: held-out (and, for small data sets, train) evaluation and the first step's memory.
    A group larger than `max_configs` trains in chunks (default: lab.engine.plan.chunk_size);
    if a chunk still runs out of memory it is split in half and retried. Each result's
    wall_seconds is its share of its chunk's training time; extra["batched"] says how it ran.
    """
    points = list(dict.fromkeys(points))
    if not points:
        return []
    full = [p for p in points if p.is_full]
    if full:
        raise ValueError(f"{describe(full[0])} has no adapter to batch; train it with run_point")
    alone = [p for p in points if not p.batchable]
    if alone:
        raise ValueError(
            f"{describe(alone[0])} has no exact batched form; train it with run_point "
            "(sweep() does that for you)"
        )
    keys = {group_key(p) for p in points}
    if len(keys) > 1:
        raise ValueError(
            f"points differ in (task, steps, batch_size, replay): {sorted(keys)}; "
            "a batched group shares all four (sweep() groups them for you)"
        )
    if max_configs is not None:
        check_count("max_configs", max_configs)
    device = torch.device(device) if device is not None else default_device()
    base = load_base_model("cpu")
    if max_configs is None:
        max_configs = chunk_size(points, device)
    results: list[SweepResult] = []
    pending = [points[i : i + max_configs] for i in range(0, len(points), max_configs)]
    while pending:
        chunk = pending.pop(0)
        try:
            results += _run_chunk(chunk, base, device, progress, on_result)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(chunk) == 1 or not _out_of_memory(exc):
                raise
            half = len(chunk) // 2
            warnings.warn(
                f"{len(chunk)} configurations did not fit in memory; retrying as "
                f"{half} + {len(chunk) - half}",
                stacklevel=2,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pending[:0] = [chunk[:half], chunk[half:]]
    return results


def _out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _run_chunk(
    chunk: list[SweepPoint],
    base: ToyTransformer,
    device: torch.device,
    progress: bool,
    on_result: Callable[[SweepResult], None] | None,
) -> list[SweepResult]:
    first = chunk[0]
    task = get_task(first.task)
    specs = [p.spec() for p in chunk]
    run = train_batched(
        base, first.training_task(), specs, first.steps, first.batch_size, device, progress
    )
    share = run.wall_seconds / len(chunk)
    tokens = first.steps * first.batch_size * task.train_inputs.shape[1]
    results = []
    for k, (point, model) in enumerate(zip(chunk, run.models, strict=True)):
        counts = count_parameters(model)
        small = task.n_train <= SMALL_DATA_LIMIT
        if run.diverged and run.diverged[k]:
            losses = run.losses[k].tolist()
            first = next((i for i, x in enumerate(losses) if not math.isfinite(x)), len(losses))
            result = _diverged_result(point, task, counts, losses[:first], run.diverged[k],
                                      str(device))  # fmt: skip
            results.append(result)
            if on_result is not None:
                on_result(result)
            continue
        result = SweepResult(
            point=point,
            losses=[float(x) for x in run.losses[k]],
            heldout=task.evaluate(model),
            train_eval=task.evaluate(model, split="train") if small else None,
            forgetting=forgetting(model),
            trainable_parameters=counts.trainable,
            total_parameters=counts.total,
            memory=_first_step_memory(point, base, device),
            wall_seconds=share,
            tokens_per_second=tokens / share,
            device=str(device),
            date=now_utc(),
            extra={"batched": {"configs": len(chunk), "chunk_seconds": run.wall_seconds}},
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _diverged_result(point, task, counts, losses, message: str, device: str) -> SweepResult:
    """The record of a run stopped because its loss became nan/inf."""
    warnings.warn(f"{describe(point)} on {point.task}: {message}", stacklevel=3)
    n = len(task.heldout_inputs)
    return SweepResult(
        point=point,
        losses=[float(x) for x in losses if math.isfinite(x)],
        heldout={"loss": math.nan, "accuracy": 0.0, "n": n},
        train_eval=None,
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        memory=None,
        wall_seconds=0.0,
        tokens_per_second=0.0,
        device=device,
        date=now_utc(),
        extra={"diverged": message},
        diverged=True,
    )


def run_point(
    point: SweepPoint, device: torch.device | str | None = None, progress: bool = True
) -> SweepResult:
    """Train one point from the shipped base and measure it (no caching here)."""
    task = get_task(point.task)
    model = load_base_model(device)
    point.prepare(model)  # seeds LoRA's A init and adapter dropout; 4-bit base if asked
    counts = count_parameters(model)
    try:
        run = train(model, point.training_task(), point.steps, point.lr, point.batch_size,
                    point.seed, device, progress)  # fmt: skip
    except TrainingDiverged as exc:
        return _diverged_result(point, task, counts, exc.losses, str(exc), str(device or ""))
    # Overfitting only shows on a small train set; evaluating 20,000 examples would cost more
    # than it tells.
    train_eval = task.evaluate(model, split="train") if task.n_train <= SMALL_DATA_LIMIT else None
    return SweepResult(
        point=point,
        losses=[float(x) for x in run.losses],
        heldout=dict(run.heldout),  # the task's own held-out split (replay leaves it alone)
        train_eval=train_eval,
        forgetting=forgetting(model),
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        memory=None if run.memory is None else run.memory.to_dict(),
        wall_seconds=run.wall_seconds,
        tokens_per_second=run.tokens_per_second,
        device=run.device,
        date=now_utc(),
    )


# ---------------------------------------------------------------------------------------------
# The cache: one JSON file per point
# ---------------------------------------------------------------------------------------------


def run_chunk(
    unit: Sequence[SweepPoint],
    device: torch.device | str | None = None,
    progress: bool = True,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Train one unit of `plan_chunks`: one point alone, or several batched together.

    A batched unit larger than this device's free memory holds (half of it, as planned here)
    trains in smaller chunks, and one that still runs out of memory is halved (run_group), so
    a unit planned for a larger device (another Ray worker's) still trains.
    """
    unit = list(unit)
    if len(unit) == 1:
        result = run_point(unit[0], device=device, progress=progress)
        if on_result is not None:
            on_result(result)
        return [result]
    device = torch.device(device) if device is not None else default_device()
    fits = memory_fit(unit, free_memory(device))
    return run_group(unit, device, progress, min(len(unit), fits), on_result=on_result)
