"""lab/diagnosis.py (lab.doctor): each diagnosis built as the broken case it names; a clean bill."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lab
from lab.adapters import lora_state_dict, save_adapter
from lab.diagnosis import (
    CODES,
    LR_TOLERANCE,
    SCALING_RANGE,
    Finding,
    doctor,
    lr_evidence,
    report,
    scaling_note,
)
from lab.step import forward_loss
from lab.surgery import add_lora, lora_layers, merge_lora
from lab.sweeps import DEFAULT_GRID_PATH, load_grid_file, write_grid_file

doctor_module = importlib.import_module("lab.diagnosis")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def codes(findings: list[Finding]) -> list[str]:
    """The findings' codes, after checking the properties every finding has."""
    for f in findings:
        assert isinstance(f, Finding)
        assert f.code in CODES, f.code
        assert f.advice.strip() and f.detail.strip()
    return [f.code for f in findings]


def only(findings: list[Finding], code: str) -> Finding:
    """The one finding with `code` (fails if there is none, or several)."""
    hits = [f for f in findings if f.code == code]
    assert len(hits) == 1, f"expected one {code!r} finding in {codes(findings)}"
    return hits[0]


def snapshot(model: torch.nn.Module) -> tuple:
    """Everything the doctor must leave alone: every tensor, flag, mode and merge state."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    merged = {n: layer.merged for n, layer in lora_layers(model).items()}
    return state, flags, modes, merged, [n for n, _ in model.named_modules()]


def assert_unchanged(before: tuple, model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1:] == after[1:]


def fresh(targets=ALL, **fields) -> torch.nn.Module:
    model = lab.load_base_model("cpu")
    torch.manual_seed(0)
    add_lora(model, targets=targets, **{"rank": 4, "alpha": 8, **fields})
    return model


@pytest.fixture(scope="module")
def task():
    return lab.get_task("rotate")


@pytest.fixture(scope="module")
def healthy(task):
    """A trained all-linear adapter (rank 4, alpha 8): the acceptance check's healthy model."""
    torch.manual_seed(0)
    model = lab.load_base_model("cpu")
    add_lora(model, targets="all-linear", rank=4, alpha=8)
    lab.train(model, task, steps=150, lr=2e-2, progress=False, measure_memory=False)
    return model


@pytest.fixture
def sick(healthy):
    """A copy of the healthy model to break."""
    return copy.deepcopy(healthy)


@pytest.fixture(scope="module")
def adapter_file(healthy, tmp_path_factory):
    return save_adapter(healthy, tmp_path_factory.mktemp("adapter") / "healthy.safetensors")


# ----------------------------------------------------------------------------- the acceptance


