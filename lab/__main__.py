"""Command line: `python -m lab sweep ...` trains a grid of LoRA settings and caches the results.

python -m lab sweep --ranks 1 4 8 16 --alphas 8 16 --dropouts 0 0.1   # a 16-point grid
python -m lab sweep --task rotate --ranks 8 --full --steps 300
python -m lab sweep --ranks 4 8 --variant dora                        # DoRA
python -m lab sweep --ranks 8 --lr-ratio 16                           # LoRA+ (lambda 16)
python -m lab sweep --ranks 8 --init pissa                            # PiSSA's initialisation
python -m lab sweep --ranks 8 --quant nf4                             # QLoRA: a 4-bit NF4 base
python -m lab sweep --ranks 1 16 --targets all-linear --lr 1e-3 1e-2 --full --full-lr 1e-4 1e-3
python -m lab sweep --ranks 8 --replay 0.05                           # 5% pretraining replay
python -m lab sweep --ranks 1 4 8 16 --ray                            # on a local Ray
python -m lab sweep --ranks 1 4 8 16 --ray 10.0.0.5:6379              # on a Ray cluster

The benchmarks are not here: they live in benchmarks/ (python -m benchmarks.bench).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch

from .config import INITS, MAX_LR_RATIO, VARIANTS
from .engine import calibrate
from .engine.devices import ray_device, resolve_device
from .engine.executors import RAY_INSTALL, RaySession, split_address
from .forgetting import MAX_REPLAY, source_summary
from .interrupts import kept
from .quant import SCHEMES
from .sweeps import (
    ALL_TARGETS,
    CACHE_VAR,
    DEFAULT_ALPHA,
    DEFAULT_STEPS,
    DEFAULT_TARGETS,
    FULL_LR,
    LORA_LR,
    SHORT_TARGETS,
    SweepCache,
    SweepFailed,
    cache_dir,
    describe,
    full_point,
    grid,
    sweep,
)
from .tasks import FINETUNE_TASKS
from .text import plural
from .training import MAX_STEPS, SEED_LIMIT
from .variants.registry import choices_help

# `python -m lab bench` was the benchmarks' command; they are tools, not lessons, and now live
# outside the package.
BENCH_COMMAND = "python -m benchmarks.bench"
BENCH_MOVED = "the benchmarks live in benchmarks/ now:"


def _int_type(name: str, low: int, high: int):
    """An argparse type: an int in [low, high], else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} {text!r} is not a whole number (write 1000000, not 1e6)"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value:,} is out of range [{low}, {high:,}]")
        return value

    return parse


