"""Smoke runs of every benchmark at tiny sizes: they keep working. No test asserts a timing."""

from __future__ import annotations

import json
import os

import pytest

from lab import bench
from lab.__main__ import main


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
    assert sweep["rows"][0]["configs"] == 4 and sweep["rows"][0]["speedup"] > 0
    assert [s["configs"] for s in sweep["scaling"]] == [1, 2]
    shares = [p["share"] for p in sweep["profiles"]["4"]["batched"]]
    assert sum(shares) == pytest.approx(1.0)


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
                    "Where the time goes"):  # fmt: skip
        assert heading in md
    for fig in bench.plots(report).values():
        for ax in fig.axes:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_bench_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown benchmarks \['speed'\]; valid"):
        bench.run_all(["speed"], quick=True)
    with pytest.raises(ValueError, match="repeats=0"):
        bench.alternate({"a": lambda: None}, repeats=0)


def test_cli_bench_quick_writes_results(tmp_path, capsys):
    assert main(["bench", "layers", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench-quick.md").is_file()
    assert "lab.LoRALinear vs loralib vs PEFT" in capsys.readouterr().out


def test_cli_sweep_trains_a_grid_batched_and_caches_it(tmp_path, capsys):
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
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-quick.json").read_text())
    assert list(report["results"]) == list(module.NAMES)
    rows = report["results"]["throughput"]["rows"]
    assert [r["method"] for r in rows] == ["full fine-tuning", "LoRA r4 (q, v)"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows)  # no GPU peak on a CPU
    assert rows[1]["model_flops_per_step"] < rows[0]["model_flops_per_step"]
    assert "Throughput: the tiny preset" in (tmp_path / "gpu-quick.md").read_text()
    assert report["results"]["growth"]["measured_memory"]  # from the lora_vs_full part
    # Past its time budget the script skips the rest and says which it skipped.
    assert module.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "b"),
                        "--budget", "0"]) == 0  # fmt: skip
    partial = json.loads((tmp_path / "b" / "gpu-quick.json").read_text())
    assert list(partial["results"]) == ["throughput"]
    assert partial["skipped"] == list(module.NAMES[1:])
    skipped = ", ".join(module.NAMES[1:])
    md = (tmp_path / "b" / "gpu-quick.md").read_text()
    assert f"Skipped, over the time budget: {skipped}." in md
    # Without a GPU the real run says so and runs nothing.
    if not __import__("torch").cuda.is_available():
        assert module.main(["--out", str(tmp_path / "none")]) == 1
        assert not (tmp_path / "none").exists()
