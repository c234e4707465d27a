"""Smoke runs of every benchmark at tiny sizes: they keep working. No test asserts a timing.

The benchmarks live outside the lab in `benchmarks/` and run from the repository root as
`python -m benchmarks.bench`; pytest runs from there too, so `import benchmarks` finds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench, gpu, tasks
from benchmarks.common import describe_machine, machine
from lab.analysis import format_table, time_calls

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    return bench.run_all(quick=True, progress=False)


def test_every_benchmark_runs_and_reports_both_sides(report):
    results = report["results"]
    assert list(results) == list(bench.BENCHMARKS)
    assert report["machine"]["torch"].startswith("2.13") and report["machine"]["cores"] >= 1

    full = results["lora_vs_full"]
    assert [r["d_model"] for r in full["widths"]] == [32, 64]
    assert [r["rank"] for r in full["ranks"]] == [1, 4]
    for row in full["widths"] + full["ranks"]:
        assert row["full_ms"] > 0 and row["lora_ms"] > 0
        assert row["time_ratio"] == pytest.approx(row["lora_ms"] / row["full_ms"])
        assert 0.6 < row["flop_ratio"] < 0.7  # LoRA's backward skips the weight gradients
        assert row["lora_peak_bytes"] < row["full_peak_bytes"]  # measured, not assumed
        assert row["trainable"] == 2 * 2 * row["rank"] * 2 * row["d_model"]  # q, v x 2 layers

    layers = {r["implementation"]: r for r in results["layers"]["rows"]}
    assert layers["lab"]["lab_ratio"] == 1.0 and layers["lab"]["max_abs_diff"] == 0.0
    assert all(r["same_output"] for r in layers.values())
    assert set(layers) | set(results["layers"]["missing"]) == {"lab", "loralib", "peft"}

    inference = results["inference"]["rows"][0]
    assert inference["merged_vs_unmerged_max_abs_diff"] < 1e-4  # merging changed nothing
    assert inference["unmerged_flop_share"] == pytest.approx(
        2 * 2 * 4 * 2 * 64 / (2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 64), rel=1e-6
    )

    growth = results["growth"]["rows"]
    assert [r["parameters"] for r in growth][2] == 406_784  # the lab's shipped CPU model
    assert growth[2]["r4_trainable"] == 4_096
    assert results["growth"]["measured_memory"]  # taken from lora_vs_full

    sweep = results["sweep"]
    row = sweep["rows"][0]
    assert row["configs"] == 4 and row["speedup"] > 0
    # The chunk size sweep() uses is the measured one; the measurement reports its own cost.
    (calibration,) = sweep["calibration"]
    assert row["chunk"] == calibration["chunk"] and calibration["seconds"] > 0
    assert set(calibration["ms_per_config_step"]) == {"1", "2", "4"}
    assert row["static_chunk"] == calibration["static_chunk"] == 128 // 4
    assert [s["configs"] for s in sweep["scaling"]] == [1, 2]
    for s in sweep["scaling"]:
        assert s["chunk"] == min(row["chunk"], s["configs"])
        if s["chunk"] == 1:  # sweep() trains each alone: the alone loop itself
            assert s["default_speedup"] == 1.0
    (masks,) = sweep["masks"]
    assert masks["configs"] == 4 and masks["with_dropout"] == 2
    assert 0 < masks["exact_mask_share"] < 1 and 0 < masks["fast_mask_share"] < 1
    shares = [p["share"] for p in sweep["profiles"]["4"]["batched"]]
    assert sum(shares) == pytest.approx(1.0)


def test_qlora_measures_three_bases_side_by_side(report):
    rows = report["results"]["qlora"]["rows"]
    assert [(r["d_model"], r["base"]) for r in rows] == [
        (d, b) for d in (32, 64) for b in ("fp32", "bf16", "nf4")
    ]
    for d in (32, 64):
        by = {r["base"]: r for r in rows if r["d_model"] == d}
        # The same adapters on every base: q, v x 2 layers, rank 4, fp32.
        assert {r["trainable"] for r in by.values()} == {2 * 2 * 4 * 2 * d}
        assert by["fp32"]["time_ratio"] == 1.0 and by["fp32"]["weight_ratio"] == 1.0
        for r in by.values():
            assert r["step_ms"] > 0 and r["peak_bytes"] > 0
            assert r["time_ratio"] == pytest.approx(r["step_ms"] / by["fp32"]["step_ms"])
            assert r["weight_bytes"] == r["parameter_bytes"] + r["buffer_bytes"]
        # Measured storage: fp32 and bf16 weights are parameters, the 4-bit codes buffers.
        assert by["fp32"]["bits_per_weight"] == 32.0 and by["bf16"]["bits_per_weight"] == 16.0
        assert by["fp32"]["buffer_bytes"] == by["bf16"]["buffer_bytes"] == 0
        # The tracker counts whole storages, and every 4-bit buffer owns exactly its bytes
        # (the 8-bit scales are not a view of their padded groups of 256).
        assert by["nf4"]["block_weight_bytes"] > 0
        assert by["nf4"]["buffer_bytes"] == by["nf4"]["block_weight_bytes"]
        assert by["nf4"]["weight_bytes"] < by["bf16"]["weight_bytes"] < by["fp32"]["weight_bytes"]
        # At these tiny widths one fp32 scale serves fewer than 256 blocks: a little above 4.127.
        assert by["nf4"]["analytic_bits_per_weight"] == pytest.approx(4.127, abs=5e-4)
        assert 4.127 < by["nf4"]["bits_per_weight"] < 4.16
        # Bytes as stored: two codes a byte, an 8-bit scale per block of 64, and per layer
        # (2 x q, k, v, o, up, down) one fp32 scale (under 256 blocks each here) and its offset.
        blocks, layers = by["nf4"]["block_weights"] // 64, 2 * 6
        assert by["nf4"]["block_weight_bytes"] == blocks * 32 + blocks + 4 * layers + 4 * layers


def test_nf4_bits_per_weight_is_the_papers_arithmetic():
    assert bench.nf4_bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(bench.nf4_bits_per_weight(), 3) == 4.127
    assert bench.nf4_bits_per_weight(64, double_quant=False) == 4.5


def test_dora_is_timed_against_lora_at_the_same_rank(report):
    result = report["results"]["dora"]
    assert result["settings"]["peft_reported_slowdown"] == bench.PEFT_DORA_SLOWDOWN == 0.14
    assert [r["d_model"] for r in result["rows"]] == [32, 64]
    for r in result["rows"]:
        assert r["lora_trainable"] == 2 * 2 * 4 * 2 * r["d_model"]
        assert r["dora_trainable"] == r["lora_trainable"] + 2 * 2 * r["d_model"]  # magnitudes
        assert r["time_ratio"] == pytest.approx(r["dora_ms"] / r["lora_ms"])
        assert r["tokens_per_s_slowdown"] == pytest.approx(1 - r["lora_ms"] / r["dora_ms"])
        assert r["lora_peak_bytes"] > 0 and r["dora_peak_bytes"] > 0


@pytest.mark.parametrize("name", ["loralib", "peft"])
def test_established_implementations_give_our_outputs(name):
    try:
        __import__(name)
    except ImportError:
        message = f"{name} is benchmark-only: pip install -r benchmarks/requirements.txt"
        if os.environ.get("CI") == "true":  # .ci/run installs it: its absence is a failure there
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    result = bench.bench_layers(d_model=48, rank=4, tokens=16, repeats=1, progress=False)
    row = next(r for r in result["rows"] if r["implementation"] == name)
    assert row["same_output"] and row["max_abs_diff"] < 1e-5
    assert row["trainable"] == 4 * 48 * 2  # A and B only


def test_results_are_written_as_json_markdown_and_plots(report, tmp_path):
    paths = bench.write_results(report, tmp_path, "smoke")
    names = sorted(p.name for p in paths)
    assert names == ["smoke.json", "smoke.md", "smoke_growth.png", "smoke_lora_vs_full.png",
                     "smoke_ranks.png", "smoke_sweep.png"]  # fmt: skip
    assert json.loads((tmp_path / "smoke.json").read_text())["results"].keys() == report[
        "results"].keys()  # fmt: skip
    md = (tmp_path / "smoke.md").read_text()
    for heading in ("LoRA (q, v) vs full fine-tuning", "lab.LoRALinear vs loralib vs PEFT",
                    "merged vs base", "Cost growth", "one after another vs batched",
                    "Where the time goes", "QLoRA: LoRA (q, v) on an fp32, a bf16 and a 4-bit",
                    "DoRA vs LoRA"):  # fmt: skip
        assert heading in md
    assert "PEFT reports DoRA about 14% slower" in md
    assert "| d_model | base |" in md and "|--------:|------|" in md  # format_table's markdown
    for fig in bench.plots(report).values():
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_bench_rejects_unknown_names_and_bad_timer_settings():
    with pytest.raises(ValueError, match=r"unknown benchmarks \['speed'\]; valid"):
        bench.run_all(["speed"], quick=True)
    with pytest.raises(ValueError, match="repeats=0"):
        time_calls({"a": lambda: None}, repeats=0)


def test_markdown_tables_come_from_format_table():
    rows = [{"name": "lora", "n": 8192, "note": "a|b"}, {"name": "full", "n": 406784, "note": ""}]
    assert format_table(rows, markdown=True).splitlines() == [
        "| name |       n | note |",
        "|------|--------:|------|",
        "| lora |   8,192 | a\\|b |",
        "| full | 406,784 |      |",
    ]
    assert format_table(rows).splitlines()[0] == "name        n  note"  # the text table as before
    with pytest.raises(TypeError, match="markdown must be True or False, got 'yes'"):
        format_table(rows, markdown="yes")
    assert rows[0] == {"name": "lora", "n": 8192, "note": "a|b"}  # the rows are left as they were


def test_machine_says_where_it_was_measured():
    info = machine("cpu")
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert describe_machine(info) == (
        f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads"
    )
    assert describe_machine({**info, "gpu": "H200"}).startswith("H200 (host: ")
    assert describe_machine("x86_64, 2 threads") == "x86_64, 2 threads"  # older reports


def test_command_line_writes_results_with_the_chosen_settings(tmp_path, capsys):
    args = ["dora", "--quick", "--repeats", "2", "--batch-size", "3", "--threads", "1",
            "--out", str(tmp_path)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert "wrote" in capsys.readouterr().out
    written = json.loads((tmp_path / "bench-quick.json").read_text())
    assert written["machine"]["torch_threads"] == 1
    result = written["results"]["dora"]
    assert result["settings"]["repeats"] == 2 and result["settings"]["batch_size"] == 3
    assert "DoRA vs LoRA" in (tmp_path / "bench-quick.md").read_text()
    # growth times nothing: --repeats is passed only to the benchmarks that take it.
    assert bench.main(["growth", "--quick", "--repeats", "2", "--stem", "g", "--out",
                       str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "g.md").is_file()


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["speed", "--quick"], 2, ["unknown benchmarks ['speed']", "valid", "qlora"]),
        (["dora", "--stem", "a/b"], 2, ["--stem 'a/b'", "plain file name stem"]),
        (["dora", "--stem", ".hidden"], 2, ["--stem '.hidden'"]),
        (["dora", "--device", "nonsense"], 2, ["device='nonsense'", "try 'cpu'"]),
        (["dora", "--out", "FILE"], 1, ["is a file, not a folder", "--out"]),
    ],
)
def test_command_line_refuses_bad_settings_before_running(tmp_path, capsys, args, code, words):
    (tmp_path / "FILE").write_text("x")
    out = str(tmp_path / "results")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert bench.main(args if "--out" in args else [*args, "--out", out]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # nothing made or written
    assert (tmp_path / "FILE").read_text() == "x"


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--batch-size", "two"], ["--threads", "0"]])
def test_command_line_range_checks_its_numbers(args, capsys):
    with pytest.raises(SystemExit) as usage:  # argparse's usage error, before anything runs
        bench.main(["dora", *args])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert args[0] in err and ("at least 1" in err or "not a whole number" in err)


def test_python_m_benchmarks_bench_runs_from_the_repository_root(tmp_path):
    """The README's command, as a real process started in the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "nonsense", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown benchmarks ['nonsense']" in proc.stderr


