"""`python -m lab sweep` with the LoRA flavours: --variant, --init, --lr-ratio, --quant.

Most cases call the command line's main(argv) in this process (a new process costs seconds of
imports); one smoke test runs the real `python -m lab`. The real-process faults (devices, caches,
Ctrl-C) are in tests/test_bad_input_cli.py.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from fakes import fake_result

import lab.__main__ as cli
from lab.config import INITS, VARIANTS
from lab.quant import SCHEMES
from lab.sweeps import SweepPoint, SweepResult, describe

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--task", "sort_desc_small", "--ranks", "1", "--steps", "3", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def keep_warning_hook(monkeypatch):
    """main() installs a one-line warning printer; put the original back after each test."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)


class FakeSweep:
    """Stands in for lab.sweeps.sweep: records the points and returns made-up results."""

    def __init__(self) -> None:
        self.points: list[SweepPoint] = []

    def __call__(self, points, cache, *, on_result=None, **kwargs):
        self.points = list(points)
        results = [fake_result(p, accuracy=0.25) for p in self.points]
        for r in results:
            on_result(r)
        return results


@pytest.fixture
def fake_sweep(monkeypatch) -> FakeSweep:
    fake = FakeSweep()
    monkeypatch.setattr(cli, "sweep", fake)
    return fake


