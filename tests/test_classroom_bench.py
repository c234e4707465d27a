"""benchmarks/classroom.py at a tiny step count: its structure and arithmetic, never its timings.

Every student is a real Python process that imports lab, so these runs also check that the
students get the thread counts lab.threads gives them.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import classroom
from lab.threads import cgroup_cpu_quota, usable_cpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    return classroom.run_classroom(steps=2, repeats=1, warmup=0, progress=False)


def bounded_threads() -> int:
    """What JUPYTERHUB_USER gives on this machine (a CPU quota comes first in the rule)."""
    quota = cgroup_cpu_quota()
    return 1 if quota is None else min(math.ceil(quota.cpus), usable_cpus())


def torch_default_threads() -> int:
    env = classroom.student_env("unbounded", 0)
    code = "import torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return int(out.stdout)


def test_both_settings_run_alone_and_together_with_their_threads(report):
    assert list(report["modes"]) == ["unbounded", "bounded"]
    assert report["settings"]["steps"] == 2 and report["settings"]["students"] == 2
    unbounded, bounded = report["modes"]["unbounded"], report["modes"]["bounded"]
    assert bounded["threads"] == [bounded_threads()]
    if cgroup_cpu_quota() is None:
        assert unbounded["threads"] == [torch_default_threads()]
        assert "torch's default" in unbounded["why"] and "JUPYTERHUB_USER" in bounded["why"]
    for mode, m in report["modes"].items():
        runs = report["runs"][mode]
        assert [r["students"] for r in runs["alone"]] == [1]
        assert [len(r["train_s"]) for r in runs["together"]] == [2]
        assert all(t > 0 for r in runs["alone"] + runs["together"] for t in r["train_s"])
        # Same seed, same threads: alone and together train exactly the same numbers.
        assert m["same_result"] and len(m["final_loss"]) == 1
        assert all(0.0 <= a <= 1.0 for a in m["accuracy"])


def test_the_ratios_come_from_the_medians(report):
    steps = report["settings"]["steps"]
    for mode, m in report["modes"].items():
        runs = report["runs"][mode]
        alone = statistics.median(r["train_s"][0] for r in runs["alone"])
        each = statistics.median(t for r in runs["together"] for t in r["train_s"])
        makespan = statistics.median(max(r["train_s"]) for r in runs["together"])
        assert m["alone"]["median_s"] == alone and m["together_each"]["median_s"] == each
        assert m["slowdown"] == pytest.approx(each / alone)
        assert m["together_steps_per_s"] == pytest.approx(2 * steps / makespan)
        assert m["throughput_ratio"] == pytest.approx((2 * steps / makespan) / (steps / alone))
    b, u = report["modes"]["bounded"], report["modes"]["unbounded"]
    assert report["bounded_together_vs_unbounded_alone"] == pytest.approx(
        b["together_each"]["median_s"] / u["alone"]["median_s"]
    )


def test_summarize_on_known_timings():
    def run(times, loss=1.5):
        return {"students": len(times), "threads": [1] * len(times), "why": "w",
                "train_s": times, "final_loss": [loss] * len(times), "accuracy": [0.5]}  # fmt: skip

    alone = [run([2.0]), run([4.0]), run([3.0])]
    together = [run([6.0, 8.0]), run([5.0, 7.0]), run([9.0, 9.0])]
    m = classroom.summarize(alone, together, steps=30)
    assert m["alone"] == {"median_s": 3.0, "spread_s": [2.0, 4.0], "runs_s": [2.0, 4.0, 3.0]}
    assert m["together_each"]["median_s"] == 7.5
    assert m["together_each"]["spread_s"] == [6.25, 8.75]  # quartiles of 5, 6, 7, 8, 9, 9
    assert m["slowdown"] == 2.5
    assert m["alone_steps_per_s"] == 10.0 and m["together_steps_per_s"] == 60 / 8
    assert m["throughput_ratio"] == 0.75 and m["same_result"]
    assert not classroom.summarize(alone, [run([6.0, 8.0], loss=1.25)], steps=30)["same_result"]


def test_the_report_is_written_as_json_and_text(report, tmp_path):
    paths = classroom.write_results(report, tmp_path, "smoke")
    assert sorted(p.name for p in paths) == ["smoke.json", "smoke.md"]
    assert json.loads((tmp_path / "smoke.json").read_text())["modes"] == report["modes"]
    md = (tmp_path / "smoke.md").read_text()
    assert md.startswith("# Two students at once against one alone (")
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| threads per student"))
    assert "| slowdown |" in lines[header] and "| throughput ratio |" in lines[header]
    assert lines[header + 2].startswith("| torch's default: ")
    assert lines[header + 3].startswith("| the lab's shared-host default: ")
    assert classroom.summary(report) in md
    assert f"{report['modes']['unbounded']['slowdown']:.2f}x as long" in md


def test_students_get_a_clean_environment(monkeypatch):
    for name in ("LORA_LAB_THREADS", "OMP_NUM_THREADS", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.setenv(name, "3")
    env = classroom.student_env("bounded", 1)
    assert env["JUPYTERHUB_USER"] == "student-2"
    assert not {"LORA_LAB_THREADS", "OMP_NUM_THREADS", "JUPYTERHUB_API_TOKEN"} & set(env)
    assert "JUPYTERHUB_USER" not in classroom.student_env("unbounded", 0)
    with pytest.raises(ValueError, match="unknown mode 'laptop'; valid: unbounded, bounded"):
        classroom.student_env("laptop", 0)


def test_a_student_that_fails_is_reported_with_its_error():
    with pytest.raises(RuntimeError, match="before it could get ready") as error:
        classroom.run_students("bounded", 1, "nonsense", 2, timeout=120)
    assert "unknown task 'nonsense'" in str(error.value)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"task": "pretrain"}, "task 'pretrain' is not a fine-tuning task; valid: ("),
        ({"steps": 0}, "steps=0: expected a whole number of at least 1"),
        ({"repeats": True}, "repeats=True"),
        ({"students": 1}, "students=1: expected a whole number of at least 2"),
    ],
)
def test_run_classroom_refuses_bad_settings_before_starting_anyone(kwargs, words):
    with pytest.raises(ValueError) as error:
        classroom.run_classroom(**kwargs, progress=False)
    assert words in str(error.value)


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--task", "nonsense"], 2, ["--task 'nonsense'", "valid: sort_desc, shift, rotate"]),
        (["--stem", "a/b"], 2, ["--stem 'a/b'", "plain file name stem"]),
        (["--out", "FILE"], 1, ["is a file, not a folder", "--out"]),
    ],
)
def test_command_line_refuses_bad_settings(tmp_path, capsys, args, code, words):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "results")]
    assert classroom.main([*args, *out]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing made or written


@pytest.mark.parametrize("args", [["--steps", "0"], ["--repeats", "two"], ["--warmup", "9"]])
def test_command_line_range_checks_its_numbers(args, capsys):
    with pytest.raises(SystemExit) as usage:
        classroom.main(args)
    assert usage.value.code == 2 and args[0] in capsys.readouterr().err


def test_python_m_benchmarks_classroom_runs_from_the_repository_root(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.classroom", "--task", "nonsense",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "error: --task 'nonsense'" in proc.stderr
