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
import tempfile
from pathlib import Path

import torch

from lab.sweeps import (
    DEFAULT_GRID_PATH,
    DEFAULT_STEPS,
    SweepCache,
    SweepPoint,
    SweepResult,
    describe,
    full_point,
    grid,
    sweep,
    write_grid_file,
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
    description = "notebook 05's default grid; rebuild with scripts/make_default_grid.py"
    write_grid_file(args.out, results, description, steps=args.steps)
    print(f"wrote {len(results)} results to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
