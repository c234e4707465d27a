"""Two students training at once against one alone: torch's default threads against the lab's.

Each student is a fresh Python, as a JupyterLab kernel is: it imports lab (which chooses its
torch threads, lab.threads), loads the shipped base, adds LoRA, says it is ready and waits; then
every student of the run starts the same short `lab.train` at the same moment. Two settings:

- unbounded: torch's default threads (one per core: what a kernel on a machine of one's own gets);
- bounded: the lab's shared-host default (JUPYTERHUB_USER is set, as in a JupyterHub kernel).

Rounds interleave alone and together for both settings (the order of the two settings swaps each
round) after an untimed warm-up, and the report gives medians, spreads and the ratios: together
over alone per student, and the two students' total throughput over one student's. From the
repository root:

    python -m benchmarks.classroom                           # about 5 minutes on 2 cores
    python -m benchmarks.classroom --steps 20 --repeats 1 --stem classroom-quick

writes benchmarks/results/classroom.json and classroom.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench import _positive_int
from benchmarks.common import describe_machine, machine
from lab.analysis import format_table, spread
from lab.fileio import atomic_write_bytes
from lab.sweeps import check_writable_dir
from lab.tasks import FINETUNE_TASKS
from lab.threads import ENV_VAR, HUB_VARS

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results"
TASK, STEPS, REPEATS, WARMUP = "rotate", 150, 5, 1
RANK, ALPHA, LR, BATCH = 8, 16, 2e-2, 64  # benchmarks/tasks.py's LoRA setting
STUDENTS = 2
# Each setting's additions to a clean environment (no thread variable, not on a hub).
MODES = {
    "unbounded": {},
    "bounded": {"JUPYTERHUB_USER": "student"},
}
MODE_LABELS = {"unbounded": "torch's default", "bounded": "the lab's shared-host default"}
_CLEARED = (ENV_VAR, "OMP_NUM_THREADS", "MKL_NUM_THREADS", *HUB_VARS)


# ---------------------------------------------------------------------------------------------
# One student: a fresh Python (python -m benchmarks.classroom --student TASK STEPS)
# ---------------------------------------------------------------------------------------------


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


def student(task: str, steps: int) -> None:
    """Import lab, get ready, wait for a line on stdin, train; each stage one JSON line out."""
    import torch

    import lab

    torch.manual_seed(0)  # the adapters' initial A: every student starts from the same one
    model = lab.load_base_model(device="cpu")
    lab.add_lora(model, rank=RANK, alpha=ALPHA)
    the_task = lab.get_task(task)
    lab.threads.training_threads()  # the lab's thread rule, applied here as lab.train applies it
    _say({"ready": True, "threads": torch.get_num_threads(), "why": lab.threads.describe()})
    sys.stdin.readline()  # the start signal: every student of the run starts together
    result = lab.train(
        model, the_task, steps, LR, BATCH, seed=0, device="cpu", progress=False,
        measure_memory=False,
    )  # fmt: skip
    _say(
        {
            "train_s": result.wall_seconds,
            "threads": torch.get_num_threads(),
            "final_loss": result.losses[-1],
            "accuracy": result.heldout["accuracy"],
        }
    )


# ---------------------------------------------------------------------------------------------
# The parent: start students, time them, summarise
# ---------------------------------------------------------------------------------------------


def student_env(mode: str, index: int) -> dict[str, str]:
    """A student's environment: this one without thread or hub variables, plus the mode's."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update({k: f"{v}-{index + 1}" for k, v in MODES[mode].items()})
    return env


