"""Tests for lab/lora.py: the layer's defining properties (output, ΔW, scaling, init, dropout)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lab.config import LoRAConfig
from lab.lora import LoRALinear
from lab.surgery import (
    ParamCount,
    count_parameters,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# Error budget relative to the size of the terms being summed (see `assert_close_scaled`):
# a few unit roundoffs of each dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


FAST = settings(max_examples=25, deadline=None)


@st.composite
def lora_cases(draw, dtypes=(torch.float32,)):
    """A LoRALinear with a trained-looking (non-zero) B, an input batch, and the draw's params."""
    in_f = draw(st.integers(1, 48))
    out_f = draw(st.integers(1, 48))
    rank = draw(st.integers(1, min(in_f, out_f)))
    # alpha == rank gives scaling 1, which would hide a forgotten or misplaced scaling
    alpha = draw(st.floats(0.5, 64).filter(lambda a: not math.isclose(a, rank)))
    dtype = draw(st.sampled_from(dtypes))
    rslora = draw(st.booleans())
    bias = draw(st.booleans())
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear(base, rank, alpha, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(*batch, in_f).to(dtype)
    return layer, x


def reference_update(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """scaling * x A^T B^T in float64, the adapter's contribution to the output."""
    a, b = layer.lora_A.double(), layer.lora_B.double()
    return layer.scaling * (x.double() @ a.T @ b.T)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, scale: float, tol: float):
    """max|actual - expected| <= tol * scale.

    `scale` is the size of the terms summed (|x| @ (|W| + scaling |B||A|)^T), not of the result:
    when W and ΔW nearly cancel, the result is small but the rounding errors are not, and a
    plain relative error would fail for a correct implementation.
    """
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * scale + 1e-30, f"error {err:.3g} > {tol:g} * {scale:.3g}"


def term_scale(layer: LoRALinear, x: torch.Tensor) -> float:
    """Size of the terms summed by layer(x), for `assert_close_scaled`."""
    w = layer.base.weight.double().abs()
    ab = layer.scaling * layer.lora_B.double().abs() @ layer.lora_A.double().abs()
    terms = x.double().abs() @ (w + ab).T
    if layer.base.bias is not None:
        terms = terms + layer.base.bias.double().abs()
    return terms.max().item() + 1e-12 if terms.numel() else 1.0


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_fresh_adapter_leaves_output_exactly_unchanged(case):
    layer, x = case
    with torch.no_grad():
        layer.lora_B.zero_()
        assert torch.equal(layer(x), layer.base(x))


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_merged_output_equals_unmerged_output(case):
    layer, x = case
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.merged
    assert merged.dtype == unmerged.dtype == x.dtype
    assert_close_scaled(merged, unmerged, term_scale(layer, x), TOL[x.dtype])


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_unmerge_after_merge_restores_base_weight(case):
    layer, _ = case
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    # W + ΔW - ΔW rounds twice (once per fold, each in fp32 then cast to the base dtype)
    tol = 1e-6 if w0.dtype == torch.float32 else TOL[w0.dtype] / 2
    scale = (w0.double().abs() + layer.delta_weight().double().abs()).max().item()
    assert (layer.base.weight.double() - w0.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_into_half_precision_rounds_once_from_fp32(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64, dtype=dtype), rank=8, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    w0 = layer.base.weight.detach().clone()
    delta = (layer.lora_B @ layer.lora_A).detach() * layer.scaling  # fp32
    layer.merge()
    # adding a half-precision ΔW in half precision would round twice
    assert torch.equal(layer.base.weight, (w0.float() + delta).to(dtype))


@FAST
@given(lora_cases())
def test_output_minus_base_output_is_x_times_delta_weight_transposed(case):
    layer, x = case
    with torch.no_grad():
        diff = layer(x) - layer.base(x)
        expected = x @ layer.delta_weight().T
    assert_close_scaled(diff, expected, term_scale(layer, x), 1e-5)
    assert_close_scaled(diff, reference_update(layer, x), term_scale(layer, x), 1e-5)


@FAST
@given(lora_cases())
def test_delta_weight_is_scaling_times_b_at_a(case):
    layer, _ = case
    expected_scaling = layer.alpha / (math.sqrt(layer.rank) if layer.rslora else layer.rank)
    assert layer.scaling == pytest.approx(expected_scaling, rel=1e-12)
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape
    expected = expected_scaling * (layer.lora_B.double() @ layer.lora_A.double())
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6)


def test_scaling_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    base = nn.Linear(16, 16)
    assert LoRALinear(base, rank=4, alpha=16).scaling == 4.0
    assert LoRALinear(nn.Linear(16, 16), rank=4, alpha=16, rslora=True).scaling == 8.0


def test_adapter_shapes_init_and_frozen_base():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 20), rank=3, alpha=6)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (20, 3)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) bound
    assert layer.lora_A.abs().max() > 0
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    text = repr(layer)
    for part in ("in_features=12", "out_features=20", "rank=3", "alpha=6", "scaling=2"):
        assert part in text
    assert "dropout=0" in text and "merged=False" in text


def test_dropout_does_not_touch_the_base_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: only the dropped adapter path is zero


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters_and_input_dtype(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, dtype=dtype), rank=4, alpha=8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
    assert layer.delta_weight().dtype == dtype


def test_meta_device_construction():
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    assert layer.lora_A.is_meta and layer.lora_B.is_meta
    assert count_parameters(layer) == ParamCount(trainable=4 * (64 + 32), total=64 * 32 + 32 + 384)


def test_lora_linear_rejects_non_linear_and_lora_bases():
    with pytest.raises(TypeError, match="must be an nn.Linear, got LayerNorm"):
        LoRALinear(nn.LayerNorm(8), rank=1, alpha=2)
    with pytest.raises(TypeError, match="already has LoRA"):
        LoRALinear(LoRALinear(nn.Linear(8, 8), rank=1, alpha=2), rank=1, alpha=2)


@pytest.mark.parametrize("init", ["pissa", "milora"])
def test_a_layer_whose_init_refuses_the_base_leaves_it_trainable_as_it_was(init):
    """One nonzero row: an init from W's singular directions has too few of them for rank 2."""
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = 1.0
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=f"init='{init}'.*never train"):
        LoRALinear(lin, config=LoRAConfig(rank=2, init=init))
    assert [p.requires_grad for p in lin.parameters()] == [True, True]
    assert torch.equal(lin.weight, before)
