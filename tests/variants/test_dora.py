"""DoRA (lab/variants/dora.py): against PEFT on the same weights, and its rows without a direction.

The shared properties run over DoRA in tests/variants/test_variants.py's table."""

from __future__ import annotations

import pytest
import torch
from flavour_cases import _peft_pair, _same_adapters
from torch import nn

import lab


@pytest.mark.parametrize("bias", [True, False])
def test_dora_matches_peft_outputs_gradients_and_merged_weight(bias):
    ours, theirs, lin = _peft_pair({"variant": "dora"}, {"use_dora": True}, bias)
    g = torch.Generator().manual_seed(0)
    _same_adapters(ours, lin, g)
    with torch.no_grad():  # a trained magnitude, not the initial ||W||
        m = ours.proj.magnitude * (1 + 0.1 * torch.randn(40, generator=g))
        ours.proj.magnitude.copy_(m)
        lin.lora_magnitude_vector["default"].weight.copy_(m)
    x = torch.randn(6, 48, generator=g)
    o, p = ours(x), theirs(x)
    torch.testing.assert_close(o, p, rtol=1e-5, atol=1e-6)
    o.square().sum().backward()
    p.square().sum().backward()
    pairs = [
        (ours.proj.lora_A, lin.lora_A["default"].weight),
        (ours.proj.lora_B, lin.lora_B["default"].weight),
        (ours.proj.magnitude, lin.lora_magnitude_vector["default"].weight),
    ]
    for mine, peft_param in pairs:
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-4, atol=1e-6)
    merged = theirs.merge_and_unload().proj.weight
    torch.testing.assert_close(ours.proj.merged_weight(), merged, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- DoRA's zero rows
# A row whose W + ΔW is all zero has no direction: m / ||W + ΔW|| would be 0/0. PEFT 0.21
# outputs NaN there (and NaN gradients); the lab uses the scale 1, so the row computes W + ΔW.


def _zero_row_base(quant: str | None, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=bias)
    with torch.no_grad():
        lin.weight[0] = 0
        lin.weight[5] = 0
    if quant:
        from lab.quant import Linear4bit

        return Linear4bit.from_linear(lin, scheme=quant)
    return lin


@pytest.mark.parametrize("quant", [None, "nf4", "int4"])
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_dora_on_a_zero_row_computes_w_with_finite_gradients(quant, bias):
    base = _zero_row_base(quant, bias)
    layer = lab.DoRALinear(base, 2, 4.0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert torch.equal(out, base(x)), (out - base(x)).abs().max()
    out.square().sum().backward()
    for name, p in layer.adapter_parameters().items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # One step later the zero row has a direction: still finite, and merge agrees with forward.
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p -= 0.1 * p.grad
        expected = layer(x)
    assert torch.isfinite(expected).all()
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, -1e-38])
def test_dora_unmerge_with_a_vanishing_magnitude_restores_w_bit_for_bit(magnitude):
    torch.manual_seed(0)
    layer = lab.DoRALinear(nn.Linear(8, 4), 2, 4.0)
    w = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude[1] = magnitude
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = layer(x)
    layer.merge()
    assert torch.isfinite(layer.base.weight).all()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w)


def test_dora_merge_on_a_4bit_base_with_a_zero_magnitude_gives_the_4bit_base_back():
    base = _zero_row_base("nf4", bias=True)
    layer = lab.DoRALinear(base, 2, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude[3] = 0
    layer.merge()
    assert torch.isfinite(layer.base.weight).all()
    layer.unmerge()
    assert layer.base is base
    layer.merge(requantize=True)
    assert torch.isfinite(layer.base.dequantize()).all()
    layer.unmerge()
    assert layer.base is base


def test_dora_merge_refuses_a_diverged_magnitude():
    torch.manual_seed(0)
    layer = lab.DoRALinear(nn.Linear(8, 4), 2, 4.0)
    w = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.magnitude[2] = float("nan")
    with pytest.raises(ValueError, match="magnitude has 1 NaN"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w)
