"""Tests for lab/quant/formats.py: the NF4, FP4 and int4 tables are the published ones."""

from __future__ import annotations

import math

import pytest
import torch

from lab import quant
from lab.quant import (
    FP4_LEVELS,
    INT4_LEVELS,
    NF4_LEVELS,
    SCHEMES,
    build_fp4_levels,
    build_nf4_levels,
    dequantize_blockwise,
    quantize_blockwise,
)

# bitsandbytes' published NF4 table (functional.py, get_4bit_type("nf4"); QLoRA appendix E).
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


# bitsandbytes' FP4 table in its bit order (get_4bit_type("fp4")), normalised by its max, 12.
BNB_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0]


BNB_FP4 = [v / 12 for v in [*BNB_FP4, -3.0]]


def test_nf4_levels_are_the_published_table_and_the_construction_reproduces_it():
    assert tuple(BNB_NF4) == NF4_LEVELS  # the literal constant, exactly
    built = torch.tensor(build_nf4_levels(), dtype=torch.float64)
    assert built.numel() == 16
    assert torch.allclose(built, torch.tensor(BNB_NF4, dtype=torch.float64), atol=1e-6, rtol=0)
    # a different offset gives a different table: the comparison above can fail
    other = torch.tensor(build_nf4_levels(offset=0.99), dtype=torch.float64)
    assert not torch.allclose(other, torch.tensor(BNB_NF4, dtype=torch.float64), atol=1e-3)


def test_fp4_levels_are_bitsandbytes_e2m1_code_sorted():
    assert build_fp4_levels() == FP4_LEVELS
    assert torch.allclose(
        torch.tensor(FP4_LEVELS, dtype=torch.float64),
        torch.tensor(sorted(BNB_FP4), dtype=torch.float64),
        atol=1e-7,
        rtol=0,
    )


@pytest.mark.parametrize("scheme", ["nf4", "int4"])
def test_nf4_and_int4_tables_ascend_with_one_zero_and_max_one(scheme):
    table = quant.levels(scheme)
    assert len(table) == 16 and all(isinstance(v, float) for v in table)
    assert all(a < b for a, b in zip(table, table[1:], strict=False))
    assert sum(v == 0 for v in table) == 1 and max(table) == 1.0


def test_fp4_table_ascends_and_spends_a_code_on_negative_zero():
    """FP4 is sign-magnitude: -0 and +0 are two codes of one value, 15 distinct levels."""
    assert len(FP4_LEVELS) == 16 and max(FP4_LEVELS) == 1.0 and min(FP4_LEVELS) == -1.0
    assert all(a <= b for a, b in zip(FP4_LEVELS, FP4_LEVELS[1:], strict=False))
    zeros = [i for i, v in enumerate(FP4_LEVELS) if v == 0]
    assert zeros == [7, 8] and math.copysign(1, FP4_LEVELS[7]) == -1.0
    assert len(set(FP4_LEVELS)) == 15


def test_int4_code_minus_eight_is_never_produced():
    assert INT4_LEVELS[0] == pytest.approx(-8 / 7) and INT4_LEVELS[1] == -1.0
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    codes, _ = quantize_blockwise(w, "int4", 64)
    assert int(codes.min()) == 1 and int(codes.max()) == 15  # -7/7 .. 7/7 all used


def test_every_scheme_offered_is_sixteen_sorted_levels_that_quantise_to_themselves():
    # What SCHEMES promises each name: a 4-bit table (16 sorted levels, the largest 1; FP4 has a
    # -0 and a +0) whose levels in [-1, 1] come back exactly through quantize and dequantize.
    assert set(quant.__all__) >= {"NF4_LEVELS", "SCHEMES", "Linear4bit", "quantize_base"}
    for scheme in SCHEMES:
        table = torch.tensor(quant.levels(scheme))
        assert len(table) == 16 and bool((table[1:] >= table[:-1]).all()), scheme
        assert table.max().item() == 1.0, scheme
        usable = table[table.abs() <= 1]  # int4's -8/7 is never produced (below)
        codes, absmax = quantize_blockwise(usable, scheme, 64)
        restored = dequantize_blockwise(codes, absmax, scheme, 64, usable.shape)
        assert torch.equal(restored, usable), scheme