class _Student:
    """A student process and a thread that hands its stdout lines over as they come."""

    def __init__(self, mode: str, index: int, task: str, steps: int):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.classroom", "--student", task, str(steps)],
            cwd=ROOT, env=student_env(mode, index), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.put(line)
        self.lines.put("")  # end of output

    def message(self, deadline: float, what: str) -> dict:
        """The next JSON line it prints, or RuntimeError (with its stderr) when it fails."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"a student (pid {self.proc.pid}) did not {what} within the time limit"
                ) from None
            if not line:
                code = self.proc.wait()
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"a student exited with {code} before it could {what}:\n{tail}")
            if line.startswith("{"):
                return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:  # only on failure: a finished student has exited
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.log.close()


def run_students(mode: str, count: int, task: str, steps: int, timeout: float = 900.0) -> dict:
    """Start `count` students at once in `mode`; their train seconds, threads and results."""
    deadline = time.monotonic() + timeout
    students: list[_Student] = []
    try:
        for i in range(count):
            students.append(_Student(mode, i, task, steps))
        ready = [s.message(deadline, "get ready") for s in students]
        start = time.perf_counter()
        for s in students:  # back to back: the students start within a millisecond
            s.proc.stdin.write("go\n")
            s.proc.stdin.flush()
        done = [s.message(deadline, "train") for s in students]
        wall = time.perf_counter() - start
        for s in students:
            s.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for s in students:
            s.stop()
    return {
        "students": count,
        "threads": [r["threads"] for r in ready],
        "why": ready[0]["why"],
        "train_s": [d["train_s"] for d in done],
        "final_loss": [d["final_loss"] for d in done],
        "accuracy": [d["accuracy"] for d in done],
        "wall_s": wall,  # from the start signal until the last student had evaluated too
    }


def _timings(values: Sequence[float]) -> dict:
    lo, hi = spread(values)
    return {"median_s": statistics.median(values), "spread_s": [lo, hi], "runs_s": list(values)}


def summarize(alone: Sequence[dict], together: Sequence[dict], steps: int) -> dict:
    """One mode's medians and ratios from its runs (each a `run_students` result)."""
    alone_s = [r["train_s"][0] for r in alone]
    each_s = [t for r in together for t in r["train_s"]]
    makespan_s = [max(r["train_s"]) for r in together]  # the slower student of each round
    a, e, m = (statistics.median(x) for x in (alone_s, each_s, makespan_s))
    students = together[0]["students"]
    losses = {loss for r in (*alone, *together) for loss in r["final_loss"]}
    return {
        "threads": sorted({t for r in (*alone, *together) for t in r["threads"]}),
        "why": alone[0]["why"],
        "alone": _timings(alone_s),
        "together_each": _timings(each_s),
        "together_makespan": _timings(makespan_s),
        "slowdown": e / a,  # how much longer each student waits when two train at once
        "alone_steps_per_s": steps / a,
        "together_steps_per_s": students * steps / m,
        "throughput_ratio": (students * steps / m) / (steps / a),
        "same_result": len(losses) == 1,  # alone and together trained the same numbers
        "final_loss": sorted(losses),
        "accuracy": sorted({x for r in (*alone, *together) for x in r["accuracy"]}),
    }


def run_classroom(
    task: str = TASK,
    steps: int = STEPS,
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    students: int = STUDENTS,
    timeout: float = 900.0,
    progress: bool = True,
) -> dict:
    """Alone against together for both modes, rounds interleaved; the report as a dict."""
    if task not in FINETUNE_TASKS:
        raise ValueError(f"task {task!r} is not a fine-tuning task; valid: {FINETUNE_TASKS}")
    for name, value, low in (("steps", steps, 1), ("repeats", repeats, 1), ("warmup", warmup, 0),
                             ("students", students, 2)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: expected a whole number of at least {low}")
    for mode in MODES:
        for _ in range(warmup):  # untimed: the first start reads torch from disk
            run_students(mode, 1, task, steps, timeout)
    runs: dict[str, dict[str, list]] = {m: {"alone": [], "together": []} for m in MODES}
    for r in range(repeats):
        order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            for kind, count in (("alone", 1), ("together", students)):
                run = run_students(mode, count, task, steps, timeout)
                runs[mode][kind].append(run)
                if progress:
                    times = ", ".join(f"{t:.2f}" for t in run["train_s"])
                    print(f"round {r + 1}/{repeats} {mode:9s} {kind:8s} threads "
                          f"{run['threads']} train s: {times}", flush=True)  # fmt: skip
    modes = {m: summarize(runs[m]["alone"], runs[m]["together"], steps) for m in MODES}
    bounded, unbounded = modes["bounded"], modes["unbounded"]
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "settings": {
            "task": task,
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "students": students,
            "rank": RANK,
            "alpha": ALPHA,
            "lr": LR,
            "batch_size": BATCH,
            "targets": ["q_proj", "v_proj"],
            "environments": MODES,
        },  # fmt: skip
        "modes": modes,
        # What a student on a shared host waits, against a machine of their own (unbounded, alone).
        "bounded_together_vs_unbounded_alone": (
            bounded["together_each"]["median_s"] / unbounded["alone"]["median_s"]
        ),
        "bounded_vs_unbounded_together": (
            bounded["together_each"]["median_s"] / unbounded["together_each"]["median_s"]
        ),
        "runs": runs,
    }


def _cell(t: dict) -> str:
    lo, hi = t["spread_s"]
    return f"{t['median_s']:.2f} ({lo:.2f}-{hi:.2f})"


