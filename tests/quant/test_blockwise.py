"""Tests for lab/quant/blockwise.py: blockwise 4-bit codes, packing and double quantisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab.quant import (
    FP4_LEVELS,
    INT4_LEVELS,
    NF4_LEVELS,
    SCHEMES,
    Linear4bit,
    dequantize_blockwise,
    dequantize_scales,
    pack_4bit,
    quantize_blockwise,
    quantize_scales,
    unpack_4bit,
)

TABLES = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("shape", "block_size"), [((10, 100), 64), ((7, 9), 16), ((33,), 2)])
def test_dequantize_gives_the_nearest_level_times_absmax(scheme, shape, block_size):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    codes, absmax = quantize_blockwise(w, scheme, block_size)
    n_blocks = math.ceil(w.numel() / block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (n_blocks * block_size,)
    assert absmax.dtype == torch.float32 and absmax.shape == (n_blocks,)
    flat = F.pad(w.reshape(-1), (0, n_blocks * block_size - w.numel())).view(n_blocks, -1)
    assert torch.equal(absmax, flat.abs().amax(dim=1))
    deq = dequantize_blockwise(codes, absmax, scheme, block_size, w.shape, torch.float32)
    assert deq.shape == w.shape
    table = torch.tensor(TABLES[scheme], dtype=torch.float64)
    scaled = (flat.double() / absmax.double()[:, None]).reshape(-1)[: w.numel()]
    scale = absmax.double().repeat_interleave(block_size)[: w.numel()]
    err = (deq.double().reshape(-1) - w.double().reshape(-1)).abs()
    best = (scaled[:, None] - table[None, :]).abs().min(dim=1).values  # brute-force nearest
    assert (err <= best * scale + 1e-6).all()
    # and the textbook bound: within half the widest gap of the table (inside [-1, 1])
    inner = table[table >= -1]
    half_gap = (inner[1:] - inner[:-1]).max() / 2
    assert (err <= half_gap * scale + 1e-6).all()
    # the padding of the tail block is coded as the level 0
    pad = codes[w.numel() :].long()
    assert (table[pad] == 0).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_values_on_the_grid_come_back_exactly(scheme):
    table = torch.tensor(TABLES[scheme], dtype=torch.float32)
    usable = torch.nonzero(table >= -1).flatten()
    g = torch.Generator().manual_seed(2)
    picks = usable[torch.randint(len(usable), (5, 64), generator=g)]
    picks[:, 0] = 15  # level 1.0 in every block, so each block's absmax is its scale
    scales = torch.tensor([0.5, 2.0, 0.02, 3.0, 1.0])
    w = table[picks] * scales[:, None]
    codes, absmax = quantize_blockwise(w, scheme, 64)
    assert torch.equal(absmax, scales)
    deq = dequantize_blockwise(codes, absmax, scheme, 64, w.shape)
    assert torch.equal(deq, w)


def test_an_all_zero_block_stays_zero():
    w = torch.zeros(128)
    w[64:] = torch.linspace(-1, 1, 64)
    codes, absmax = quantize_blockwise(w, "nf4", 64)
    assert absmax[0] == 0
    assert torch.equal(dequantize_blockwise(codes, absmax, "nf4", 64, w.shape)[:64], w[:64])


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_pack_unpack_round_trip_for_any_length(n):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n)).to(torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 2),)
    assert torch.equal(unpack_4bit(packed, n), codes)
    assert int(packed[0]) >> 4 == int(codes[0])  # the first code sits in the high nibble


def test_pack_refuses_codes_above_fifteen_and_non_uint8():
    codes = torch.tensor([1, 16], dtype=torch.uint8)
    before = codes.clone()
    with pytest.raises(ValueError, match=r"0\.\.15.*16"):
        pack_4bit(codes)
    assert torch.equal(codes, before)
    with pytest.raises(TypeError, match="uint8"):
        pack_4bit(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="length"):
        unpack_4bit(torch.zeros(2, dtype=torch.uint8), 5)


def test_double_quantised_scales_are_within_half_an_int8_step():
    g = torch.Generator().manual_seed(3)
    absmax = torch.rand(1000, generator=g) * 0.1 + 0.01  # 4 groups of 256, the last partial
    codes, scale, offset = quantize_scales(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,)
    assert scale.shape == (4,) and offset.shape == () and scale.dtype == offset.dtype
    back = dequantize_scales(codes, scale, offset)
    assert torch.allclose(offset, absmax.mean())
    step = (absmax - absmax.mean()).abs().max() / 127
    assert (back - absmax).abs().max() <= step / 2 + 1e-7
    assert (back - absmax).abs().max() > 0  # it is a real 8-bit rounding


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"scheme": "nf3"}, ValueError, ["nf3", "nf4", "fp4", "int4"]),
        ({"block_size": 63}, ValueError, ["63", "even"]),
        ({"block_size": 8192}, ValueError, ["8192", "4096"]),
        ({"block_size": True}, TypeError, ["block_size", "True"]),
    ],
)
def test_quantize_blockwise_refuses_bad_settings(kwargs, exc, words):
    w = torch.randn(64)
    before = w.clone()
    with pytest.raises(exc) as info:
        quantize_blockwise(w, **kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert torch.equal(w, before)


def test_quantize_blockwise_refuses_non_finite_and_integer_weights():
    w = torch.randn(64)
    w[3] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_blockwise(w)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_blockwise(torch.arange(64))


def test_without_double_quant_a_weight_takes_4_5_bits():
    layer = Linear4bit.from_linear(nn.Linear(128, 512), double_quant=False)
    assert layer.bits_per_parameter() == 4 + 32 / 64
    assert layer.storage_bytes() == 128 * 512 // 2 + 128 * 512 // 64 * 4


@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_weight_at_fp32s_limit_among_small_ones_dequantises_finite(scheme):
    w = torch.randn(64, 64)
    w[5, 7] = torch.finfo(torch.float32).max
    layer = Linear4bit.from_linear(_linear_with(w), scheme, 64, True)
    back = layer.dequantize()
    assert torch.isfinite(back).all() and back[5, 7] == pytest.approx(w[5, 7].item(), rel=1e-3)


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda c, a: dequantize_blockwise(c, a, dtype=torch.int64), TypeError, "floating-point"),
        (lambda c, a: dequantize_blockwise(c, a.tolist()), TypeError, "absmax"),
        (lambda c, a: dequantize_blockwise(c, a * float("nan")), ValueError, "finite"),
        (lambda c, a: dequantize_blockwise(c, -a - 1), ValueError, ">= 0"),
        (lambda c, a: dequantize_blockwise(c + 16, a), ValueError, "0..15"),
        (lambda c, a: dequantize_blockwise(c, a, shape=(-1, 8)), ValueError, "shape="),
        (lambda c, a: dequantize_blockwise(c, a, shape=(99, 99)), ValueError, "needs 9801"),
    ],
)
def test_dequantize_blockwise_refuses_bad_input(call, exc, words):
    codes, absmax = quantize_blockwise(torch.randn(128))
    with pytest.raises(exc, match=words):
        call(codes, absmax)


def test_quantize_scales_refuses_negative_block_scales():
    with pytest.raises(ValueError, match="absmax holds negative values"):
        quantize_scales(torch.tensor([1.0, -1.0]))
