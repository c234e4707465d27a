"""Precompute the method comparison that notebook 08 shows (lab/data/variants_grid.json).

    python scripts/make_variants_grid.py                  # about 8 minutes on an idle 2-core CPU
    python scripts/make_variants_grid.py --steps 50 --out /tmp/variants.json   # a quick try

Ways to fine-tune the same adapter budget on sort_desc: LoRA, rsLoRA, LoRA+ (λ = 16), QLoRA
(plain LoRA on an NF4 base) and every flavour registered in lab/variants/ (DoRA, LoRA-FA, PiSSA,
MiLoRA, ...). Every method uses rank 4, alpha 16 and
q_proj + v_proj, so they train the same A and B (DoRA adds its magnitude vector, one number per
output feature of each adapted layer). Each method runs at its own small learning-rate grid,
four values a factor 2 apart around where it trains well: a method is compared at its best lr,
never at another method's. Results go through a SweepCache (--cache), so an interrupted run
resumes where it stopped; losses are rounded to 3 significant digits, the rest is as measured.
Each result's extra["method"] names its method. The file is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from lab.config import INITS, VARIANTS
from lab.sweeps import (
    SweepCache,
    SweepPoint,
    SweepResult,
    describe,
    sweep,
    write_grid_file,
)
from lab.variants.registry import display_name

OUT = Path(__file__).resolve().parents[1] / "lab" / "data" / "variants_grid.json"
TASK = "sort_desc"  # rank-sensitive: at rank 4 the methods do not all reach 100%
RANK, ALPHA = 4, 16.0  # the matched budget: every method trains rank-4 A and B on q and v
TARGETS = ("q_proj", "v_proj")
STEPS = 400  # two thirds of the default grid's 600, to keep the build under 15 CPU minutes
EXTEND_ROUNDS = 3  # at most this many lrs past an edge of a method's grid
MAX_LR = 0.32  # nor beyond this: every method diverges well below it
THREADS = 1  # fixed for reproducibility; one thread also avoids oversubscribing a shared CPU

LORA_LRS = (5e-3, 1e-2, 2e-2, 4e-2)
# LoRA+ multiplies B's lr by 16, so its base lr sits lower (B then steps at 2e-2 .. 0.16).
LORA_PLUS_LRS = (1.25e-3, 2.5e-3, 5e-3, 1e-2)


def _methods() -> dict[str, tuple[dict, tuple[float, ...]]]:
    """Each method: the SweepPoint fields that make it, and its lr grid.

    LoRA and rsLoRA, every variant registered in lab/variants/ (by its display name), LoRA+,
    every registered init, then QLoRA (LoRA on the NF4 base); each flavour at LoRA's lrs. A
    flavour added in lab/variants/ joins the comparison when the grid is rebuilt.
    """
    methods = {"LoRA": ({}, LORA_LRS), "rsLoRA": ({"rslora": True}, LORA_LRS)}
    for name, record in VARIANTS.items():
        if name != "lora":
            methods[display_name(record)] = ({"variant": name}, LORA_LRS)
    methods["LoRA+"] = ({"lr_ratio": 16.0}, LORA_PLUS_LRS)
    for name, record in INITS.items():
        if name != "default":
            methods[display_name(record)] = ({"init": name}, LORA_LRS)
    methods["QLoRA"] = ({"quant": "nf4"}, LORA_LRS)
    return methods


METHODS = _methods()


def method_points(steps: int = STEPS) -> dict[str, list[SweepPoint]]:
    """Every point of the grid, by method name, each method's lrs ascending."""
    return {
        name: [
            SweepPoint(TASK, RANK, ALPHA, targets=TARGETS, steps=steps, lr=lr, **fields)
            for lr in lrs
        ]
        for name, (fields, lrs) in METHODS.items()
    }


def best_lr(group: list[SweepResult]) -> float | None:
    """The lr of the run with the highest held-out accuracy (then the lowest loss), not diverged."""
    ok = [r for r in group if not r.diverged]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.heldout["accuracy"], -r.heldout["loss"])).point.lr


def points(steps: int = STEPS) -> list[SweepPoint]:
    """Every point of the grid, method by method."""
    return [p for group in method_points(steps).values() for p in group]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cache", type=Path, default=None, help="resumable cache folder")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    cache = SweepCache(args.cache or tempfile.mkdtemp(prefix="lora-lab-variants-"))
    if args.steps == STEPS and OUT.exists():
        # The shipped grid's runs are kept, not retrained: a rebuild trains only what is new
        # (a flavour registered since), and the runs already shipped stay as they were.
        cache.seed_from(OUT)
    by_method = method_points(args.steps)
    method_of = {p: name for name, group in by_method.items() for p in group}

    def report(r: SweepResult) -> None:
        print(
            f"{method_of[r.point]:7s} {describe(r):28s} lr {r.point.lr:<8g} "
            f"acc {r.heldout['accuracy']:.3f} loss {r.heldout['loss']:.3f} "
            f"{r.wall_seconds:5.1f} s",
            flush=True,
        )

    results = sweep(list(method_of), cache, progress=False, device=args.device, on_result=report)
    # A method whose best lr is the highest (or lowest) of its grid is not tuned yet: double (or
    # halve) past that edge, a few times at most, so that each is judged at an lr with a worse
    # one on either side.
    for _ in range(EXTEND_ROUNDS):
        outward = []
        for name, group in by_method.items():
            done = sorted(
                (r for r in results if method_of[r.point] == name), key=lambda r: r.point.lr
            )
            top = best_lr(done)
            if top is None:
                continue
            lrs = [r.point.lr for r in done]
            step = 2.0 if top == lrs[-1] else 0.5 if top == lrs[0] else None
            if step is not None and top * step <= MAX_LR:
                point = dataclasses.replace(group[0], lr=top * step)
                group.append(point)
                method_of[point] = name
                outward.append(point)
        if not outward:
            break
        results += sweep(outward, cache, progress=False, device=args.device, on_result=report)
    results.sort(key=lambda r: (list(by_method).index(method_of[r.point]), r.point.lr))
    for r in results:
        r.extra = {**r.extra, "method": method_of[r.point]}
    methods = {
        name: {"fields": fields, "lrs": sorted(p.lr for p in by_method[name])}
        for name, (fields, _) in METHODS.items()
    }
    write_grid_file(
        args.out,
        results,
        "notebook 08's method comparison; rebuild with scripts/make_variants_grid.py",
        task=TASK, rank=RANK, alpha=ALPHA, targets=list(TARGETS), steps=args.steps,
        methods=methods,
    )  # fmt: skip
    print(f"wrote {len(results)} results to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
