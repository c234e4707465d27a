"""lab/diagnostics/model_checks.py: each diagnosis of a model, built as the broken case it names."""

from __future__ import annotations

import math
import re

import pytest
import torch
from doctor_cases import ALL, codes, fresh, only

import lab
from lab.adapters import lora_state_dict, save_adapter
from lab.diagnosis import (
    SCALING_RANGE,
    doctor,
    scaling_note,
)
from lab.step import forward_loss
from lab.surgery import add_lora, lora_layers, merge_lora
from lab.text import format_bytes

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
    assert f"{format_bytes(base * 12)} (12 bytes each)" in finding.detail  # 4.7 MiB
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


def test_a_lora_fa_adapter_merged_into_its_base_and_loaded_again_is_merged_twice(tmp_path):
    """LoRA-FA merges LoRA's s·B·A: the doctor fits it like plain LoRA (its variant differs)."""
    model = fresh(targets=("q_proj", "v_proj"), variant="lora-fa")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05)
    path = save_adapter(model, tmp_path / "fa.safetensors")
    merge_lora(model)
    lab.remove_lora(model)
    add_lora(model, targets=("q_proj", "v_proj"), rank=4, alpha=8, variant="lora-fa")
    lab.load_adapter(model, path)
    assert "in 4 of 4 LoRA layers" in only(doctor(model), "merged-twice").detail


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
    assert "PiSSA's starting values" in finding.detail
    lab.train(model, task, steps=5, lr=2e-2, progress=False, measure_memory=False)
    assert doctor(model) == []  # its base is W_res by design: not "merged twice"
