"""What the flavour tests share: models with a flavour's adapter, and the same weights in a lab
layer and in PEFT's for the tests that compare the two."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lab
from lab.config import LoRAConfig


class OneLinear(nn.Module):
    """A model that is one linear named `proj`: the same target name for the lab and PEFT."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


RANK, ALPHA = 4, 10.0  # every case uses alpha != rank, so a scaling bug shows


def base_model(quant: str | None) -> lab.ToyTransformer:
    torch.manual_seed(0)
    model = lab.ToyTransformer(lab.get_preset("tiny"))
    if quant == "int4":
        lab.quantize_base(model, scheme="int4", block_size=32, double_quant=False)
    elif quant:
        lab.quantize_base(model, scheme=quant)
    return model.eval()


def make(fields: dict, quant: str | None, targets=("q_proj", "v_proj", "up_proj")):
    model = base_model(quant)
    config = LoRAConfig(rank=RANK, alpha=ALPHA, targets=targets, **fields)
    torch.manual_seed(2)
    lab.add_lora(model, config)
    return model.eval(), config


class Wrap(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.proj = copy.deepcopy(base)

    def forward(self, x):
        return self.proj(x)


def _peft_pair(fields: dict, peft_fields: dict, bias: bool = True, seed: int = 5):
    peft = pytest.importorskip("peft", reason="PEFT is benchmark-only: benchmarks/requirements.txt")
    torch.manual_seed(seed)
    base = nn.Linear(48, 40, bias=bias)
    ours = Wrap(base)
    lab.add_lora(ours, targets=("proj",), rank=4, alpha=10.0, **fields)
    config = peft.LoraConfig(
        r=4, lora_alpha=10, target_modules=["proj"], lora_dropout=0.0, **peft_fields
    )
    theirs = peft.get_peft_model(Wrap(base), config)
    return ours, theirs, theirs.base_model.model.proj


def _same_adapters(ours, lin, g):
    a, b = torch.randn(4, 48, generator=g) * 0.1, torch.randn(40, 4, generator=g) * 0.1
    with torch.no_grad():
        ours.proj.lora_A.copy_(a)
        ours.proj.lora_B.copy_(b)
        lin.lora_A["default"].weight.copy_(a)
        lin.lora_B["default"].weight.copy_(b)
