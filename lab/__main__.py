"""Command line: `python -m lab sweep ...` trains a grid; `python -m lab bench ...` measures.

python -m lab sweep --ranks 1 4 8 16 --alphas 8 16 --dropouts 0 0.1   # a 16-point grid
python -m lab sweep --task rotate --ranks 8 --full --steps 300
python -m lab bench                      # every benchmark, results to benchmarks/results
python -m lab bench sweep layers --quick # a smoke run of two benchmarks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import bench
from .sweep import (
    ALL_TARGETS,
    DEFAULT_ALPHA,
    DEFAULT_STEPS,
    DEFAULT_TARGETS,
    SweepCache,
    describe,
    full_point,
    grid,
    sweep,
)
from .tasks import FINETUNE_TASKS


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of LoRA settings (batched) and cache results")
    p.add_argument("--task", default="sort_desc", choices=FINETUNE_TASKS)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--alphas", type=float, nargs="+", default=[DEFAULT_ALPHA])
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0])
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), choices=ALL_TARGETS)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r), not alpha/r")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="add the full fine-tuning reference")
    p.add_argument("--no-batch", action="store_true", help="train one point after another")
    p.add_argument("--max-configs", type=int, default=None, help="cap on points per batch")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best there is)")
    p.add_argument("--cache", default=None, help="cache folder (default: $LORA_LAB_CACHE or "
                   "~/.cache/lora-lab/sweeps)")  # fmt: skip


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run benchmarks; write JSON, markdown and plots")
    p.add_argument(
        "names",
        nargs="*",
        default=list(bench.BENCHMARKS),
        help=f"which benchmarks (default all): {', '.join(bench.BENCHMARKS)}",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="where results are written")
    p.add_argument("--stem", default=None, help="file name stem (default: bench, bench-quick)")


def run_sweep(args: argparse.Namespace) -> int:
    points = grid(args.task, args.ranks, args.alphas, args.dropouts, tuple(args.targets),
                  args.rslora, args.steps, None, args.batch_size, args.seed)  # fmt: skip
    if args.full:
        points.append(full_point(args.task, args.steps, None, args.batch_size, args.seed))
    cache = SweepCache(args.cache)
    todo = {p for p in points if p not in cache}
    print(f"{len(points)} points on {args.task}, {len(todo)} to train; cache {cache.directory}")
    start = time.perf_counter()
    results = sweep(points, cache, device=args.device, batched=not args.no_batch,
                    max_configs=args.max_configs)  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"{'point':<28} {'held-out acc':>12} {'loss':>7} {'trainable':>10} {'train s':>8}")
    for r in results:
        print(f"{describe(r.point):<28} {r.heldout['accuracy']:>12.3f} {r.heldout['loss']:>7.3f} "
              f"{r.trainable_parameters:>10,} {r.wall_seconds:>8.1f}")  # fmt: skip
    chunks = [r.extra["batched"]["configs"] for r in results
              if r.point in todo and "batched" in r.extra]  # fmt: skip
    if chunks:  # a run of c points gave c results, each saying c
        runs = round(sum(1 / c for c in chunks))
        print(f"batched: {len(chunks)} points in {runs} run{'s' * (runs != 1)} "
              f"of up to {max(chunks)} points")  # fmt: skip
    print(f"done in {seconds:.1f} s")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    torch.set_num_threads(torch.get_num_threads())  # as configured; recorded in the results
    report = bench.run_all(args.names, quick=args.quick, device=args.device)
    stem = args.stem or ("bench-quick" if args.quick else "bench")
    for path in bench.write_results(report, Path(args.out), stem):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _sweep_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_sweep(args) if args.command == "sweep" else run_bench(args)
    except ValueError as exc:  # bad settings: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
