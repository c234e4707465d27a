"""Tests for lab/checks.py: what the layer and add_lora check before changing anything."""

from __future__ import annotations

import pytest
import torch
from core_kit import (
    assert_unchanged,
    full_snapshot,
    snapshot,
    unchanged,
)
from torch import nn

from lab.lora import LoRALinear
from lab.model import ToyTransformer, get_preset
from lab.surgery import (
    add_lora,
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
