"""What grading outside the submission's process costs: the lab's executor against nbgrader's.

One complete, honest submission of the exercises is autograded by `nbgrader autograde` in two
courses that differ in one setting: the lab's executor (lab.exercises.autograde.LabExecute: the
submission's cells in a bubblewrap sandbox, the hidden tests in nbgrader's process) and nbgrader's
own (the cells and the hidden tests in one kernel). Rounds interleave the two (the order swaps
each round) after an untimed warm-up; each timing is the whole `nbgrader autograde` command, as
an instructor waits for it. From the repository root:

    python -m benchmarks.autograde               # about 8 minutes on 2 cores
    python -m benchmarks.autograde --repeats 1 --stem autograde-quick

writes benchmarks/results/autograde.json and autograde.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from benchmarks.bench import _positive_int
from benchmarks.common import describe_machine, machine
from lab.analysis import format_table, spread
from lab.exercises.course import ASSIGNMENT, SOURCE, generate_release, make_course
from lab.fileio import atomic_write_bytes

OUT = Path(__file__).parent / "results"
REPEATS = 3
STUDENT = "ada"
# The second course's config, after the lab's: nbgrader's own executor back in autograde.
NBGRADER_EXECUTE = """
from nbgrader.converters import Autograde
c = get_config()  # noqa: F821
c.Autograde.autograde_preprocessors = Autograde.class_traits()["autograde_preprocessors"].default()
"""
MODES = {"lab": "the lab's executor (sandboxed cells, tests in nbgrader)", "nbgrader": "nbgrader's"}


def _answer(source: str) -> str:
    return "\n".join(line for line in source.split("\n") if "### " not in line)


def make(root: Path, mode: str) -> None:
    """A course with the assignment generated and one complete submission in it."""
    make_course(root)
    if mode == "nbgrader":
        config = root / "nbgrader_config.py"
        atomic_write_bytes(config, config.read_bytes() + NBGRADER_EXECUTE.encode())
    release = generate_release(root)
    key = {
        c.metadata["nbgrader"]["grade_id"]: c
        for c in nbformat.read(SOURCE, as_version=4).cells
        if "nbgrader" in c.metadata
    }
    nb = nbformat.read(release, as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("solution"):
            cell.source = _answer(key[meta["grade_id"]].source)
    path = root / "submitted" / STUDENT / ASSIGNMENT / f"{ASSIGNMENT}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)


def autograde(root: Path) -> tuple[float, float]:
    """Seconds of one `nbgrader autograde`, and the score it recorded."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", "autograde", ASSIGNMENT, "--force"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"nbgrader autograde failed in {root}:\n{done.stderr[-3000:]}")
    code = (
        "import sys; from nbgrader.api import Gradebook\n"
        f"with Gradebook('sqlite:///{root / 'gradebook.db'}') as gb:\n"
        f"    print(gb.find_submission({ASSIGNMENT!r}, {STUDENT!r}).score)\n"
    )
    score = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return seconds, float(score.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autograde", description=__doc__)
    parser.add_argument("--repeats", type=_positive_int("--repeats"), default=REPEATS)
    parser.add_argument("--stem", default="autograde", help="results file names (no suffix)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="lora-lab-autograde-bench-"))
    try:
        roots = {mode: base / mode for mode in MODES}
        for mode, root in roots.items():
            make(root, mode)
            autograde(root)  # warm-up: file caches, the gradebook made
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        scores: dict[str, set[float]] = {m: set() for m in MODES}
        load = []
        for r in range(args.repeats):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                load.append(os.getloadavg()[0])
                s, score = autograde(roots[mode])
                seconds[mode].append(s)
                scores[mode].add(score)
                print(f"round {r + 1}: {mode:>8} {s:6.1f} s, score {score:g}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in seconds.items()}
    rows = []
    for mode, label in MODES.items():
        lo, hi = spread(seconds[mode])
        rows.append(
            {
                "executor": label,
                "seconds (median)": f"{med[mode]:.1f}",
                "spread": f"{lo:.1f}-{hi:.1f}",
                "score": "/".join(f"{s:g}" for s in sorted(scores[mode])),
                "vs nbgrader's": f"{med[mode] / med['nbgrader']:.2f}x",
            }
        )
    info = machine()
    report = {
        "machine": info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": args.repeats,
        "load_average_1min": load,
        "seconds": seconds,
        "scores": {m: sorted(v) for m, v in scores.items()},
    }
    table = format_table(rows, markdown=True)
    text = (
        f"# Autograding one complete submission ({describe_machine(info)})\n\n"
        f"{args.repeats} interleaved rounds after a warm-up; each time is one whole "
        "`nbgrader autograde` (start, sanitise, run, grade, save). 1-minute load average during "
        f"the runs: {min(load):.1f} to {max(load):.1f}.\n\n{table}\n"
    )
    OUT.mkdir(exist_ok=True)
    atomic_write_bytes(OUT / f"{args.stem}.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(OUT / f"{args.stem}.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