def test_acceptance_fresh_healthy_merged(healthy, task):
    new = lab.load_base_model("cpu")
    add_lora(new, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    fresh_codes = codes(doctor(new))
    assert fresh_codes  # B all zero
    assert task.evaluate(healthy)["accuracy"] > 0.9  # it did train: the clean bill is earned
    assert doctor(healthy) == []
    merged = copy.deepcopy(healthy)
    merge_lora(merged)
    merged_codes = codes(doctor(merged))
    assert merged_codes and set(merged_codes).isdisjoint(fresh_codes)
    assert merged_codes == ["merged"]


def test_healthy_with_its_file_and_lr_is_clean(healthy, adapter_file):
    before = snapshot(healthy)
    assert doctor(healthy, adapter_file, lr=2e-2) == []
    assert doctor(healthy, str(adapter_file), lr=0.01) == []
    assert_unchanged(before, healthy)


# ----------------------------------------------------------------------------- untrained, frozen


def test_fresh_adapter_is_untrained_and_advice_names_the_optimizer():
    finding = only(doctor(fresh()), "untrained-adapter")
    assert "lora_B is exactly zero in all 12" in finding.detail
    assert "lab.train" in finding.advice and "optimizer" in finding.advice
    assert "lr > 0" in finding.advice and "optimizer.step()" in finding.advice


def test_optimizer_built_before_add_lora_leaves_b_zero(task):
    model = lab.load_base_model("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)  # before add_lora: wrong
    add_lora(model, targets=ALL, rank=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        inputs, targets = task.batch(16, generator)
        forward_loss(model, inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.lora_B.grad is not None for layer in lora_layers(model).values())
    assert codes(doctor(model)) == ["untrained-adapter"]


def test_some_adapters_untrained_names_them(sick):
    layers = lora_layers(sick)
    with torch.no_grad():
        layers["blocks.1.mlp.up_proj"].lora_B.zero_()
        layers["blocks.1.mlp.down_proj"].lora_B.zero_()
    finding = only(doctor(sick), "untrained-adapter")
    assert "in 2 of 12 trainable LoRA layers" in finding.detail
    assert "blocks.1.mlp.up_proj" in finding.detail and "blocks.1.mlp.down_proj" in finding.detail
    assert "after the optimizer was built" in finding.detail


def test_frozen_adapters_have_their_own_code(sick):
    for layer in lora_layers(sick).values():
        layer.lora_A.requires_grad_(False)
    finding = only(doctor(sick), "adapter-frozen")
    assert "12 of 24 adapter tensors have requires_grad=False" in finding.detail
    assert "requires_grad_(True)" in finding.advice
    # A fresh adapter frozen whole: the cause is the flag, not a missing training run.
    frozen = fresh()
    frozen.requires_grad_(False)
    assert codes(doctor(frozen)) == ["adapter-frozen"]


def test_nonfinite_adapter(sick):
    with torch.no_grad():
        lora_layers(sick)["blocks.0.attn.v_proj"].lora_B[0, 0] = math.nan
    finding = only(doctor(sick), "adapter-nonfinite")
    assert "blocks.0.attn.v_proj.lora_B" in finding.detail
    assert "lower lr" in finding.advice


# ----------------------------------------------------------------------------- the base


def test_base_left_trainable_counts_it_and_its_memory(sick):
    sick.requires_grad_(True)  # e.g. model.requires_grad_(True) after add_lora
    adapters = sum(p.numel() for p in lora_state_dict(sick).values())
    base = sum(p.numel() for p in sick.parameters()) - adapters
    finding = only(doctor(sick), "base-trainable")
    assert f"{base:,} base parameters" in finding.detail
    assert f"{base * 12 / 2**20:.2f} MiB (12 bytes each)" in finding.detail
    assert "requires_grad_(False)" in finding.advice
    assert codes(doctor(sick)) == ["base-trainable"]


def test_full_fine_tuning_and_a_bare_base():
    base = lab.load_base_model("cpu")  # every parameter trainable: full fine-tuning
    assert doctor(base) == []
    base.requires_grad_(False)
    finding = only(doctor(base), "no-adapter")
    assert "lab.add_lora" in finding.advice
    assert codes(doctor(base)) == ["no-adapter"]


# ----------------------------------------------------------------------------- scaling


def test_scaling_too_small_gives_the_other_rules_alpha():
    finding = only(doctor(fresh(rank=16, alpha=1)), "scaling-too-small")
    assert "alpha/r = 1/16 = 0.0625" in finding.detail
    assert "under alpha/sqrt(r) would be alpha = 0.25" in finding.detail  # 0.0625 * 4
    assert "raise alpha to about 32" in finding.advice


def test_scaling_too_large_under_rslora_gives_the_other_rules_alpha():
    finding = only(doctor(fresh(rank=16, alpha=80, rslora=True)), "scaling-too-large")
    assert "alpha/sqrt(r) = 80/sqrt(16) = 20" in finding.detail
    assert "under alpha/r would be alpha = 320" in finding.detail  # 20 * 16
    assert "lower alpha to about 8" in finding.advice


def test_scaling_range_edges_are_inside():
    low, high = SCALING_RANGE
    assert low < 2 < high  # the lab's default alpha = 2r
    for alpha in (4 * low, 4 * high):  # rank 4: scale = alpha / 4 exactly at the edges
        assert not any(c.startswith("scaling") for c in codes(doctor(fresh(alpha=alpha))))


def test_scaling_note_states_rule_scale_and_equivalent_alpha(healthy):
    note = scaling_note(healthy)
    assert "12 LoRA layers with r=4, alpha=8: rule alpha/r, update scale 2" in note
    assert "under alpha/sqrt(r) takes alpha=4" in note
    note = scaling_note(fresh(rank=16, alpha=8, rslora=True))
    assert "rule alpha/sqrt(r), update scale 2" in note and "under alpha/r takes alpha=32" in note
    assert "no LoRA layers" in scaling_note(lab.load_base_model("cpu"))
    with pytest.raises(TypeError, match="list"):
        scaling_note([])


# ----------------------------------------------------------------------------- targets


def test_attention_only_targets():
    finding = only(
        doctor(fresh(targets=("q_proj", "k_proj", "v_proj", "o_proj"))), "attention-only"
    )
    assert "q_proj/k_proj/v_proj/o_proj only (8 layers)" in finding.detail
    assert "67% of the blocks' linear weights" in finding.detail  # 2·128·512 vs 4·128·128
    assert "all-linear" in finding.advice
    assert "attention-only" not in codes(doctor(fresh(targets=("q_proj", "up_proj"))))


# ----------------------------------------------------------------------------- merging


def test_merged_then_unmerged(sick):
    merge_lora(sick)
    finding = only(doctor(sick), "merged")
    assert "12 of 12 LoRA layers are merged" in finding.detail
    assert "lab.unmerge_lora(model)" in finding.advice
    lab.unmerge_lora(sick)
    assert doctor(sick) == []


def test_merged_saved_as_base_then_adapter_loaded_again_is_merged_twice(sick, tmp_path):
    path = save_adapter(sick, tmp_path / "a.safetensors")
    merge_lora(sick)
    lab.remove_lora(sick)  # the merged model becomes "the base" ...
    add_lora(sick, targets="all-linear", rank=4, alpha=8)
    lab.load_adapter(sick, path)  # ... and the same adapter goes on top: ΔW counts twice
    finding = only(doctor(sick), "merged-twice")
    assert "in 12 of 12 LoRA layers" in finding.detail
    k_low, k_high = map(float, re.search(r"k = ([\d.]+) to ([\d.]+)", finding.detail).groups())
    assert 0.99 < k_low <= k_high < 1.01
    assert "still active" in finding.detail and "applies ΔW 2 times" in finding.detail
    assert "lab.load_base_model()" in finding.advice
    assert codes(doctor(sick)) == ["merged-twice"]
    merge_lora(sick)  # merged again: W = W_shipped + 2 ΔW
    assert codes(doctor(sick)) == ["merged", "merged-twice"]
    again = only(doctor(sick), "merged-twice")
    assert "k = 2.00" in again.detail and "merged again" in again.detail
    lab.unmerge_lora(sick)
    lab.remove_lora(sick, merge=False)  # the advice: drop the adapter, keep the merged base
    assert codes(doctor(sick)) == ["no-adapter"]  # ΔW once, in a frozen base


def test_a_new_adapter_on_a_merged_base_is_not_merged_twice(sick):
    merge_lora(sick)
    lab.remove_lora(sick)  # continuing from a merged model with a new adapter is fine
    add_lora(sick, targets="all-linear", rank=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(sick).values():
            layer.lora_B.normal_(0, 0.05)
    assert doctor(sick) == []


# ----------------------------------------------------------------------------- 4-bit bases


def test_4bit_base_counts_the_packed_weights():
    model = lab.load_base_model("cpu")
    lab.quantize_base(model)
    add_lora(model, targets=ALL, rank=4, alpha=8)
    naive = sum(p.numel() for p in model.parameters())
    hidden = sum(m.in_features * m.out_features for m in model.modules()
                 if isinstance(m, lab.Linear4bit))  # fmt: skip
    packed = sum(m.packed_weight.numel() for m in model.modules() if isinstance(m, lab.Linear4bit))
    assert hidden == 2 * packed
    finding = only(doctor(model), "packed-4bit-count")
    assert f"model.parameters() sums to {naive:,}" in finding.detail
    assert f"holds {naive + hidden:,} weights" in finding.detail
    assert f"{packed:,} packed uint8 bytes" in finding.detail
    assert "lab.count_parameters" in finding.advice
    assert lab.count_parameters(model).total == naive + hidden  # it counts the 4-bit weights
    assert codes(doctor(model)) == ["untrained-adapter", "packed-4bit-count"]


def test_4bit_base_without_adapters():
    model = lab.load_base_model("cpu")
    lab.quantize_base(model)
    assert codes(doctor(model)) == ["no-adapter", "packed-4bit-count"]
    assert "4-bit" in only(doctor(model), "no-adapter").advice


def test_fp32_base_has_no_4bit_finding():
    assert "packed-4bit-count" not in codes(doctor(fresh()))


# ----------------------------------------------------------------------------- adapter files


def test_file_problems_are_findings_never_exceptions(healthy, tmp_path):
    before = snapshot(healthy)
    cases = {
        tmp_path / "missing.safetensors": "does not exist",
        tmp_path: "is a folder",
    }
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not a safetensors file")
    cases[garbage] = "not a readable adapter file"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(save_adapter(healthy, tmp_path / "t.safetensors").read_bytes()[:300])
    cases[truncated] = "not a readable adapter file"
    bare = tmp_path / "bare.safetensors"  # adapter tensors, but not written by save_adapter
    save_file({k: v.contiguous() for k, v in lora_state_dict(healthy).items()}, bare)
    cases[bare] = "lora_lab_config"
    for path, why in cases.items():
        finding = only(doctor(healthy, path), "adapter-file-unreadable")
        assert why in finding.detail and str(path) in finding.detail
        assert "save_adapter" in finding.advice
    assert_unchanged(before, healthy)


def test_file_without_adapter_tensors(healthy, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, other)
    finding = only(doctor(healthy, other), "adapter-file-empty")
    assert "holds 1 tensor (weight)" in finding.detail
    assert "save_adapter" in finding.advice
    # The base model file is a safetensors file too, but holds no adapter.
    assert codes(doctor(healthy, lab.BASE_MODEL_PATH)) == ["adapter-file-empty"]


def test_file_for_other_settings_names_them(healthy, tmp_path):
    path = save_adapter(fresh(rank=8, alpha=16), tmp_path / "r8.safetensors")
    before = snapshot(healthy)
    finding = only(doctor(healthy, path), "adapter-file-mismatch")
    assert (
        "rank: file 8, model 4" in finding.detail
        and "alpha: file 16.0, model 8.0" in finding.detail
    )
    assert "rank=8" in finding.advice and "alpha=16.0" in finding.advice
    assert_unchanged(before, healthy)
    qv = save_adapter(fresh(targets=("q_proj", "v_proj")), tmp_path / "qv.safetensors")
    assert "targets: file" in only(doctor(healthy, qv), "adapter-file-mismatch").detail
    dora = save_adapter(fresh(variant="dora"), tmp_path / "dora.safetensors")
    assert (
        "variant: file 'dora', model 'lora'"
        in only(doctor(healthy, dora), "adapter-file-mismatch").detail
    )
    no_lora = only(doctor(lab.load_base_model("cpu"), path), "adapter-file-mismatch")
    assert "no LoRA layers" in no_lora.detail and "lab.add_lora" in no_lora.advice


def test_file_saved_untrained_or_diverged(sick, tmp_path):
    untrained = save_adapter(fresh(), tmp_path / "fresh.safetensors")
    finding = only(doctor(sick, untrained), "adapter-file-untrained")
    assert "all 12 lora_B tensors are exactly zero" in finding.detail
    # save_adapter refuses a diverged adapter, so this file is written the way another tool
    # (or an older lab) would have written it: the adapter file's own metadata, an inf tensor.
    with safe_open(untrained, framework="pt") as f:
        metadata = f.metadata()
    state = {k: v.contiguous() for k, v in lora_state_dict(sick).items()}
    state["blocks.0.attn.q_proj.lora_A"][0, 0] = math.inf
    diverged = tmp_path / "inf.safetensors"
    save_file(state, diverged, metadata=metadata)
    finding = only(doctor(fresh(), diverged), "adapter-file-nonfinite")
    assert "blocks.0.attn.q_proj.lora_A" in finding.detail


def test_file_that_load_adapter_refuses_for_another_reason(healthy, adapter_file, tmp_path):
    # Right settings, names and shapes, but integer tensors: the copy the doctor loads refuses it.
    with safe_open(adapter_file, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors = {k: (v * 100).to(torch.int32) for k, v in tensors.items()}
    path = tmp_path / "int.safetensors"
    save_file(tensors, path, metadata=metadata)
    before = snapshot(healthy)
    finding = only(doctor(healthy, path), "adapter-file-mismatch")
    assert "floating point" in finding.detail
    assert_unchanged(before, healthy)


def test_file_missing_a_field_is_named_never_read_with_a_default(healthy, adapter_file, tmp_path):
    # Without its alpha the file must not pass as alpha 16 (the default), nor as the model's 8.
    with safe_open(adapter_file, framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(metadata["lora_lab_config"])
    del config["alpha"]
    metadata["lora_lab_config"] = json.dumps(config)
    path = tmp_path / "noalpha.safetensors"
    save_file(tensors, path, metadata=metadata)
    finding = only(doctor(healthy, path), "adapter-file-unreadable")
    assert "has no 'alpha'" in finding.detail
    assert "16.0" not in finding.detail.replace(str(path), "")


def test_adapter_path_of_the_wrong_type_raises(healthy):
    for bad in (3, b"adapter.safetensors", "", ["a.safetensors"]):
        with pytest.raises(TypeError, match="adapter_path"):
            doctor(healthy, bad)


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
    monkeypatch.setattr(doctor_module, "GRID_DIR", tmp_path)
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
from lab.diagnosis import GRID_DIR, lr_evidence
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


# ----------------------------------------------------------------------------- flavours


def test_dora_trained_briefly_is_healthy_and_fresh_is_not(task):
    model = fresh(variant="dora")
    assert codes(doctor(model)) == ["untrained-adapter"]
    lab.train(model, task, steps=5, lr=2e-2, progress=False, measure_memory=False)
    assert doctor(model) == []
    merge_lora(model)
    assert codes(doctor(model)) == ["merged"]


def test_pissa_is_judged_against_its_own_start(task):
    model = fresh(init="pissa")
    assert all(bool(layer.lora_B.any()) for layer in lora_layers(model).values())  # B != 0
    finding = only(doctor(model), "untrained-adapter")
    assert "PiSSA's starting singular directions" in finding.detail
    lab.train(model, task, steps=5, lr=2e-2, progress=False, measure_memory=False)
    assert doctor(model) == []  # its base is W_res by design: not "merged twice"


# ----------------------------------------------------------------------------- input and output


def test_doctor_never_changes_the_model(sick, adapter_file):
    merge_lora(sick)
    sick.requires_grad_(True)
    sick.train()
    before = snapshot(sick)
    assert codes(doctor(sick, adapter_file, lr=1.0))
    assert_unchanged(before, sick)
    quantized = lab.load_base_model("cpu")
    lab.quantize_base(quantized)
    add_lora(quantized, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    before = snapshot(quantized)
    doctor(quantized, adapter_file, lr=1e-7)
    assert_unchanged(before, quantized)


def test_not_a_module_raises_naming_the_type():
    with pytest.raises(TypeError, match="dict"):
        doctor({"weight": torch.zeros(1)})


def test_finding_is_frozen_validated_and_prints_well():
    finding = Finding("merged", "call lab.unmerge_lora(model).", "12 layers are merged")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.code = "other"
    text = str(finding)
    assert text.startswith("[merged] call lab.unmerge_lora(model).") and "12 layers" in text
    for bad in ({"code": "Merged Twice"}, {"code": ""}, {"advice": " "}, {"detail": None}):
        fields = {"code": "merged", "advice": "a", "detail": "b", **bad}
        with pytest.raises(ValueError):
            Finding(**fields)


def test_report_gives_a_clean_bill_or_a_numbered_list():
    assert report([]).startswith("no findings: ")
    findings = doctor(fresh(targets=("q_proj", "v_proj")))
    text = report(findings)
    assert text.startswith(f"{len(findings)} findings:")
    for i, finding in enumerate(findings, 1):
        assert f"{i}. [{finding.code}] {finding.advice}" in text
    for bad in (findings[0], None, ["merged"]):
        with pytest.raises(TypeError, match="Finding"):
            report(bad)
