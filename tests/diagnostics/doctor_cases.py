"""What the doctor's tests share: the properties every finding has, and models to diagnose."""

from __future__ import annotations

import importlib

import torch

import lab
from lab.diagnosis import (
    CODES,
    Finding,
)
from lab.surgery import add_lora, lora_layers

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
