"""Rebuild the lab's pretrained base model (lab/data/base_model.safetensors) from scratch.

    python scripts/pretrain_base.py            # writes lab/data/base_model.safetensors
    python scripts/pretrain_base.py --out x.safetensors

Deterministic: the same seed, data and torch build give the same weights on the same CPU
(thread count fixed below). Prints the held-out accuracy on each pretraining skill.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import lab
from lab.tasks import PRETRAIN_TASKS

STEPS, BATCH, LR, SEED = 3000, 128, 3e-3, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=lab.BASE_MODEL_PATH)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    torch.set_num_threads(2)  # fixed so that CPU reductions, and so the weights, are reproducible
    torch.manual_seed(SEED)
    model = lab.ToyTransformer(lab.get_preset("cpu"))
    start = time.process_time()
    result = lab.train(
        model,
        lab.get_task("pretrain"),
        steps=args.steps,
        lr=LR,
        batch_size=BATCH,
        seed=SEED,
        device="cpu",
        measure_memory=False,
        weight_decay=0.01,
    )
    cpu_seconds = time.process_time() - start
    accuracy = {name: lab.get_task(name).evaluate(model)["accuracy"] for name in PRETRAIN_TASKS}
    info = {
        "steps": args.steps,
        "batch_size": BATCH,
        "lr": LR,
        "seed": SEED,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "wall_seconds": round(result.wall_seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "heldout_accuracy": accuracy,
    }
    path = lab.save_base_model(model, args.out, info=info)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    for key, value in info.items():
        print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
