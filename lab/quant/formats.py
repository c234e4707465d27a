"""The three 4-bit formats (NF4, FP4, int4) as 16-level tables, and the checks on their settings."""

from __future__ import annotations

import numbers

import torch

__all__ = [
    "DQ_BLOCK_SIZE",
    "FP4_LEVELS",
    "INT4_LEVELS",
    "MAX_BLOCK_SIZE",
    "NF4_LEVELS",
    "SCHEMES",
    "build_fp4_levels",
    "build_nf4_levels",
    "levels",
]


SCHEMES = ("nf4", "fp4", "int4")
MAX_BLOCK_SIZE = 4096  # bitsandbytes' largest block; larger blocks let one outlier flatten more
DQ_BLOCK_SIZE = 256  # double quantisation: one fp32 scale per 256 block scales (QLoRA)
_FP32_MAX = torch.finfo(torch.float32).max  # the largest block scale fp32 can hold (3.4e38)

# ---------------------------------------------------------------------------------------------
# The three 16-level code tables, ascending. A 4-bit code is an index into its table.
# ---------------------------------------------------------------------------------------------

# NF4 exactly as bitsandbytes (and the QLoRA paper) publish it; build_nf4_levels() rebuilds it.
NF4_LEVELS: tuple[float, ...] = (
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
)

# The quantile range NF4 spans: halfway between the 1 - 1/(2*15) and 1 - 1/(2*16) quantiles of
# N(0, 1). The extreme quantile of a 16-level code would be infinite at 1.0; the paper picks
# this offset so the outermost level sits where 15 and 16 equal-area bins would put it.
_NF4_OFFSET = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2  # 0.9677083...


def build_nf4_levels(offset: float = _NF4_OFFSET) -> tuple[float, ...]:
    """NormalFloat-4 from its construction: quantiles of N(0, 1), normalised to [-1, 1].

    An exact zero is wanted (padding and zero weights stay zero), and a symmetric 4-bit code
    cannot have one and 16 levels. So NF4 is asymmetric: 8 positive quantiles (9 equally spaced
    probabilities from `offset` down to 0.5, the last, 0.5 itself, dropped: it is the zero),
    7 negative ones (8 from `offset` to 0.5, 0.5 dropped), and 0. Dividing by the largest
    makes the range exactly [-1, 1].
    """
    ppf = torch.special.ndtri  # the inverse CDF of N(0, 1)
    positive = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return tuple((values / values.max()).tolist())


def build_fp4_levels() -> tuple[float, ...]:
    """bitsandbytes' FP4 code: 1 sign, 2 exponent, 1 mantissa bit, normalised to max 1.

    Exponent e = 1..3 with bias 3 gives magnitudes 2**(4 - e) * (1 or 1.5): 8, 12, 4, 6, 2, 3;
    e = 0 gives 0 (mantissa 0) and bitsandbytes' subnormal 0.0625 (mantissa 1). Divided by 12:
    0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1. The sign bit doubles them, and zero twice: as a
    sign-magnitude format FP4 spends one of its 16 codes on -0, so only 15 values are distinct.
    """
    magnitudes = []
    for exponent in range(4):
        for mantissa in (0, 1):
            if exponent == 0:
                magnitudes.append(0.0625 if mantissa else 0.0)
            else:
                magnitudes.append(2.0 ** (3 + 1 - exponent) * (1.5 if mantissa else 1.0))
    top = max(magnitudes)
    positive = sorted(m / top for m in magnitudes)
    return tuple([-m for m in reversed(positive)] + positive)  # -1 ... -0.0, 0.0 ... 1


FP4_LEVELS: tuple[float, ...] = build_fp4_levels()

# Absmax int4: round(w / absmax * 7), so the codes -7..7 cover [-1, 1] symmetrically. A 4-bit
# two's-complement integer also has -8: we keep it as the table's first level, -8/7, so the table
# has 16 entries like the others, but nearest rounding never picks it (|w / absmax| <= 1 is
# always at least as close to -7/7). Int4 therefore uses 15 of its 16 codes.
INT4_LEVELS: tuple[float, ...] = tuple(k / 7 for k in range(-8, 8))

_TABLES = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}


def levels(scheme: str) -> tuple[float, ...]:
    """The 16 ascending levels of `scheme` ("nf4", "fp4" or "int4")."""
    _check_scheme(scheme)
    return _TABLES[scheme]


_LEVEL_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _levels_tensor(scheme: str, device: torch.device) -> torch.Tensor:
    """The scheme's levels as an fp32 tensor on `device` (made once per device)."""
    key = (scheme, torch.device(device))
    if key not in _LEVEL_CACHE:
        _LEVEL_CACHE[key] = torch.tensor(_TABLES[scheme], dtype=torch.float32, device=device)
    return _LEVEL_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Validation. Everything is checked before anything is changed.
# ---------------------------------------------------------------------------------------------


def _check_scheme(scheme: object) -> None:
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not a 4-bit scheme; valid schemes: {SCHEMES}")


def _check_block_size(block_size: object) -> None:
    if not isinstance(block_size, numbers.Integral) or isinstance(block_size, bool):
        raise TypeError(
            f"block_size must be an even int in [2, {MAX_BLOCK_SIZE}] (e.g. 64), "
            f"got {block_size!r} ({type(block_size).__name__})"
        )
    if not 2 <= block_size <= MAX_BLOCK_SIZE or block_size % 2:
        raise ValueError(
            f"block_size={block_size} must be an even int in [2, {MAX_BLOCK_SIZE}] (e.g. 64): "
            "two 4-bit codes share a byte, so a block holds an even number of them"
        )


def _check_double_quant(double_quant: object) -> None:
    if not isinstance(double_quant, bool):
        raise TypeError(
            f"double_quant must be True or False, got {double_quant!r} "
            f"({type(double_quant).__name__})"
        )


def _check_weight(w: object, what: str = "w") -> None:
    """TypeError/ValueError unless w is a non-empty, finite, floating tensor with data."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {w.dtype}")
    if w.is_meta:
        raise ValueError(f"{what} is on the meta device (shapes only, no values to quantise)")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(w.shape)}): nothing to quantise")
    if not torch.isfinite(w).all():
        raise ValueError(f"{what} holds inf or nan values; only finite weights can be quantised")
    # Blocks are quantised in fp32 and their scales stored in fp32: a float64 weight beyond
    # fp32's range would become inf there, and every code of its block nan.
    if w.dtype == torch.float64 and float(w.detach().abs().max()) > _FP32_MAX:
        raise ValueError(
            f"{what} holds values up to {float(w.detach().abs().max()):.3g}, beyond float32's "
            f"range ({_FP32_MAX:.3g}): the 4-bit block scales are float32 numbers"
        )


def _check_float_dtype(dtype: object, what: str = "dtype") -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{what} must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...), "
            f"got {dtype!r}"
        )


def _check_codes(codes: object, what: str = "codes") -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.ndim != 1:
        got = (
            f"a {tuple(codes.shape)} {codes.dtype} tensor"
            if isinstance(codes, torch.Tensor)
            else type(codes).__name__
        )
        raise TypeError(f"{what} must be a 1-D uint8 tensor, got {got}")
