"""Planning a sweep: which points train together, in chunks of what size, and whether they fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..base import load_base_config
from ..model import ModelConfig
from ..tasks import get_task
from ..text import plural
from ..training import check_count, plan_memory, too_large
from .batched import CPU_ROWS_PER_STEP
from .calibrate import calibrated_chunk_size
from .devices import free_memory
from .points import SweepPoint, describe, flavour_name

__all__ = ["check_memory", "chunk_size", "group_key", "memory_fit", "plan_chunks", "say_alone"]

FREE_FRACTION = 0.5  # a batched run plans for half the free memory: the rest is the system's


def group_key(point: SweepPoint) -> tuple:
    """Points with equal keys can train together in one batched run (LoRA points only)."""
    return (point.task, point.steps, point.batch_size, point.replay)


def memory_fit(
    group: Sequence[SweepPoint], free: int | None, config: ModelConfig | None = None
) -> int:
    """How many of `group`'s points (one group_key) fit in half of `free` bytes, at least 1.

    The engine's one memory fit, from lab.training's memory plan (`plan_memory`, for the largest
    adapter among them); `free` comes from lab.engine.devices.free_memory (None, unknown: 4 GiB is
    assumed).
    """
    point = group[0]
    adapters = [(p.lora.targets, p.lora.rank) for p in group]
    plan = plan_memory(config or load_base_config(), point.batch_size, point.steps, adapters)
    return max(1, plan.how_many_fit(4 << 30 if free is None else free, FREE_FRACTION))


def check_memory(
    points: Sequence[SweepPoint], device: torch.device, free: int | None, config: ModelConfig
) -> None:
    """MemoryError, before anything trains, for the first point whose run cannot fit in `free`.

    Each point alone, by lab.training's memory plan (`plan_memory`); None (unknown free memory)
    lets every point through.
    """
    if free is None:
        return
    for p in points:
        adapters = None if p.is_full else [(p.lora.targets, p.lora.rank)]
        needed = plan_memory(config, p.batch_size, p.steps, adapters).bytes()
        if needed > free:
            what = f"{describe(p)} with batch_size={p.batch_size:,} for steps={p.steps:,}"
            raise too_large(needed, free, device, what)


def static_chunk(fits: int, batch_size: int, device: torch.device) -> int:
    """The chunk size without measuring: what fits; on a CPU also about CPU_ROWS_PER_STEP
    sequences per step (where a CPU measured fastest)."""
    if device.type == "cuda":
        return fits
    return min(fits, max(1, CPU_ROWS_PER_STEP // batch_size))


def chunk_size(
    group: Sequence[SweepPoint],
    device: torch.device | str,
    *,
    calibrate: bool = True,
    free: int | None = None,
    config: ModelConfig | None = None,
) -> int:
    """How many of `group`'s points (one group_key) one batched run takes on `device`.

    With `calibrate`: the chunk size `lab.engine.calibrate` measured fastest for such a group on
    this machine (1: each point trains alone, faster here than batched), measured when that
    costs under 5% of the group's training and remembered in user_cache_root()/calibration.json;
    $LORA_LAB_CALIBRATE=0 turns it off. Otherwise, and while nothing is measured: what fits in
    half the device's free memory (`memory_fit`), and on a CPU about CPU_ROWS_PER_STEP sequences
    per step. Chunking never changes a point's numbers. `free` and `config`: the plan's, when
    it has them (asked here otherwise).
    """
    group = list(group)
    device = torch.device(device)
    batch_size = group[0].batch_size
    config = config or load_base_config()
    fits = memory_fit(group, free_memory(device) if free is None else free, config)
    static = static_chunk(fits, batch_size, device)
    if not calibrate:
        return static
    specs = [p.spec() for p in group]
    return calibrated_chunk_size(
        specs, get_task(group[0].task), batch_size, group[0].steps, device, static=static,
        limit=fits, config=config,
    )  # fmt: skip


def plan_chunks(
    points: Sequence[SweepPoint],
    device: torch.device | str,
    max_configs: int | None = None,
    size: Callable[[list[SweepPoint]], int] | None = None,
    *,
    free: int | None = None,
    config: ModelConfig | None = None,
) -> list[list[SweepPoint]]:
    """The units of work sweep() trains `points` in, in order: each a list of points.

    A point the batched engine cannot train (full fine-tuning, a 4-bit base, a flavour without
    an exact batched form) is a unit of its own; the batchable LoRA points are grouped by
    `group_key` and each group is cut into chunks of `max_configs` (default `chunk_size`, or
    `size(group)` when given: the rule for a device elsewhere, such as a Ray worker's GPU). A
    unit of one point trains alone (`run_point`), a longer one as one batched run (`run_group`).
    Local sweeps run the units one after another, `executor="ray"` hands each to a Ray task.
    """
    if max_configs is not None:
        check_count("max_configs", max_configs)
    units: list[list[SweepPoint]] = []
    groups: dict[tuple, list[SweepPoint]] = {}
    for point in dict.fromkeys(points):
        if point.batchable:
            groups.setdefault(group_key(point), []).append(point)
        else:
            units.append([point])
    if groups and max_configs is None and size is None:
        config = config or load_base_config()
        free = free_memory(device) if free is None else free  # asked once for the whole plan
    for group in groups.values():
        if max_configs is not None:
            n = max_configs
        elif size is not None:
            n = size(group)
        else:
            n = chunk_size(group, device, free=free, config=config)
        units += [group[i : i + n] for i in range(0, len(group), n)]
    return units


def say_alone(points: Sequence[SweepPoint]) -> None:
    """One line naming the LoRA flavours among `points` that the batched engine cannot train."""
    alone = [p for p in points if not p.is_full and not p.batchable]
    if alone:
        kinds = sorted({flavour_name(p) for p in alone})
        tqdm.write(
            f"{plural(len(alone), 'point')} ({', '.join(kinds)}) "
            f"{'trains' if len(alone) == 1 else 'train'} one by one: the "
            "batched engine has no exact form for them"
        )
