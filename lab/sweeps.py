"""Sweeps: train a grid of LoRA settings once, cache every result on disk, summarise the cache.

This module is the engine's public face: `sweep()` and the names a notebook imports. The engine
itself lives in lab/engine/, one concern a file (docs/architecture.md draws the map):

    points.py     what to train: SweepPoint (a LoRAConfig plus training settings), grid, labels
    results.py    what a run measured: SweepResult, its JSON and its validation
    cache.py      one JSON file per point (SweepCache), cache folders, grid files
    lock.py       one point's OS file lock, so two sweeps never train a point twice
    plan.py       groups, chunk sizes and the memory fit
    run.py        training a point alone or a group batched (lab.engine.batched)
    remote.py     units as Ray tasks (executors.py: the Ray session itself)
    calibrate.py  the chunk size measured fastest on this machine
    devices.py    the device, its free memory, torch's compiler cache folder
    summaries.py  cached results as the lists lab.plots draws

A point goes sweep() -> the cache (a hit ends here) -> plan_chunks -> run_point or run_group
-> SweepCache.put, and comes back from sweep() as a SweepResult.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import threads
from .base import load_base_config
from .engine.cache import (
    CACHE_VAR,
    DEFAULT_GRID_PATH,
    SweepCache,
    SweepCacheError,
    cache_dir,
    check_writable_dir,
    default_cache_dir,
    load_grid_file,
    write_grid_file,
)
from .engine.devices import (
    TORCH_CACHE_VAR,
    free_memory,
    keep_torch_cache_at_home,
    ray_device,
    resolve_device,
)
from .engine.executors import RaySession, check_executor
from .engine.plan import check_memory, chunk_size, group_key, plan_chunks, say_alone
from .engine.points import (
    ALL_TARGETS,
    ALL_TARGETS_SORTED,
    DEFAULT_ALPHA,
    DEFAULT_STEPS,
    DEFAULT_TARGETS,
    FORMAT,
    FULL_LR,
    LORA_LR,
    SHORT_TARGETS,
    SweepPoint,
    base_fingerprint,
    describe,
    full_point,
    grid,
)
from .engine.remote import train_on_ray
from .engine.results import SweepResult, refusal
from .engine.run import run_chunk, run_group, run_point
from .engine.summaries import accuracy_table, by_rank, dropout_series, select, trainable_counts
from .fileio import user_cache_root
from .text import plural
from .training import check_count

__all__ = [
    "ALL_TARGETS",
    "ALL_TARGETS_SORTED",
    "CACHE_VAR",
    "DEFAULT_ALPHA",
    "DEFAULT_GRID_PATH",
    "DEFAULT_STEPS",
    "DEFAULT_TARGETS",
    "FORMAT",
    "FULL_LR",
    "LORA_LR",
    "SHORT_TARGETS",
    "SweepCache",
    "SweepCacheError",
    "SweepFailed",
    "SweepPoint",
    "SweepResult",
    "TORCH_CACHE_VAR",
    "accuracy_table",
    "base_fingerprint",
    "by_rank",
    "cache_dir",
    "check_writable_dir",
    "chunk_size",
    "default_cache_dir",
    "describe",
    "dropout_series",
    "full_point",
    "grid",
    "group_key",
    "keep_torch_cache_at_home",
    "load_grid_file",
    "plan_chunks",
    "resolve_device",
    "run_chunk",
    "run_group",
    "run_point",
    "select",
    "sweep",
    "trainable_counts",
    "user_cache_root",
    "write_grid_file",
]

# A sweep waiting for points another sweep trains says so after this long; it gives up, naming
# the lock, after the cache's lock_wait (lab.engine.lock.LOCK_WAIT_SECONDS) without progress.
WAIT_NOTICE_SECONDS = 10.0


def sweep(
    points: Iterable[SweepPoint],
    cache: SweepCache | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    *,
    run_fn: Callable[..., SweepResult] | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
    batched: bool = True,
    max_configs: int | None = None,
    executor: str | RaySession = "local",
    address: str | None = None,
) -> list[SweepResult]:
    """Results for `points` in order: cached ones are read, the others trained and cached.

    By default the LoRA points still to train are grouped by (task, steps, batch_size) and each
    group trains in one batched run (`run_group`; `max_configs` caps a chunk); full fine-tuning
    points train one by one with `run_point`. `batched=False` trains every point alone.
    `cache` defaults to `SweepCache()` (the user's cache folder or $LORA_LAB_CACHE). A `run_fn`
    replaces run_point and turns batching off: it is called as run_fn(point, device=...,
    progress=...), so tests and widgets can pass a fake trainer. `on_result` is called after
    each newly trained point.

    Before anything trains, the cache folder is checked (SweepCacheError if it cannot be
    written) and each point's memory estimated (MemoryError if it cannot fit). A point another
    sweep is training into the same cache is waited for, not trained twice: for at most
    `cache.lock_wait` seconds without progress, then SweepCacheError names its lock. A result whose
    write fails later is still returned, with a warning (its points in `cache.unsaved`). A run
    whose loss became nan/inf is returned and cached as diverged. What a `run_fn` returns is
    kept only if it is a valid SweepResult of the point it was asked for: anything else (None,
    another point's result, NaN where a number must be) is never cached, its point fails with
    the reason, and SweepFailed is raised at the end, after every other point is cached.

    `executor="ray"` trains each unit of `plan_chunks` (a batched chunk, or one point) as a Ray
    task (lab.engine.remote): on a local Ray started for the sweep, or on the cluster at `address`
    ('HOST:PORT' of `ray start --head`); a `lab.engine.executors.RaySession` gives more control
    (workers, temp dir, retries). Each task asks for one GPU when the cluster has GPUs (device
    None or 'cuda'), else one CPU; a worker chooses the chunk size (chunk_size on its device:
    its memory, its calibration). This process stays the only writer of the cache: each result
    is validated and cached as its task returns, so an interrupted sweep keeps every finished
    point. A task whose worker dies is rerun by Ray; one that fails for good raises SweepFailed
    at the end, naming each of its points with the error, after every other point is cached.
    """
    cache = SweepCache() if cache is None else cache
    if not isinstance(cache, SweepCache):
        raise TypeError(f"cache must be a SweepCache or None, got {type(cache).__name__}")
    if isinstance(points, SweepPoint):
        points = [points]
    points = list(dict.fromkeys(points))
    wrong = [p for p in points if not isinstance(p, SweepPoint)]
    if wrong:
        raise TypeError(f"points must be SweepPoints (lab.grid builds them), got {wrong[0]!r}")
    if max_configs is not None:
        check_count("max_configs", max_configs)
    on_ray = isinstance(executor, RaySession) or check_executor(executor) == "ray"
    if address is not None and not (on_ray and isinstance(executor, str)):
        raise ValueError(f"address={address!r} is for executor='ray' (a RaySession has its own)")
    # On Ray the device is the workers' (a GPU per task, or CPUs), not necessarily one here.
    device = ray_device(device) if on_ray else resolve_device(device)
    results: dict[SweepPoint, SweepResult | None] = {p: cache.get(p) for p in points}
    todo = [p for p in points if results[p] is None]
    cache.unsaved = []
    config, free = None, None  # the plan's base config and free memory, each read once
    if todo:
        cache.check_writable()  # before anything is trained
        if not on_ray:  # Ray workers check their own device's memory
            config, free = load_base_config(), free_memory(device)
            check_memory(todo, device, free, config)
            # trains here: the lab's thread rule, before chunk sizes are measured
            threads.training_threads()
            keep_torch_cache_at_home()
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress or not todo)
    held: set[SweepPoint] = set()
    errors: list[OSError] = []
    failures: dict[SweepPoint, str] = {}
    stack = contextlib.ExitStack()
    ray_run: RaySession | None = None

    def done(result: SweepResult, point: SweepPoint | None = None) -> None:
        """Cache a newly trained result; one that is not a valid result of `point` fails it."""
        point = result.point if point is None and isinstance(result, SweepResult) else point
        problem = refusal(result, point)
        if problem is not None:
            failures[point] = problem
            cache.release(point)
            held.discard(point)
            tqdm.write(f"failed: {describe(point)}: {problem}")
            return
        results[result.point] = result
        try:
            cache.put(result)
        except OSError as exc:  # kept in memory and returned; reported at the end
            cache.unsaved.append(result.point)
            errors.append(exc)
        finally:
            cache.release(result.point)
            held.discard(result.point)
        bar.update(1)
        if on_result is not None:
            on_result(result)

    def train_these(mine: list[SweepPoint]) -> None:
        nonlocal ray_run
        if on_ray:
            if ray_run is None:
                session = executor if isinstance(executor, RaySession) else RaySession(address)
                ray_run = stack.enter_context(session)
            failures.update(train_on_ray(ray_run, mine, device, run_fn, batched, max_configs,
                                         bar, done))  # fmt: skip
            for point in failures:
                cache.release(point)
                held.discard(point)
            return
        if run_fn is not None or not batched:
            fn = run_point if run_fn is None else run_fn
            for point in mine:
                done(fn(point, device=device, progress=progress), point)
            return
        say_alone(mine)
        for unit in plan_chunks(mine, device, max_configs, free=free, config=config):
            if len(unit) == 1:  # the units fit as planned: no second memory estimate
                done(run_point(unit[0], device=device, progress=progress), unit[0])
            else:
                run_group(unit, device, progress, len(unit), on_result=done)

    try:
        pending = todo
        while pending:
            mine, waiting = [], []
            for point in pending:
                if not cache.claim(point):
                    waiting.append(point)
                    continue
                held.add(point)
                found = cache.get(point)  # finished by another sweep just before the claim?
                if found is None:
                    mine.append(point)
                else:
                    results[point] = found
                    cache.release(point)
                    held.discard(point)
                    bar.update(1)
            train_these(mine)
            since, said = time.monotonic(), False
            while waiting and all(cache.claimed(p) for p in waiting):
                time.sleep(0.5)  # another sweep is training these: wait for its results
                waited = time.monotonic() - since
                if waited > cache.lock_wait:  # no progress for that long: stop, say why
                    raise cache.stuck(waiting[0], waited)
                if not said and waited > WAIT_NOTICE_SECONDS:
                    said = True
                    tqdm.write(
                        f"waiting for {plural(len(waiting), 'point')} that another sweep is "
                        f"training into {cache.directory} ({describe(waiting[0])}: "
                        f"{cache.holder(waiting[0])}), at most {cache.lock_wait:.0f} s without "
                        "progress"
                    )
            pending = []
            for point in waiting:
                found = cache.get(point)
                if found is not None:
                    results[point] = found
                    bar.update(1)
                else:
                    pending.append(point)
    finally:
        stack.close()  # a local Ray started for this sweep stops here
        for point in list(held):
            cache.release(point)
        bar.close()
        if errors:
            n = len(cache.unsaved)
            warnings.warn(
                f"could not save {plural(n, 'result')} to the sweep cache {cache.directory} "
                f"({errors[0].strerror or errors[0]}); {'it is' if n == 1 else 'they are'} "
                "returned but not cached",
                stacklevel=2,
            )
    if failures:
        raise SweepFailed(failures, [results[p] for p in points])
    return [results[p] for p in points]


class SweepFailed(RuntimeError):
    """Points that failed for good (on Ray workers, or a trainer's invalid result); every
    other point was trained and cached.

    `failures` maps each failed point to its error; `results` is sweep()'s list with None
    for the failed points.
    """

    def __init__(self, failures: dict[SweepPoint, str], results: list[SweepResult | None]):
        self.failures, self.results = dict(failures), list(results)
        kept = sum(r is not None for r in results)
        first = next(iter(self.failures.items()))
        super().__init__(
            f"{plural(len(failures), 'point')} failed ({describe(first[0])}: {first[1]}); "
            f"{kept:,} of {len(results):,} trained and kept"
        )
