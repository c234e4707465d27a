"""A 64-point sweep in one process against the same sweep on local Ray workers.

The grid (ranks 1, 2, 4, 8 x alphas 8, 16 x dropouts 0, 0.1 x four learning rates, on rotate) is
planned once as sweep() plans it (lab.sweeps.plan_chunks: batched chunks, chunk size chosen by
lab.engine.calibrate; that choice is made before either side is timed and shown apart), then trained
twice into fresh caches, in turns:

- one process: sweep(..., executor="local"), this process with its torch threads;
- Ray: sweep(..., executor=RaySession(workers=N)), a local Ray with N one-thread CPU workers
  (on a GPU machine: one worker per GPU), each chunk one task.

Each side's seconds cover planning, training, evaluation and caching, as a user waits for them;
Ray's start-up (ray.init, until the cluster answers) is timed apart and not in its sweep
seconds. The report also counts the points whose numbers are bit-identical on both sides. From
the repository root:

    python -m benchmarks.ray_sweep                    # about 5 minutes on 2 cores
    python -m benchmarks.ray_sweep --steps 2 --stem ray_sweep-quick

writes benchmarks/results/ray_sweep.json and ray_sweep.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench import _positive_int, _table
from benchmarks.common import describe_machine, machine
from lab.engine.executors import RaySession
from lab.fileio import atomic_write_bytes
from lab.sweeps import SweepCache, SweepPoint, check_writable_dir, grid, plan_chunks, sweep

OUT = Path(__file__).parent / "results"
TASK = "rotate"
RANKS, ALPHAS, DROPOUTS = (1, 2, 4, 8), (8.0, 16.0), (0.0, 0.1)
LRS = (5e-3, 1e-2, 2e-2, 4e-2)
STEPS, BATCH, REPEATS = 60, 32, 1


def points_64(steps: int = STEPS, batch_size: int = BATCH) -> list[SweepPoint]:
    """The benchmark's grid: 4 ranks x 2 alphas x 2 dropouts x 4 learning rates."""
    return grid(TASK, RANKS, ALPHAS, DROPOUTS, steps=steps, batch_size=batch_size, lrs=LRS)


def _timed_sweep(points, folder: Path, executor) -> tuple[float, list]:
    start = time.perf_counter()
    results = sweep(points, SweepCache(folder), progress=False, device=None, executor=executor)
    return time.perf_counter() - start, results


def _same(a, b) -> bool:
    skip = {"wall_seconds", "tokens_per_second", "date", "extra"}
    return all(
        getattr(a, f.name) == getattr(b, f.name)
        for f in dataclasses.fields(a)
        if f.name not in skip
    )


def bench_ray_sweep(
    steps: int = STEPS,
    batch_size: int = BATCH,
    workers: int = 2,
    repeats: int = REPEATS,
    address: str | None = None,
    points: Sequence[SweepPoint] | None = None,
) -> dict:
    """One process against Ray workers on the same grid, `repeats` rounds in turns.

    `points` replaces the 64-point grid (the tests run a small one).
    """
    points = points_64(steps, batch_size) if points is None else list(points)
    with RaySession(address, workers=None if address else workers) as session:
        kind = session.device_kind(None)  # a GPU per worker when the cluster has GPUs
        start = time.perf_counter()
        units = plan_chunks(points, "cuda" if kind == "cuda" else "cpu")  # calibrates if it pays
        plan_seconds = time.perf_counter() - start
        local_s, ray_s, same, ray_chunks = [], [], [], set()
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="lora-lab-ray-bench-") as tmp:
                tmp = Path(tmp)
                one, local = _timed_sweep(points, tmp / "local", "local")
                many, remote = _timed_sweep(points, tmp / "ray", session)
            local_s.append(one)
            ray_s.append(many)
            same.append(sum(_same(a, b) for a, b in zip(local, remote, strict=True)))
            # A worker plans the Ray side's chunks (its own threads and calibration).
            ray_chunks |= {r.extra.get("batched", {}).get("configs", 1) for r in remote}
        return {
            "name": "ray_sweep",
            "machine": machine("cuda" if kind == "cuda" else "cpu"),
            "settings": {
                "task": TASK,
                "ranks": list(RANKS),
                "alphas": list(ALPHAS),
                "dropouts": list(DROPOUTS),
                "lrs": list(LRS),
                "steps": steps,
                "batch_size": batch_size,
                "repeats": repeats,
            },  # fmt: skip
            "points": len(points),
            "units": [len(u) for u in units],
            "ray_chunk_sizes": sorted(ray_chunks),
            "plan_seconds": plan_seconds,
            "ray": {
                "cluster": session.summary,
                "device": kind,
                "slots": session.slots(kind),
                "startup_seconds": session.startup_seconds,
            },  # fmt: skip
            "local_torch_threads": torch.get_num_threads(),
            "local_s": statistics.median(local_s),
            "ray_s": statistics.median(ray_s),
            "speedup": statistics.median(local_s) / statistics.median(ray_s),
            "rounds": {"local_s": local_s, "ray_s": ray_s},
            "identical_points": min(same),
        }


