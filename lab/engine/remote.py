"""A sweep's units as Ray tasks: workers train and return results, the driver checks them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..text import plural
from .batched import CPU_ROWS_PER_STEP
from .executors import RaySession, task_error
from .plan import chunk_size, plan_chunks, say_alone
from .points import SweepPoint, base_fingerprint, describe
from .results import SweepResult, refusal
from .run import run_chunk

__all__ = ["train_on_ray"]


def _remote_chunk_size(items: list[dict], device: str) -> int:
    """A Ray task's work: chunk_size on this worker, for its device, threads and memory."""
    return chunk_size([SweepPoint.from_dict(d) for d in items], device)


def _remote_unit(items: list[dict], device: str, run_fn: Callable | None) -> dict:
    """A Ray task's work: train one unit on this worker, return the results as dicts."""
    unit = [SweepPoint.from_dict(d) for d in items]
    if run_fn is not None:
        results = [run_fn(p, device=device, progress=False) for p in unit]
        for point, result in zip(unit, results, strict=True):
            problem = refusal(result, point)
            if problem is not None:
                raise TypeError(problem)
    else:
        results = run_chunk(unit, device, progress=False)
    return {"base": base_fingerprint(), "results": [r.to_dict() for r in results]}


def train_on_ray(
    session: RaySession,
    mine: list[SweepPoint],
    device: torch.device | None,
    run_fn: Callable | None,
    batched: bool,
    max_configs: int | None,
    bar,
    done: Callable[[SweepResult], None],
) -> dict[SweepPoint, str]:
    """Train `mine` as Ray tasks, one per unit; cache each result as it comes; failures back."""
    kind = session.device_kind(device)
    if run_fn is not None or not batched:
        units = [[p] for p in mine]
    else:
        say_alone(mine)

        def size(group: list[SweepPoint]) -> int:  # chosen by a worker, for its own device
            try:
                return int(session.call(_remote_chunk_size, [p.to_dict() for p in group], kind))
            except session.ray.exceptions.RayError as exc:
                # Planning only chooses how many points share a step, never their numbers: fall
                # back to the CPU rule (a worker still trims a unit to its memory) and let the
                # training tasks succeed, or fail and be reported by point.
                n = max(1, CPU_ROWS_PER_STEP // group[0].batch_size)
                tqdm.write(
                    f"could not ask a worker for the chunk size ({task_error(exc)}); "
                    f"training {n} per task"
                )
                return n

        units = plan_chunks(mine, kind, max_configs, size=size)
    slots = session.slots(kind)
    left = len(units)
    devices = plural(slots, "GPU" if kind == "cuda" else "CPU")

    def show() -> None:
        busy = min(left, slots)
        bar.set_postfix_str(f"{plural(busy, 'worker')} busy, {devices}", refresh=True)

    failures: dict[SweepPoint, str] = {}
    ours = base_fingerprint()
    jobs = session.map(_remote_unit, [[p.to_dict() for p in u] for u in units], kind, (run_fn,),
                       on_start=lambda n: show())  # fmt: skip
    with contextlib.closing(jobs):  # leaving early (Ctrl-C) cancels what is still out
        for index, value, where, error in jobs:
            left -= 1
            unit = units[index]
            got: list[SweepResult] = []
            if error is None:
                error = _check_returned(value, unit, ours, where)
            if error is None:
                got = [SweepResult.from_dict(d) for d in value["results"]]
                for result in got:
                    result.extra["worker"] = {"host": where.host, "device": where.device}
                    done(result)
            else:
                for point in unit:
                    failures[point] = error
                tqdm.write(f"failed: {', '.join(describe(p) for p in unit)}: {error}")
            show()
    return failures


def _check_returned(value: object, unit: list[SweepPoint], ours: str, where) -> str | None:
    """What is wrong with a task's returned value (None: nothing); results are never trusted."""
    if not isinstance(value, dict) or not isinstance(value.get("results"), list):
        return f"the task returned {type(value).__name__}, not a dict of results"
    if value.get("base") != ours:
        return (
            f"the worker on {where.host} has another base model ({value.get('base')}, this "
            f"driver {ours}): install the same lab on every machine"
        )
    try:
        points = [SweepResult.from_dict(d).point for d in value["results"]]
    except ValueError as exc:  # nan where a number must be, an accuracy above 1, ...
        return f"the worker on {where.host} returned an invalid result ({exc})"
    if sorted(p.key for p in points) != sorted(p.key for p in unit):
        return f"the worker on {where.host} returned results for other points than it was given"
    return None