def usage_error(capsys, argv) -> str:
    """Run main(argv), expect argparse's usage error (exit 2); return stderr's last line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m lab sweep" in err and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--variant", "lora+"], ["--variant", "invalid choice", "'lora+'", "'lora'", "'dora'"]),
        (["--variant", "DoRA"], ["--variant", "invalid choice", "'dora'"]),
        (["--init", "svd"], ["--init", "invalid choice", "'default'", "'pissa'"]),
        (["--quant", "nf8"], ["--quant", "invalid choice", "'nf4'", "'fp4'", "'int4'"]),
        (["--quant", "none"], ["--quant", "invalid choice"]),
        (["--lr-ratio", "0"], ["--lr-ratio", "lr ratio 0", "out of range", "(0.0, 10000.0]"]),
        (["--lr-ratio", "-16"], ["--lr-ratio", "lr ratio -16", "out of range"]),
        (["--lr-ratio", "1e5"], ["--lr-ratio", "lr ratio 1e5", "out of range"]),
        (["--lr-ratio", "inf"], ["--lr-ratio", "out of range"]),
        (["--lr-ratio", "nan"], ["--lr-ratio", "out of range"]),
        (["--lr-ratio", "sixteen"], ["--lr-ratio", "'sixteen'", "not a number"]),
        (["--init", "pissa", "--quant", "nf4"], ["init='pissa'", "quant='nf4'", "full-precision"]),
        (["--lr", "0"], ["--lr", "lr 0 is out of range", "(0.0, 10.0]"]),
        (["--lr", "fast"], ["--lr", "'fast'", "not a number"]),
    ],
)
def test_bad_flavour_settings_are_usage_errors(capsys, tmp_path, fake_sweep, extra, words):
    last = usage_error(capsys, ["sweep", *SMALL, *extra, "--cache", str(tmp_path / "c")])
    assert all(w in last for w in words), last
    assert fake_sweep.points == [] and not (tmp_path / "c").exists()  # nothing ran or written


def test_the_choices_come_from_the_registries(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for option, names in (("--variant", VARIANTS), ("--init", INITS), ("--quant", SCHEMES)):
        assert f"{option} {{{','.join(names)}}}" in text, option
    assert "--lr-ratio LAMBDA" in text


@pytest.mark.parametrize(
    "extra, fields, label",
    [
        ([], {}, "r1 α16"),
        (["--variant", "dora"], {"variant": "dora"}, "r1 α16 DoRA"),
        (["--init", "pissa"], {"init": "pissa"}, "r1 α16 PiSSA"),
        (["--lr-ratio", "16"], {"lr_ratio": 16.0}, "r1 α16 LoRA+ λ16"),
        (["--quant", "nf4"], {"quant": "nf4"}, "r1 α16 NF4 base"),
        (
            ["--quant", "int4", "--variant", "dora"],
            {"quant": "int4", "variant": "dora"},
            "r1 α16 DoRA INT4 base",
        ),
    ],
)
def test_each_flavour_reaches_every_point_and_its_line(
    capsys, tmp_path, fake_sweep, extra, fields, label
):
    argv = ["sweep", *SMALL[:3], "1", "4", *SMALL[4:], *extra, "--cache", str(tmp_path)]
    assert cli.main([*argv, "--full"]) == 0
    out = capsys.readouterr().out
    expected = [SweepPoint("sort_desc_small", r, steps=3, batch_size=8, **fields) for r in (1, 4)]
    assert fake_sweep.points[:2] == expected
    full = fake_sweep.points[2]  # the full fine-tuning reference is always plain and fp32
    assert full.is_full and full.quant is None and full.variant == "lora"
    assert f"trained {label} (1/3)" in out
    assert f"trained {label.replace('r1', 'r4')} (2/3)" in out
    table = [line for line in out.splitlines() if line.startswith(label + " ")]
    assert len(table) == 1 and table[0].split()[-5:] == ["0.250", "0.875", "-", "512", "1.0"]


def test_plain_settings_keep_the_cache_keys_they_had(tmp_path, fake_sweep, capsys):
    assert cli.main(["sweep", *SMALL, "--cache", str(tmp_path)]) == 0
    (point,) = fake_sweep.points
    assert point == SweepPoint("sort_desc_small", 1, steps=3, batch_size=8)
    assert not {"variant", "init", "lr_ratio", "quant"} & set(point.to_dict())


def test_a_long_label_widens_the_table_column(tmp_path, fake_sweep, capsys):
    args = ["--variant", "dora", "--init", "pissa", "--lr-ratio", "16", "--rslora"]
    assert cli.main(["sweep", *SMALL, *args, "--targets", "q", "k", "v", "o", "up", "down",
                     "--cache", str(tmp_path)]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    label = describe(fake_sweep.points[0])
    assert len(label) > 28
    header = next(line for line in lines if line.startswith("point "))
    row = next(line for line in lines if line.startswith(label))
    assert header.index("held-out acc") + len("held-out acc") == row.index("0.250") + len("0.250")


def test_a_dora_point_on_a_4_bit_base_trains_alone_and_is_cached(tmp_path, capsys, monkeypatch):
    # How the point trains and is cached is checked here, not what run_point measures after
    # training (forgetting on the pretraining skills), which costs more than 3 steps: left out.
    monkeypatch.setattr(importlib.import_module("lab.engine.run"), "forgetting", lambda m: None)
    argv = ["sweep", *SMALL, "--variant", "dora", "--quant", "nf4", "--device", "cpu"]
    assert cli.main([*argv, "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trains one by one" in out and "DoRA NF4 base" in out
    assert "trained r1 α16 DoRA NF4 base (1/1)" in out
    (stored,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    point = SweepResult.from_dict(stored).point
    assert (point.variant, point.quant, point.init, point.lr_ratio) == ("dora", "nf4", "default", 1)
    assert cli.main([*argv, "--cache", str(tmp_path)]) == 0  # cached: nothing to train
    assert "1 point on sort_desc_small, 0 to train" in capsys.readouterr().out


def test_the_bench_command_says_where_the_benchmarks_went(capsys):
    assert cli.main(["bench", "layers", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "python -m lab: the benchmarks live in benchmarks/ now: "
        "python -m benchmarks.bench layers --quick\n"
    )
    assert cli.main(["bench"]) == 2
    assert capsys.readouterr().err.strip().endswith("now: python -m benchmarks.bench")


def test_a_real_process_trains_a_lora_plus_point(tmp_path):
    env = {**os.environ, "LORA_LAB_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "lab", "sweep", *SMALL, "--lr-ratio", "16", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "trained r1 α16 LoRA+ λ16 (1/1)" in proc.stdout
    (stored,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert stored["point"]["lr_ratio"] == 16.0


def test_lr_sets_the_lora_points_and_leaves_full_fine_tuning_at_its_own(tmp_path, fake_sweep):
    argv = ["sweep", *SMALL, "--lr-ratio", "16", "--lr", "2.5e-3", "--full"]
    assert cli.main([*argv, "--cache", str(tmp_path)]) == 0
    lora, full = fake_sweep.points
    assert lora.lr == 2.5e-3 and lora.lr_ratio == 16.0
    assert full.is_full and full.lr == SweepPoint("sort_desc_small", None).lr