def _float_type(
    name: str, low: float, high: float, high_open: bool = False, low_open: bool = False
):
    """An argparse type: a finite float in [low, high] (either end open), else a usage error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            opening, closing = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"{name} {text} is out of range {opening}{low}, {high}{closing}"
            )
        return value

    return parse


def _cache_folder(text: str) -> str:
    """An argparse type: a non-empty folder name ('' would be the current folder)."""
    try:
        cache_dir(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a folder name: leave --cache out for the default "
            f"(${CACHE_VAR}, else ~/.cache/lora-lab/sweeps)"
            if not text.strip()
            else str(exc)
        ) from None
    return text


def _target(text: str) -> str:
    full = SHORT_TARGETS.get(text, text)
    if full not in ALL_TARGETS and full != "all-linear":
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a layer: choose from {', '.join(ALL_TARGETS)} "
            f"(or {', '.join(SHORT_TARGETS)}), or all-linear for all of them"
        )
    return full


def _sweep_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="train a grid of LoRA settings (batched) and cache results")
    p.add_argument("--task", default="sort_desc", choices=FINETUNE_TASKS)
    p.add_argument("--ranks", type=_int_type("rank", 1, 4096), nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--alphas", type=_float_type("alpha", 1e-6, 1e6), nargs="+",
                   default=[DEFAULT_ALPHA])  # fmt: skip
    p.add_argument("--dropouts", type=_float_type("dropout", 0.0, 1.0, high_open=True),
                   nargs="+", default=[0.0])  # fmt: skip
    names = f"{', '.join(ALL_TARGETS)} (or {', '.join(SHORT_TARGETS)})"
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), type=_target,
                   help=f"layers: {names}")  # fmt: skip
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r), not alpha/r")
    p.add_argument(
        "--variant",
        default="lora",
        choices=list(VARIANTS),
        help=f"the adapter layer: {choices_help(VARIANTS)}",
    )
    p.add_argument(
        "--init",
        default="default",
        choices=list(INITS),
        help=f"A and B at the start: {choices_help(INITS)}",
    )
    p.add_argument(
        "--lr-ratio",
        type=_float_type("lr ratio", 0.0, MAX_LR_RATIO, low_open=True),
        default=1.0,
        metavar="LAMBDA",
        help="LoRA+: B's learning rate over A's (1: plain LoRA; LoRA+ uses 16)",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=list(SCHEMES),
        help="train on a 4-bit frozen base (QLoRA uses nf4); default: the fp32 base",
    )
    p.add_argument("--lr", type=_float_type("lr", 0.0, 10.0, low_open=True), default=None,
                   nargs="+", metavar="LR",
                   help=f"learning rate(s) of the LoRA points, several make lr an axis "
                        f"(default {LORA_LR:g}; LoRA+ wants a lower one)")  # fmt: skip
    p.add_argument("--full-lr", type=_float_type("full lr", 0.0, 10.0, low_open=True),
                   default=None, nargs="+", metavar="LR",
                   help=f"learning rate(s) of --full (default {FULL_LR:g})")  # fmt: skip
    p.add_argument("--replay", type=_float_type("replay", 0.0, MAX_REPLAY), default=0.0,
                   help="fraction of each batch from the pretraining mix (default 0); "
                        "practitioners replay 1-10%% to forget less")  # fmt: skip
    p.add_argument("--steps", type=_int_type("steps", 1, MAX_STEPS), default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=_int_type("batch size", 1, 2**31), default=64)
    p.add_argument("--seed", type=_int_type("seed", 0, SEED_LIMIT - 1), default=0)
    p.add_argument("--full", action="store_true", help="add the full fine-tuning reference")
    p.add_argument("--no-batch", action="store_true", help="train one point after another")
    p.add_argument("--max-configs", type=_int_type("max configs", 1, 10**6), default=None,
                   help="cap on points per batch")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best there is)")
    p.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                   help="train each batched chunk as a Ray task: on a local Ray started for the "
                        "run, or on the cluster at ADDRESS (HOST:PORT of `ray start --head`); "
                        f"needs {RAY_INSTALL}")  # fmt: skip
    p.add_argument("--workers", type=_int_type("workers", 1, 4096), default=None,
                   help="with --ray and no address: the local Ray's CPU slots (default: every "
                        "core)")  # fmt: skip
    p.add_argument("--cache", default=None, type=_cache_folder, metavar="FOLDER",
                   help="cache folder (default: $LORA_LAB_CACHE, else ~/.cache/lora-lab/sweeps); "
                        "an empty FOLDER is refused (it would be the current folder), and an "
                        "empty $LORA_LAB_CACHE counts as unset")  # fmt: skip
    return p


LOCAL_RAY = "local"  # --ray without an address


class Interrupted(Exception):
    """Ctrl-C, with what was kept."""


def sweep_points(args: argparse.Namespace) -> list:
    """The grid the sweep options describe (ValueError for settings that do not go together)."""
    if args.workers is not None and args.ray is None:
        raise ValueError("--workers sizes the local Ray that --ray starts: add --ray")
    if args.workers is not None and args.ray != LOCAL_RAY:
        raise ValueError(f"--workers sizes the local Ray of --ray (no address); the cluster at "
                         f"{args.ray} has its own")  # fmt: skip
    if args.ray not in (None, LOCAL_RAY):
        try:
            if not args.ray.strip():
                raise ValueError
            split_address(args.ray)
        except ValueError:
            raise ValueError(
                f"--ray {args.ray!r}: expected HOST:PORT of a running `ray start --head` (a port "
                "from 1 to 65535), ray://HOST:PORT, or --ray alone for a local Ray"
            ) from None
    if args.full_lr and not args.full:
        raise ValueError("--full-lr sets the full fine-tuning reference's rates: add --full")
    points = grid(args.task, args.ranks, args.alphas, args.dropouts, tuple(args.targets),
                  args.rslora, args.steps, None, args.batch_size, args.seed,
                  variant=args.variant, init=args.init, lr_ratio=args.lr_ratio,
                  quant=args.quant, lrs=args.lr, replay=args.replay)  # fmt: skip
    if args.full:
        for lr in args.full_lr or [None]:
            points.append(full_point(args.task, args.steps, lr, args.batch_size, args.seed,
                                     replay=args.replay))  # fmt: skip
    return list(dict.fromkeys(points))


def run_sweep(args: argparse.Namespace) -> int:
    # A bad --device fails before anything is written; on Ray the device is the workers'.
    device = resolve_device(args.device) if args.ray is None else ray_device(args.device)
    points = sweep_points(args)
    cache = SweepCache(args.cache)
    todo = {p for p in points if p not in cache}
    executor = "local"
    if args.ray is not None:
        address = None if args.ray == LOCAL_RAY else args.ray
        executor = RaySession(address, workers=args.workers)
    print(f"{plural(len(points), 'point')} on {args.task}, {len(todo):,} to train; "
          f"cache {cache.directory}", flush=True)  # fmt: skip
    tty = sys.stderr.isatty()
    finished: list = []

    def report(result) -> None:  # without a terminal: one plain line per point, no bars
        finished.append(result)
        if not tty:
            print(f"trained {describe(result)} ({len(finished)}/{len(todo)})", flush=True)

    start = time.perf_counter()
    failures: dict = {}
    try:
        with kept():  # a Ctrl-C that torch turned into another error is still a Ctrl-C
            results = sweep(points, cache, progress=tty, device=device,
                            batched=not args.no_batch, max_configs=args.max_configs,
                            on_result=report, executor=executor)  # fmt: skip
    except KeyboardInterrupt:
        raise Interrupted(
            f"{plural(len(finished), 'point')} of {len(todo):,} finished and kept in "
            f"{cache.directory}; run the same command again to train the rest"
        ) from None
    except SweepFailed as exc:  # every other point is trained and kept
        results = [r for r in exc.results if r is not None]
        failures = exc.failures
    seconds = time.perf_counter() - start
    if isinstance(executor, RaySession) and executor.summary:
        how = "started" if executor.address is None else "connected"
        print(f"Ray: {executor.summary}, {how} in {executor.startup_seconds:.1f} s")
    width = max([28, *(len(describe(r.point)) for r in results)])  # 'r8 α16 DoRA NF4 base'
    lrs = {r.point.lr for r in results}
    label = {r.point: describe(r.point) + (f" lr {r.point.lr:g}" if len(lrs) > 1 else "")
             for r in results}  # fmt: skip
    label.update({p: describe(p) for p in failures})
    width = max([width, *map(len, label.values())])
    print(f"{'point':<{width}} {'held-out acc':>12} {'loss':>7} {'source acc':>10} "
          f"{'trainable':>10} {'train s':>8}")  # fmt: skip
    for r in results:
        if r.diverged:
            print(f"{label[r.point]:<{width}} {'diverged':>12} {'-':>7} {'-':>10} "
                  f"{r.trainable_parameters:>10,} {'-':>8}")  # fmt: skip
            continue
        source = "-" if r.forgetting is None else f"{source_summary(r.forgetting)['accuracy']:.3f}"
        print(f"{label[r.point]:<{width}} {r.heldout['accuracy']:>12.3f} "
              f"{r.heldout['loss']:>7.3f} {source:>10} {r.trainable_parameters:>10,} "
              f"{r.wall_seconds:>8.1f}")  # fmt: skip
    chunks = [r.extra["batched"]["configs"] for r in results
              if r.point in todo and "batched" in r.extra]  # fmt: skip
    if chunks:  # a run of c points gave c results, each saying c
        runs = round(sum(1 / c for c in chunks))
        print(f"batched: {plural(len(chunks), 'point')} in {plural(runs, 'run')} "
              f"of up to {plural(max(chunks), 'point')}")  # fmt: skip
    diverged = [r for r in results if r.diverged]
    if diverged:
        print(f"{plural(len(diverged), 'point')} diverged (loss nan/inf): "
              f"{diverged[0].extra.get('diverged', '')}", file=sys.stderr)  # fmt: skip
    for point, error in failures.items():
        print(f"failed: {label[point]}: {error}", file=sys.stderr)
    print(f"done in {seconds:.1f} s")
    if failures:
        print(
            f"error: {plural(len(failures), 'point')} failed (above); the other "
            f"{len(results):,} are kept: run the same command again to retry",
            file=sys.stderr,
        )
        return 1
    if cache.unsaved:
        print(f"error: {plural(len(cache.unsaved), 'result')} could not be saved to "
              f"{cache.directory} (shown above, not cached)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sweep_parser = _sweep_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks moved out of the teaching package
        print(f"{parser.prog}: {BENCH_MOVED} {' '.join([BENCH_COMMAND, *argv[1:]])}",
              file=sys.stderr)  # fmt: skip
        return 2
    args = parser.parse_args(argv)
    try:  # settings each valid alone but not together (PiSSA on a 4-bit base, say)
        sweep_points(args)
    except (TypeError, ValueError) as exc:
        sweep_parser.error(str(exc))
    try:  # the lab's environment variables, before anything is read or written
        calibrate.mode()
        SweepCache(args.cache)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warnings.showwarning = _one_line_warning
    try:
        return run_sweep(args)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # --ray without Ray installed: how to install it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # bad settings: say which, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as exc:
        print(f"error: out of memory: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)  # fmt: skip
        return 1
    except OSError as exc:
        text = str(exc) if not exc.filename else f"{exc.strerror or exc}: {exc.filename}"
        print(f"error: {text}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
            print("error: out of memory; try a smaller --batch-size or fewer points per batch "
                  "(--max-configs)", file=sys.stderr)  # fmt: skip
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
