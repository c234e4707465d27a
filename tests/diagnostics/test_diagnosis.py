"""lab/diagnosis.py (lab.doctor): the acceptance case, and what the doctor never does."""

from __future__ import annotations

import copy

import pytest
import torch
from doctor_cases import assert_unchanged, codes, snapshot

import lab
from lab.diagnosis import (
    doctor,
)
from lab.surgery import add_lora, merge_lora

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
