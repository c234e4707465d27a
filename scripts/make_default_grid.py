"""Precompute the sweep grid that notebook 05 shows on opening (lab/data/default_grid.json).

    python scripts/make_default_grid.py                 # about 15 minutes on an idle 2-core CPU
    python scripts/make_default_grid.py --steps 50 --out /tmp/grid.json   # a quick try

The grid: sort_desc (the rank-sensitive task) at ranks 1..64 x alpha 8, 16, 32 (dropout 0,
q_proj + v_proj, alpha/r); the same ranks at alpha 16 with rsLoRA's alpha/sqrt(r); the full
fine-tuning reference; rank 8, alpha 16 again with seeds 1 and 2 (run-to-run noise); and
sort_desc_small (256 examples) at rank 8, alpha 16, dropout 0, 0.1, 0.3, 0.5. Results go
through a SweepCache (--cache), so an interrupted run resumes where it stopped. Losses are
rounded to 3 significant digits to keep the file commit-sized; the rest is stored as measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from lab.fileio import atomic_write_bytes
from lab.sweeps import (
    DEFAULT_GRID_PATH,
    DEFAULT_STEPS,
    FORMAT,
    SweepCache,
    SweepPoint,
    SweepResult,
    base_fingerprint,
    describe,
    full_point,
    grid,
    grid_machine,
    sweep,
)

RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHAS = (8, 16, 32)
SMALL_DROPOUTS = (0.0, 0.1, 0.3, 0.5)
NOISE_SEEDS = (1, 2)
STEPS = DEFAULT_STEPS
THREADS = 1  # fixed for reproducibility; one thread also avoids oversubscribing a shared CPU


def points(steps: int) -> list[SweepPoint]:
    """Every point of the default grid."""
    return [
        *grid("sort_desc", RANKS, ALPHAS, steps=steps),
        full_point("sort_desc", steps=steps),
        *grid("sort_desc_small", (8,), (16,), SMALL_DROPOUTS, steps=steps),
        *grid("sort_desc", RANKS, (16,), rslora=True, steps=steps),
        # the same run with other seeds: how far apart runs land by chance alone
        *(SweepPoint("sort_desc", 8, steps=steps, seed=seed) for seed in NOISE_SEEDS),
    ]


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=DEFAULT_GRID_PATH)
    parser.add_argument("--cache", type=Path, default=None, help="resumable cache folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    cache = SweepCache(args.cache or tempfile.mkdtemp(prefix="lora-lab-grid-"))
    todo = points(args.steps)

    def report(r: SweepResult) -> None:
        print(
            f"{r.point.task:16s} {describe(r.point):18s} acc {r.heldout['accuracy']:.3f} "
            f"loss {r.heldout['loss']:.3f} {r.wall_seconds:5.1f} s",
            flush=True,
        )

    results = sweep(todo, cache, progress=False, device=args.device, on_result=report)
    for r in results:
        r.losses = [_round(x) for x in r.losses]
    bundle = {
        "format": FORMAT,
        "description": "notebook 05's default grid; rebuild with scripts/make_default_grid.py",
        "date": max(r.date for r in results),  # when the newest run was measured
        "machine": grid_machine(),
        "base": base_fingerprint(),
        "steps": args.steps,
        # training loops only, summed over points (a resumed run still reports the whole grid)
        "train_seconds": round(sum(r.wall_seconds for r in results), 1),
        "results": [r.to_dict() for r in results],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One result per line: a regenerated grid diffs line by line in git.
    head = json.dumps({k: v for k, v in bundle.items() if k != "results"}, indent=1)[:-2]
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in bundle["results"])
    text = f'{head},\n "results": [\n{lines}\n ]\n}}\n'
    atomic_write_bytes(args.out, text.encode("utf-8"))  # never a truncated grid file
    print(f"wrote {len(results)} results to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
