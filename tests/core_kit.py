"""What the core's test files share: small models, their snapshots, and a script run in a process
of its own (a helper module like tests/needs.py; the lora_model fixture is in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from needs import interruptible
from torch import nn

from lab.model import ToyTransformer, get_preset
from lab.surgery import lora_layers


def tiny_model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(get_preset("tiny")).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, get_preset("tiny").vocab_size, (2, 8), generator=g)


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Give every B non-zero values, as if trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


def snapshot(model: nn.Module):
    """Everything that must survive a refused call: module tree, tensors, requires_grad flags."""
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before) -> None:
    modules, tensors, flags = snapshot(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key
    assert flags == before[2]


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def full_snapshot(model: nn.Module) -> tuple:
    """Every tensor bit for bit, every requires_grad flag and every module's type."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return tensors_of(model), flags, [(n, type(m)) for n, m in model.named_modules()]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls NaN unequal to itself)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def unchanged(model: nn.Module, before: tuple) -> bool:
    state, flags, kinds = before
    now = model.state_dict()
    now_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return (
        now.keys() == state.keys()
        and all(bitwise_equal(now[k], state[k]) for k in state)
        and now_flags == flags
        and kinds == [(n, type(m)) for n, m in model.named_modules()]
    )


def run_script(code: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`code` run by this Python in a process of its own, with `args`; its output captured."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.getcwd(), preexec_fn=interruptible)  # fmt: skip
