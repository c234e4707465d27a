"""Measure the lab's tasks from the shipped base: LoRA ranks vs full fine-tuning, dropout, memory.

    python -m benchmarks.tasks               # from the repository root: about 12 minutes on a
                                             # 2-core CPU
    python -m benchmarks.tasks --steps 200   # a quicker, rougher pass

Writes benchmarks/results/tasks.json and tasks.md with the date and machine. Every number is
measured in this run: accuracy from exact match on 512 held-out prompts, time from the clock,
memory from the tracker on the first training step next to the analytic prediction.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

import torch

import lab
from benchmarks.common import describe_machine, machine
from lab.analysis import format_table
from lab.fileio import atomic_write_bytes
from lab.memory import analytic_memory
from lab.tasks import FINETUNE_TASKS, SEQ_LEN

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tasks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--small-steps", type=int, default=600)
    parser.add_argument("--out", default=str(OUT), help="where tasks.json and tasks.md go")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = lab.load_base_model(device="cpu")
    tasks = [t for t in FINETUNE_TASKS if not t.endswith("_small")]
    rows, report = (
        [],
        {
            "date": datetime.date.today().isoformat(),
            "machine": machine("cpu"),
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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "tasks.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "tasks.md", to_markdown(report).encode())
    print(to_markdown(report))


def _where(machine_info: dict | str) -> str:
    if isinstance(machine_info, str):  # reports written before the machine was a dict
        return machine_info
    return f"{describe_machine(machine_info)}, torch {machine_info['torch']}"


def _table(rows: list[dict]) -> str:
    return format_table(rows, markdown=True)


def to_markdown(report: dict) -> str:
    """The report as markdown tables (lab.analysis.format_table)."""
    lines = [
        f"# Tasks from the shipped base ({report['date']}, {_where(report['machine'])})",
        "",
        f"{report['steps']} steps, batch {report['batch_size']}; LoRA on q_proj and v_proj, "
        f"alpha {report['alpha']}, lr {report['lora_lr']}; full fine-tuning lr "
        f"{report['full_lr']}. Accuracy: exact match on 512 held-out prompts.",
        "",
        _table(
            [
                {
                    "task": r["task"],
                    "base": f"{r['base_accuracy']:.3f}",
                    **{f"LoRA r{k}": f"{r[f'r{k}']['accuracy']:.3f}" for k in (1, 4, 8)},
                    "full": f"{r['full']['accuracy']:.3f}",
                    "r8 / full": f"{r['r8_over_full']:.2f}",
                    "r8 time (s)": f"{r['r8']['seconds']:.1f}",
                    "full time (s)": f"{r['full']['seconds']:.1f}",
                }
                for r in report["tasks"]
            ]
        ),
    ]
    d = report["dropout"]
    lines += [
        "",
        f"## Adapter dropout on {d['task']} (256 examples, rank {d['rank']}, {d['steps']} steps)",
        "",
        _table(
            [
                {
                    "dropout": str(p["dropout"]),
                    "train loss": f"{p['train_loss']:.3f}",
                    "held-out loss": f"{p['heldout_loss']:.3f}",
                    "accuracy": f"{p['accuracy']:.3f}",
                }
                for p in d["points"]
            ]
        ),
        "",
        "## Memory of one training step (bytes): measured (MemTracker) / analytic",
        "",
        _table(
            [
                {
                    "mode": mode,
                    **{
                        k: f"{m['measured'][k]:,} / {m['analytic'][k]:,}"
                        for k in ("parameters", "gradients", "optimizer", "activations")
                    },
                }
                for mode, m in report["memory"].items()
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
