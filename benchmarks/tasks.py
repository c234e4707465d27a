"""Measure the lab's tasks from the shipped base: LoRA ranks vs full fine-tuning, dropout, memory.

    python benchmarks/tasks.py               # about 12 minutes on a 2-core CPU
    python benchmarks/tasks.py --steps 200   # a quicker, rougher pass

Writes benchmarks/results/tasks.json and tasks.md with the date and machine. Every number is
measured in this run: accuracy from exact match on 512 held-out prompts, time from the clock,
memory from the tracker on the first training step next to the analytic prediction.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lab  # noqa: E402
from lab.memory import analytic_memory  # noqa: E402
from lab.tasks import FINETUNE_TASKS, SEQ_LEN  # noqa: E402

OUT = Path(__file__).parent / "results"
LORA_LR, FULL_LR, BATCH, ALPHA = 2e-2, 1e-3, 64, 16
RANKS = (1, 4, 8)
DROPOUTS = (0.0, 0.1, 0.3, 0.5)


def run(task: str, steps: int, rank: int | None, dropout: float = 0.0) -> lab.TrainResult:
    """Fine-tune a fresh copy of the base: LoRA on q_proj/v_proj at `rank`, or full (None)."""
    torch.manual_seed(0)
    model = lab.load_base_model(device="cpu")
    if rank is not None:
        lab.add_lora(model, rank=rank, alpha=ALPHA, dropout=dropout)
    lr = FULL_LR if rank is None else LORA_LR
    result = lab.train(
        model, lab.get_task(task), steps, lr, BATCH, seed=0, device="cpu", progress=False
    )
    if lab.get_task(task).n_train <= 1000:  # small data: also how well it fits what it saw
        result.extra["train_loss_eval"] = lab.get_task(task).evaluate(model, split="train")["loss"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--small-steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = lab.load_base_model(device="cpu")
    tasks = [t for t in FINETUNE_TASKS if not t.endswith("_small")]
    rows, report = (
        [],
        {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}",
            "steps": args.steps,
            "batch_size": BATCH,
            "lora_lr": LORA_LR,
            "full_lr": FULL_LR,
            "alpha": ALPHA,
        },
    )
    for name in tasks:
        row = {"task": name, "base_accuracy": lab.get_task(name).evaluate(base)["accuracy"]}
        for rank in (*RANKS, None):
            key = "full" if rank is None else f"r{rank}"
            r = run(name, args.steps, rank)
            row[key] = {
                "accuracy": r.heldout["accuracy"],
                "heldout_loss": r.heldout["loss"],
                "seconds": r.wall_seconds,
                "trainable": r.trainable_parameters,
                "memory": r.memory.to_dict(),
            }
            print(
                f"{name:10s} {key:5s} acc={r.heldout['accuracy']:.3f} t={r.wall_seconds:.1f}s",
                flush=True,
            )
        row["r8_over_full"] = row["r8"]["accuracy"] / max(row["full"]["accuracy"], 1e-9)
        rows.append(row)
    report["tasks"] = rows

    drop = []
    for p in DROPOUTS:
        r = run("sort_desc_small", args.small_steps, 8, dropout=p)
        drop.append(
            {
                "dropout": p,
                "train_loss": r.extra["train_loss_eval"],
                "heldout_loss": r.heldout["loss"],
                "accuracy": r.heldout["accuracy"],
            }
        )
        print(
            f"dropout {p}: train {drop[-1]['train_loss']:.3f} held-out "
            f"{r.heldout['loss']:.3f} acc {r.heldout['accuracy']:.3f}",
            flush=True,
        )
    report["dropout"] = {
        "task": "sort_desc_small",
        "steps": args.small_steps,
        "rank": 8,
        "points": drop,
    }

    config = base.config
    seq = SEQ_LEN - 1
    memory = {}
    for mode, targets, rank in (("full", None, 0), ("lora_r8_qv", ("q_proj", "v_proj"), 8)):
        predicted = analytic_memory(config, BATCH, seq, lora_targets=targets, lora_rank=rank)
        measured = rows[0]["full" if rank == 0 else "r8"]["memory"]
        memory[mode] = {"measured": measured, "analytic": predicted.to_dict()}
    report["memory"] = memory

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tasks.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "tasks.md").write_text(to_markdown(report))
    print((OUT / "tasks.md").read_text())


def to_markdown(report: dict) -> str:
    """The report as markdown tables."""
    lines = [
        f"# Tasks from the shipped base ({report['date']}, {report['machine']})",
        "",
        f"{report['steps']} steps, batch {report['batch_size']}; LoRA on q_proj and v_proj, "
        f"alpha {report['alpha']}, lr {report['lora_lr']}; full fine-tuning lr "
        f"{report['full_lr']}. Accuracy: exact match on 512 held-out prompts.",
        "",
        "| task | base | LoRA r1 | LoRA r4 | LoRA r8 | full | r8 / full | "
        "r8 time (s) | full time (s) |",
        "|" + "---|" * 9,
    ]
    for r in report["tasks"]:
        lines.append(
            f"| {r['task']} | {r['base_accuracy']:.3f} | {r['r1']['accuracy']:.3f} | "
            f"{r['r4']['accuracy']:.3f} | {r['r8']['accuracy']:.3f} | {r['full']['accuracy']:.3f}"
            f" | {r['r8_over_full']:.2f} | {r['r8']['seconds']:.1f} | {r['full']['seconds']:.1f} |"
        )
    d = report["dropout"]
    lines += [
        "",
        f"## Adapter dropout on {d['task']} (256 examples, rank {d['rank']}, {d['steps']} steps)",
        "",
        "| dropout | train loss | held-out loss | accuracy |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {p['dropout']} | {p['train_loss']:.3f} | {p['heldout_loss']:.3f} | "
        f"{p['accuracy']:.3f} |"
        for p in d["points"]
    ]
    lines += [
        "",
        "## Memory of one training step (bytes): measured (MemTracker) / analytic",
        "",
        "| mode | parameters | gradients | optimizer | activations |",
        "|---|---|---|---|---|",
    ]
    for mode, m in report["memory"].items():
        cells = [
            f"{m['measured'][k]:,} / {m['analytic'][k]:,}"
            for k in ("parameters", "gradients", "optimizer", "activations")
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
