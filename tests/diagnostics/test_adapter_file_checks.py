"""lab/diagnostics/adapter_file_checks.py: an adapter file's problems are findings, never
exceptions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from doctor_cases import assert_unchanged, codes, fresh, only, snapshot
from safetensors import safe_open
from safetensors.torch import save_file

import lab
from lab.adapters import lora_state_dict, save_adapter
from lab.diagnosis import (
    doctor,
)

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