def test_cli_sweep_trains_a_grid_batched_and_caches_it(tmp_path, capsys, monkeypatch):
    import importlib

    from lab.__main__ import main

    # The command's lines, cache and batching are checked here, not what each result measures
    # after training (forgetting, the first step's memory: tests/engine/test_batched.py), which
    # would cost more than the training: left out.
    run_module = importlib.import_module("lab.engine.run")
    monkeypatch.setattr(run_module, "forgetting", lambda model: None)
    monkeypatch.setattr(run_module, "_first_step_memory", lambda point, base, device: None)

    args = [
        "sweep",
        "--task",
        "sort_desc_small",
        "--ranks",
        "1",
        "2",
        "--alphas",
        "4",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--cache",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 points on sort_desc_small, 4 to train" in out
    assert "r2 α8" in out and "done in" in out
    assert "batched: 4 points in 1 run of up to 4 points" in out  # batch 8: up to 16 per run
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert main(args) == 0  # everything cached now
    assert "4 points on sort_desc_small, 0 to train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # argparse's usage error, before anything runs
        main(["sweep", "--ranks", "0", "--cache", str(tmp_path)])
    assert usage.value.code == 2
    assert "rank 0 is out of range [1, 4,096]" in capsys.readouterr().err


def test_gpu_script_runs_its_comparisons_on_a_cpu_at_smoke_sizes(tmp_path):
    assert {"qlora", "dora"} <= set(gpu.NAMES) and set(gpu.NAMES) <= set(gpu.GPU_SETTINGS)
    for name in ("qlora", "dora"):  # the GPU sizes: d_model 1024 to 4096, 8 layers
        assert gpu.GPU_SETTINGS[name]["widths"][0] == 1024
        assert gpu.GPU_SETTINGS[name]["n_layers"] == 8
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-quick.json").read_text())
    assert list(report["results"]) == list(gpu.NAMES)
    rows = report["results"]["throughput"]["rows"]
    assert [r["method"] for r in rows] == ["full fine-tuning", "LoRA r4 (q, v)"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)  # no GPU peak on a CPU
    assert rows[1]["model_flops_per_step"] < rows[0]["model_flops_per_step"]
    md = (tmp_path / "gpu-quick.md").read_text()
    assert "Throughput: the tiny preset" in md and "QLoRA" in md and "DoRA vs LoRA" in md
    assert report["results"]["qlora"]["settings"]["precision"] == "float32"  # bf16 on CUDA only
    assert report["results"]["growth"]["measured_memory"]  # from the lora_vs_full part
    # Past its time budget the script skips the rest and says which it skipped.
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "b"),
                     "--budget", "0"]) == 0  # fmt: skip
    partial = json.loads((tmp_path / "b" / "gpu-quick.json").read_text())
    assert list(partial["results"]) == ["throughput"]
    assert partial["skipped"] == list(gpu.NAMES[1:])
    skipped = ", ".join(gpu.NAMES[1:])
    md = (tmp_path / "b" / "gpu-quick.md").read_text()
    assert f"Skipped, over the time budget: {skipped}." in md
    # Without a GPU the real run says so and runs nothing.
    if not torch.cuda.is_available():
        assert gpu.main(["--out", str(tmp_path / "none")]) == 1
        assert not (tmp_path / "none").exists()


def test_tasks_report_renders_the_committed_results():
    report = json.loads((ROOT / "benchmarks" / "results" / "tasks.json").read_text())
    md = tasks.to_markdown(report)
    assert md.startswith(f"# Tasks from the shipped base ({report['date']}, {report['machine']})")
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| task "))
    assert lines[header + 1].startswith("|------")
    first = report["tasks"][0]
    cells = [c.strip() for c in lines[header + 2].strip("|").split("|")]
    assert cells[:2] == [first["task"], f"{first['base_accuracy']:.3f}"]
    assert len(cells) == 9
    for heading in ("## Adapter dropout on", "## Memory of one training step"):
        assert heading in md
    report["machine"] = machine("cpu")  # reports written now keep the machine as a dict
    assert describe_machine(report["machine"]) in tasks.to_markdown(report)
