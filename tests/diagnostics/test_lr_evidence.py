"""lab/diagnostics/lr_evidence.py: an lr against the lrs that trained in the lab's shipped
sweeps."""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys

import pytest
from doctor_cases import codes, fresh, only

import lab
from lab.diagnosis import (
    LR_TOLERANCE,
    doctor,
    lr_evidence,
)
from lab.sweeps import DEFAULT_GRID_PATH, load_grid_file, write_grid_file

# ----------------------------------------------------------------------------- learning rate


def test_lr_against_the_shipped_grids(healthy):
    evidence = lr_evidence("LoRA")
    assert evidence is not None and DEFAULT_GRID_PATH.name in evidence.sources
    assert evidence.low <= 2e-2 <= evidence.high  # the lab's LoRA lr trained
    assert doctor(healthy, lr=2e-2) == []
    high = only(doctor(healthy, lr=10.0), "lr-too-high")
    assert "lower lr to between" in high.advice and "LoRA trained" in high.advice
    assert DEFAULT_GRID_PATH.name in high.detail
    low = only(doctor(healthy, lr=1e-7), "lr-too-low")
    assert "raise lr" in low.advice
    full = lab.load_base_model("cpu")
    full_evidence = lr_evidence("full fine-tuning")
    assert full_evidence is not None and full_evidence.high < evidence.high
    assert doctor(full, lr=1e-3) == []  # the lab's full fine-tuning lr
    assert "full fine-tuning" in only(doctor(full, lr=10.0), "lr-too-high").advice


def _result(template, lr: float, accuracy: float, diverged: bool = False, **point):
    heldout = {"loss": math.nan if diverged else 0.5, "accuracy": accuracy, "n": 512}
    return dataclasses.replace(
        template,
        point=dataclasses.replace(template.point, lr=lr, **point),
        heldout=heldout,
        train_eval=None,
        diverged=diverged,
    )


def test_lr_range_from_every_grid_file_with_failed_lrs(tmp_path, monkeypatch):
    template = next(r for r in load_grid_file(DEFAULT_GRID_PATH) if r.point.rank == 8)
    results = [
        _result(template, 1e-3, 0.05),  # stalled: under half the best
        _result(template, 1e-2, 0.80),
        _result(template, 2e-2, 0.90),
        _result(template, 4e-2, 0.0, diverged=True),
    ]
    write_grid_file(tmp_path / "practice_grid.json", results, "a test grid")
    write_grid_file(tmp_path / "full_grid.json",
                    [_result(template, 1e-3, 0.9, rank=None)], "full")  # fmt: skip
    (tmp_path / "notes.json").write_text("{}")  # not a *_grid.json: never read
    evidence = lr_evidence("LoRA", tmp_path)
    assert evidence.trained == (1e-2, 2e-2) and evidence.failed == (1e-3, 4e-2)
    assert evidence.sources == ("practice_grid.json",) and evidence.runs == 4
    assert lr_evidence("LoRA+", tmp_path) is None
    # A folder that is not there is an error, not "no evidence".
    for missing in (tmp_path / "nope", tmp_path / "notes.json"):
        with pytest.raises(NotADirectoryError, match=f"directory {missing} is not a folder"):
            lr_evidence("LoRA", missing)
    module = importlib.import_module("lab.diagnostics.lr_evidence")
    monkeypatch.setattr(module, "GRID_DIR", tmp_path)
    model = fresh()
    assert "lr-too-high" not in codes(doctor(model, lr=3e-2))  # between 0.02 and the failed 0.04
    high = only(doctor(model, lr=4e-2), "lr-too-high")  # where a run diverged
    assert "0.04 failed" in high.detail and "practice_grid.json" in high.detail
    assert "between 0.01 and 0.02" in high.advice
    assert "lr-too-low" not in codes(doctor(model, lr=1e-2 / LR_TOLERANCE))
    low = only(doctor(model, lr=1e-3), "lr-too-low")
    assert "0.001 failed" in low.detail and "where full fine-tuning trained" in low.detail
    full = lab.load_base_model("cpu")
    assert "about 0.001" in only(doctor(full, lr=2e-2), "lr-too-high").advice


# A FIFO or a link to /dev/zero named like a grid file is skipped, never read: reading would
# block, or never end. Run in a child process with a deadline, so a regression fails, not hangs.
_SPECIAL_GRIDS = """
import os, pathlib, shutil, sys
from lab.diagnostics.lr_evidence import GRID_DIR, lr_evidence
folder = pathlib.Path(sys.argv[1])
shutil.copy(GRID_DIR / "default_grid.json", folder / "default_grid.json")
expected = lr_evidence("LoRA", folder)
os.mkfifo(folder / "pipe_grid.json")
(folder / "zero_grid.json").symlink_to("/dev/zero")
assert expected is not None and lr_evidence("LoRA", folder) == expected
print("skipped both")
"""


def test_grid_files_that_are_not_files_are_skipped_never_read(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _SPECIAL_GRIDS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )
    assert done.returncode == 0 and "skipped both" in done.stdout, done.stdout + done.stderr


def test_bad_lr_raises_naming_it(healthy):
    for bad, error in ((0, ValueError), (-1e-3, ValueError), (math.nan, ValueError),
                       (math.inf, ValueError), ("1e-3", TypeError), (True, TypeError)):  # fmt: skip
        with pytest.raises(error, match="lr="):
            doctor(healthy, lr=bad)


def test_each_flavour_is_judged_against_its_own_runs():
    """LoRA-FA trains best at 8x LoRA's rate on the toy (notebook 08): its runs widen neither
    LoRA's range nor its failures, and a LoRA-FA model is judged by LoRA-FA's runs."""
    lora, fa = lr_evidence("LoRA"), lr_evidence("LoRA-FA")
    assert lora is not None and fa is not None and fa.high > lora.high * LR_TOLERANCE
    evidence = lab.diagnostics.lr_evidence
    grids = [r for _, r in evidence._grid_results(evidence.GRID_DIR)]
    plain = [
        r for r in grids if r.point.rank and (r.point.variant, r.point.init) == ("lora", "default")
    ]
    assert lora.runs == sum(r.point.lr_ratio == 1 for r in plain)  # no other flavour's runs
    assert "lr-too-high" in codes(doctor(fresh(), lr=fa.high))
    assert "lr-too-high" not in codes(doctor(fresh(variant="lora-fa"), lr=fa.high))
    advice = only(doctor(fresh(variant="lora-fa"), lr=fa.high * 10), "lr-too-high").advice
    assert "LoRA-FA trained" in advice


def test_the_kinds_asked_for_are_the_registered_flavours():
    with pytest.raises(ValueError, match="'LoRA-FA'.*full fine-tuning"):
        lr_evidence("VeRA")
