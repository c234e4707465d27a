"""Precompute the practitioners' findings that notebook 09 shows (lab/data/practice_grid.json).

    python scripts/make_practice_grid.py                  # about 12 minutes on an idle 2-core CPU
    python scripts/make_practice_grid.py --steps 20 --out /tmp/practice.json   # a quick try

Three experiments on the shipped base, all 200 steps at batch 64 (their points are defined in
lab/practice.py, which the notebook, exercises and tests read too):
- the learning rate: 7 log-spaced rates x ranks 1, 4, 16 (all-linear, alpha 16) under alpha/r
  (and rank 16 under rsLoRA at 4 rates), and full fine-tuning at the same 7 rates, on sort_desc;
- which layers: q,v / MLP / all-linear at matched trainable parameters, each at 3 rates, on
  shift, and full fine-tuning on shift at 4 rates;
- replay: LoRA rank 16 and full fine-tuning at 3 rates each with 5% pretraining replay.
Every result carries `forgetting` (the pretraining skills after fine-tuning). Results go through
a SweepCache (--cache), so an interrupted build resumes where it stopped. Losses are rounded to
3 significant digits by write_grid_file; the rest is as measured. Written atomically.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lab import practice
from lab.forgetting import source_summary
from lab.sweeps import SweepCache, SweepResult, describe, sweep, write_grid_file

OUT = practice.PRACTICE_GRID_PATH
THREADS = 2  # default --threads: fixed so that CPU reductions, and so the numbers, reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=practice.STEPS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=None, help="resumable cache folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads (two builds may share a --cache)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = SweepCache(args.cache or tempfile.mkdtemp(prefix="lora-lab-practice-"))
    points = practice.all_points(args.steps)
    start = time.perf_counter()
    done = 0

    def report(r: SweepResult) -> None:
        nonlocal done
        done += 1
        acc = "diverged" if r.diverged else f"acc {r.heldout['accuracy']:.3f}"
        source = (
            ""
            if r.forgetting is None
            else (f" source {source_summary(r.forgetting)['accuracy']:.3f}")
        )
        print(f"[{done}/{len(points)} {time.perf_counter() - start:6.0f} s] {r.point.task:9s} "
              f"{describe(r):32s} lr {r.point.lr:<7g} {acc}{source}", flush=True)  # fmt: skip

    results = sweep(points, cache, progress=False, device=args.device, on_result=report)
    write_grid_file(
        args.out,
        results,
        "notebook 09's practitioner findings; rebuild with scripts/make_practice_grid.py",
        steps=args.steps, lr_grid=list(practice.LR_GRID), lr_ranks=list(practice.LR_RANKS),
        layer_sets={k: {"targets": list(t), "rank": r}
                    for k, (t, r) in practice.LAYER_SETS.items()},
        layer_lrs=list(practice.LAYER_LRS), rslora_ranks=list(practice.RSLORA_RANKS),
        rslora_lrs=list(practice.RSLORA_LRS),
        replay=practice.REPLAY,
    )  # fmt: skip
    print(f"wrote {len(results)} results to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
