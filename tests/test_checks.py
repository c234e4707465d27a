"""Tests for lab/checks.py: what the layer and add_lora check before changing anything."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lab.lora import LoRALinear
from lab.model import ToyTransformer, get_preset
from lab.surgery import (
    add_lora,
)


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


# The rank must fit the layer: rank <= min(in_features, out_features), named per layer.
RANK_TOO_LARGE = [
    (  # up_proj: 16 -> 8; q_proj fits, so the message names the layer that does not
        lambda: ToyTransformer(get_preset("tiny", d_model=16, d_ff=8)),
        lambda m: add_lora(m, targets=("q_proj", "up_proj"), rank=9, alpha=4),
        r"rank=9 is too large for blocks\.0\.mlp\.up_proj",
    ),
    (
        lambda: nn.Sequential(nn.Linear(8, 3)),
        lambda m: add_lora(m, "0", rank=4),
        r"rank must be <= min\(in, out\) = 3",
    ),
    (
        lambda: ToyTransformer(get_preset("tiny")),
        lambda m: add_lora(m, rank=33, alpha=4),
        r"rank=33 is too large .*min\(in, out\) = 32",
    ),
    (
        lambda: nn.Linear(32, 40),
        lambda m: LoRALinear(m, rank=33, alpha=4),
        r"rank=33 is too large for this layer .*min\(in, out\) = 32",
    ),
]


@pytest.mark.parametrize(("make", "call", "match"), RANK_TOO_LARGE)
def test_a_rank_above_min_in_out_is_refused_and_changes_nothing(make, call, match):
    torch.manual_seed(0)
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    assert_unchanged(model, before)


def test_pissa_on_a_nan_weight_changes_nothing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"2\.weight has 1 NaN"):
        add_lora(m, targets=("0", "2"), rank=2, init="pissa")
    assert type(m[0]) is nn.Linear and unchanged(m, before)


@pytest.mark.parametrize("init", ["default", "pissa"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize(
    ("where", "value", "words"),
    [
        ("weight", float("nan"), r"blocks\.0\.attn\.v_proj\.weight has 1 NaN"),
        ("weight", float("inf"), r"blocks\.0\.attn\.v_proj\.weight has 1 inf"),
        ("weight", -float("inf"), r"blocks\.0\.attn\.v_proj\.weight has 1 inf"),
    ],
)
def test_non_finite_target_weight_is_named_and_refused(init, variant, where, value, words):
    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    with torch.no_grad():
        getattr(model.blocks[0].attn.v_proj, where)[2, 3] = value
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=words):
        add_lora(model, targets=("q_proj", "v_proj"), rank=2, init=init, variant=variant)
    assert unchanged(model, before)


def test_non_finite_bias_is_named():
    m = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        m[0].bias[:2] = float("nan")
        m[0].bias[3] = float("inf")
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"0\.bias has 2 NaN and 1 inf"):
        add_lora(m, targets="0", rank=2)
    assert unchanged(m, before)


def test_non_finite_4bit_base_is_named():
    from lab.quant import quantize_base

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    quantize_base(model)
    layer = model.blocks[0].attn.q_proj
    name = next(n for n, b in layer.named_buffers() if b.is_floating_point())
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = float("nan")  # a block scale
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight has \d+ NaN"):
        add_lora(model, targets="q_proj", rank=2)
    assert unchanged(model, before)