def markdown(report: dict) -> str:
    """The report as a short markdown page."""
    s, ray = report["settings"], report["ray"]
    units = report["units"]
    lines = [
        f"# A {report['points']}-point sweep: one process against Ray workers",
        "",
        f"Measured {report['machine']['date'][:10]} on {describe_machine(report['machine'])}.",
        "",
        f"Grid: {len(s['ranks'])} ranks x {len(s['alphas'])} alphas x {len(s['dropouts'])} "
        f"dropouts x {len(s['lrs'])} learning rates = {report['points']} points on {s['task']}, "
        f"{s['steps']} steps at batch {s['batch_size']}; planned as {len(units)} units "
        f"(batched chunks of {max(units)} at most), the plan taking "
        f"{report['plan_seconds']:.1f} s (chunk-size measurement included); on Ray a worker "
        f"chose chunks of {', '.join(map(str, report['ray_chunk_sizes']))}.",
        "",
        *_table(
            ["", "seconds", "vs one process"],
            [
                [
                    f"one process ({report['local_torch_threads']} torch threads)",
                    f"{report['local_s']:.1f}",
                    "1.00x",
                ],
                [
                    f"Ray: {ray['slots']} workers ({ray['device']}), sweep only",
                    f"{report['ray_s']:.1f}",
                    f"**{report['speedup']:.2f}x**",
                ],
                ["Ray start-up, apart", f"{ray['startup_seconds']:.1f}", "-"],
            ],  # fmt: skip
        ),
        "",
        f"Ray: {ray['cluster']}. Medians of {s['repeats']} round(s), each side in turn. "
        f"{report['identical_points']} of {report['points']} points have bit-identical numbers "
        "on both sides (losses, held-out and train evaluations, forgetting, memory).",
        "",
        "Both sides use the same cores: one process runs its torch threads on all of them, Ray "
        "one single-thread worker per core. On a CPU the gain from Ray is more machines (or "
        "GPUs), not more of one machine's cores; on one machine the ratio weighs single-thread "
        "workers (each matmul on one core, plus a task's overhead: a worker process, results "
        "sent back) against one process whose matmuls use every core.",
    ]
    return "\n".join(lines) + "\n"


def write_results(report: dict, out_dir: Path, stem: str) -> list[Path]:
    check_writable_dir(out_dir, "results folder", "choose another with --out")
    json_path = atomic_write_bytes(out_dir / f"{stem}.json",
                                   (json.dumps(report, indent=1) + "\n").encode())  # fmt: skip
    md_path = atomic_write_bytes(out_dir / f"{stem}.md", markdown(report).encode())
    return [json_path, md_path]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_sweep", description=__doc__)
    p.add_argument("--steps", type=_positive_int("--steps"), default=STEPS)
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=BATCH)
    p.add_argument("--workers", type=_positive_int("--workers"), default=2)
    p.add_argument("--repeats", type=_positive_int("--repeats"), default=REPEATS)
    p.add_argument("--address", default=None, help="a Ray cluster (HOST:PORT); default: local")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--stem", default="ray_sweep")
    args = p.parse_args(argv)
    report = bench_ray_sweep(args.steps, args.batch_size, args.workers, args.repeats, args.address)
    for path in write_results(report, args.out, args.stem):
        print(path)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