def table_rows(report: dict) -> list[dict]:
    """The side-by-side table: one row per mode."""
    rows = []
    for mode, m in report["modes"].items():
        rows.append(
            {
                "threads per student": f"{MODE_LABELS[mode]}: {_threads(m)}",
                "alone (s)": _cell(m["alone"]),
                "each of two at once (s)": _cell(m["together_each"]),
                "slowdown": f"{m['slowdown']:.2f}x",
                "steps/s alone": f"{m['alone_steps_per_s']:.1f}",
                "steps/s two at once": f"{m['together_steps_per_s']:.1f}",
                "throughput ratio": f"{m['throughput_ratio']:.2f}x",
                "same result": "yes" if m["same_result"] else "no",
            }
        )
    return rows


def _threads(m: dict) -> str:
    counts = "/".join(map(str, m["threads"]))
    return f"{counts} thread" if m["threads"] == [1] else f"{counts} threads"


def summary(report: dict) -> str:
    """The figure for the README, in two sentences."""
    u, b = report["modes"]["unbounded"], report["modes"]["bounded"]
    n = report["settings"]["students"]
    return (
        f"{n} students training at once with torch's default of {_threads(u)} each: each waits "
        f"{u['slowdown']:.2f}x as long as one alone ({u['throughput_ratio']:.2f}x the "
        f"throughput). With the lab's shared-host default of {_threads(b)} each: "
        f"{b['slowdown']:.2f}x as long ({b['throughput_ratio']:.2f}x the throughput), "
        f"{report['bounded_together_vs_unbounded_alone']:.2f}x the time one student alone "
        f"takes with every core, and done {1 / report['bounded_vs_unbounded_together']:.1f}x "
        f"sooner than two at once with torch's default."
    )


def markdown(report: dict) -> str:
    """The report as text: settings, the side-by-side table, the figure."""
    s = report["settings"]
    return "\n".join(
        [
            f"# Two students at once against one alone ({report['date']}, "
            f"{describe_machine(report['machine'])}, torch {report['machine']['torch']})",
            "",
            f"Each student a fresh Python that imports lab and trains LoRA r{s['rank']} (q, v) "
            f"on {s['task']} from the shipped base: {s['steps']} steps of batch "
            f"{s['batch_size']}, lr {s['lr']}. {s['students']} students start together; "
            f"{s['repeats']} rounds interleave alone and together for both settings after "
            f"{s['warmup']} warm-up run(s). Training seconds: median (spread: quartiles from "
            f"4 timings, else min-max). Throughput: all students' steps over the slower "
            f"student's time.",
            "",
            format_table(table_rows(report), markdown=True),
            "",
            summary(report),
            "",
        ]
    )


def write_results(report: dict, out_dir: str | os.PathLike, stem: str = "classroom") -> list:
    """Write <stem>.json and <stem>.md into out_dir, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        atomic_write_bytes(out / f"{stem}.json", (json.dumps(report, indent=1) + "\n").encode()),
        atomic_write_bytes(out / f"{stem}.md", markdown(report).encode()),
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.classroom", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--task", default=TASK, help=f"a fine-tuning task (default {TASK})")
    parser.add_argument("--steps", type=_positive_int("--steps"), default=STEPS)
    parser.add_argument("--repeats", type=_positive_int("--repeats"), default=REPEATS,
                        help="timed rounds (default %(default)s)")  # fmt: skip
    parser.add_argument("--warmup", type=int, choices=range(0, 4), default=WARMUP,
                        help="untimed runs per setting first (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", default=str(OUT), help="where the results are written")
    parser.add_argument("--stem", default="classroom", help="file name stem (default classroom)")
    parser.add_argument("--student", nargs=2, metavar=("TASK", "STEPS"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the table, write <stem>.json and .md; 0 on success, 2 on bad settings."""
    args = _parser().parse_args(argv)
    if args.student:
        student(args.student[0], int(args.student[1]))
        return 0
    stem = args.stem
    if not stem or os.sep in stem or (os.altsep and os.altsep in stem) or stem[0] == ".":
        print(f"error: --stem {stem!r}: expected a plain file name stem such as 'classroom'",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.task not in FINETUNE_TASKS:
        print(f"error: --task {args.task!r} is not a fine-tuning task; valid: "
              f"{', '.join(FINETUNE_TASKS)}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        check_writable_dir(Path(args.out), "benchmark output folder", "choose another with --out")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = run_classroom(args.task, args.steps, args.repeats, args.warmup)
    print(format_table(table_rows(report)))
    print(summary(report))
    for path in write_results(report, args.out, stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
