"""The lab's comparisons on a CUDA GPU, in bf16, in under five minutes; results to files.

    python -m benchmarks.gpu                      # from the repository root, on a CUDA GPU
    python -m benchmarks.gpu --budget 200         # skip what is left after 200 s (default 270)
    python -m benchmarks.gpu --device cpu --quick # a smoke run of the same code on a CPU

What it measures (each comparison alternates its sides and reports medians):
- throughput: the `gpu` preset (d_model 1024, 8 layers): tokens per second, model FLOPs
  utilisation against the GPU's bf16 peak, and peak allocator memory, for full fine-tuning and
  LoRA r8 on q, v;
- qlora: LoRA's step time, weight bytes and peak memory on an fp32, a bf16 and an NF4 (4-bit)
  base across widths 1024-4096 (8 layers, bf16 autocast), with the NF4 bits per weight;
- dora: DoRA's step time against LoRA's at the same widths (bf16 autocast), next to the
  slowdown PEFT reports;
- lora_vs_full: LoRA / full step time and peak memory across widths 1024-4096 (8 layers) and
  ranks 1-64;
- layers: lab.LoRALinear against loralib and PEFT where they are installed (fp32, d 1024);
- inference: merged vs base forward time;
- sweep: a 16-point grid on the shipped base, one configuration after another vs batched, and
  how the batched cost per configuration changes as the grid grows to 64 configurations.

Writes benchmarks/results/gpu.json, gpu.md and plots (stem `gpu`, or `gpu-quick`) after each
benchmark, so a run cut short still leaves what it measured. The lab needs only torch (a CUDA
build), numpy, matplotlib, safetensors and tqdm here; loralib and PEFT join the layer
comparison where they are installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import bench

OUT = Path(__file__).parent / "results"
# The headline numbers first, in case the time budget cuts the run short.
NAMES = ("throughput", "qlora", "dora", "sweep", "lora_vs_full", "layers", "inference", "growth")

GPU_SETTINGS = {
    "throughput": {"preset": "gpu", "batch_size": 512, "repeats": 10},
    "qlora": {"widths": (1024, 2048, 4096), "n_layers": 8, "batch_size": 256, "repeats": 10},
    "dora": {"widths": (1024, 2048, 4096), "n_layers": 8, "batch_size": 256, "repeats": 10},
    "lora_vs_full": {"widths": (1024, 2048, 4096), "ranks": (1, 4, 8, 16, 64),
                     "rank_width": 2048, "n_layers": 8, "batch_size": 256, "repeats": 10},
    "layers": {"repeats": 50},
    "inference": {"widths": (1024, 2048, 4096), "n_layers": 8, "batch_size": 256,
                  "repeats": 50},
    "growth": {},
    "sweep": {"steps": 50, "batch_sizes": (64,), "grid_sizes": (1, 4, 16, 64),
              "ranks": (1, 4, 8, 16), "alphas": (8.0, 16.0), "dropouts": (0.0, 0.1),
              "repeats": 2, "profile_steps": 5},
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument(
        "--budget", type=float, default=270.0,
        help="seconds after which the remaining benchmarks are skipped",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing was run (use --device cpu --quick for a smoke run)")
        return 1
    # The layer comparison stays in true fp32 (TF32 off, PyTorch's default): with TF32 the three
    # implementations would round differently and could not be checked for equal outputs.
    start = time.perf_counter()
    overrides = {} if args.quick else GPU_SETTINGS
    stem = "gpu-quick" if args.quick else "gpu"
    report: dict = {}
    # One benchmark at a time, writing the files after each, so that a run stopped by a device
    # lease still leaves its results; past the time budget the rest are skipped and listed.
    for name in NAMES:
        if report and time.perf_counter() - start > args.budget:  # the first always runs
            report.setdefault("skipped", []).append(name)
            continue
        part = bench.run_all(
            [name], quick=args.quick, device=device, overrides=overrides,
            earlier=report.get("results", {}),
        )  # fmt: skip
        report = {**part, **{k: v for k, v in report.items() if k != "results"},
                  "results": {**report.get("results", {}), **part["results"]}}  # fmt: skip
        report["seconds"] = time.perf_counter() - start
        bench.write_results(report, Path(args.out), stem)
    paths = bench.write_results(report, Path(args.out), stem)  # with the skipped list, if any
    for path in paths:
        print(f"wrote {path}")
    if report.get("skipped"):
        print(f"over the {args.budget:.0f} s budget, skipped: {', '.join(report['skipped'])}")
    print(f"finished in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
