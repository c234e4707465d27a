"""Blockwise 4-bit quantisation: codes and a scale per block, two codes a byte, 8-bit scales."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import (
    _FP32_MAX,
    DQ_BLOCK_SIZE,
    _check_block_size,
    _check_codes,
    _check_float_dtype,
    _check_scheme,
    _check_weight,
    _levels_tensor,
)

__all__ = [
    "dequantize_blockwise",
    "dequantize_scales",
    "pack_4bit",
    "quantize_blockwise",
    "quantize_scales",
    "unpack_4bit",
]


# ---------------------------------------------------------------------------------------------
# Blockwise 4-bit quantisation and packing
# ---------------------------------------------------------------------------------------------


def _nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every value of `scaled` (values in [-1, 1]).

    The decision boundaries are the midpoints between neighbouring levels. A value exactly on a
    midpoint goes to the LOWER level (bucketize's left rule); for FP4's -0/+0 pair this sends an
    exact 0 to the -0 code, which dequantises to 0 all the same.
    """
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


def quantize_blockwise(
    w: torch.Tensor, scheme: str = "nf4", block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes of the flattened `w`, blockwise: (codes uint8 (n_blocks * block_size,),
    absmax fp32 (n_blocks,)).

    The tail block is padded with zeros. Each value is divided by its block's absmax and
    rounded to the nearest level of `scheme` (ties to the lower level). An all-zero block keeps
    absmax 0 and codes of the level 0.
    """
    _check_weight(w)
    _check_scheme(scheme)
    _check_block_size(block_size)
    flat = w.detach().reshape(-1).to(torch.float32)
    n_blocks = math.ceil(flat.numel() / block_size)
    flat = F.pad(flat, (0, n_blocks * block_size - flat.numel()))
    blocks = flat.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = _nearest_code(scaled, _levels_tensor(scheme, flat.device))
    return codes.reshape(-1).to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    scheme: str = "nf4",
    block_size: int = 64,
    shape: tuple[int, ...] | torch.Size | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tensor that `quantize_blockwise` encoded: level[code] * absmax of its block.

    codes: uint8 (n_blocks * block_size,) unpacked; absmax: (n_blocks,). The padding is cut off
    to `shape` (default: the flat padded length). Computed in fp32, returned in `dtype`.
    """
    _check_codes(codes)
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_float_dtype(dtype)
    if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point():
        got = f"dtype {absmax.dtype}" if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise TypeError(f"absmax must be a floating-point tensor of block scales, got {got}")
    if codes.numel() % block_size or absmax.shape != (codes.numel() // block_size,):
        raise ValueError(
            f"{codes.numel()} codes with block_size={block_size} need absmax of shape "
            f"({codes.numel() // block_size},), got {tuple(absmax.shape)}"
        )
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must be in 0..15, got a maximum of {int(codes.max())}")
    if not absmax.is_meta and not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
        raise ValueError("absmax must hold finite scales >= 0 (each block's largest |w|)")
    if shape is not None:
        if not isinstance(shape, tuple | list | torch.Size) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"shape={shape!r} must be a tuple of sizes >= 0, e.g. (out, in)")
        if math.prod(shape) > codes.numel():
            raise ValueError(
                f"shape {tuple(shape)} needs {math.prod(shape)} values, the codes hold "
                f"{codes.numel()}"
            )
    return _dequantize(codes, absmax, scheme, block_size, shape, dtype)


def _dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    scheme: str,
    block_size: int,
    shape: tuple[int, ...] | torch.Size | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """dequantize_blockwise without its checks: the layer's forward calls it on its own codes."""
    table = _levels_tensor(scheme, codes.device)
    values = table[codes.long()].view(-1, block_size) * absmax.to(torch.float32)[:, None]
    values = values.reshape(-1)
    if shape is None:
        return values.to(dtype)
    return values[: math.prod(shape)].view(*shape).to(dtype)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: the first code in the high nibble. Odd lengths get a 0 code.

    codes: uint8 (n,) with values 0..15 -> uint8 (ceil(n / 2),).
    """
    _check_codes(codes)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must be in 0..15, got a maximum of {int(codes.max())}")
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """The codes `pack_4bit` packed: uint8 (2 * n,), or the first `length` of them."""
    _check_codes(packed, "packed")
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    if length is None:
        return codes
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= len(codes):
        raise ValueError(f"length={length!r} must be an int in [0, {len(codes)}]")
    return codes[:length]


# ---------------------------------------------------------------------------------------------
# Double quantisation of the block scales
# ---------------------------------------------------------------------------------------------


def quantize_scales(
    absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes of the per-block absmax: (codes uint8 (n,), scale fp32 (ceil(n / 256),),
    offset fp32 ()).

    As in QLoRA the scales (all positive) are first centred on their mean, so the symmetric
    8-bit range is not half wasted. Then, per group of 256, linear absmax int8:
    code = round(c / max|c| * 127) + 128. We use this linear code rather than bitsandbytes'
    8-bit dynamic map: it is one line to read, and its error (at most half a step,
    max|c| / 254, on a scale) is far below the 4-bit rounding it scales.
    """
    _check_weight(absmax, "absmax")
    if bool((absmax < 0).any()):
        raise ValueError("absmax holds negative values: each block scale is a largest |w|, >= 0")
    flat = absmax.detach().reshape(-1).to(torch.float32)
    offset = flat.mean()
    if not torch.isfinite(offset):
        # Scales near fp32's limit (weights of 2e38, say): their sum overflows fp32, the mean
        # is inf and every dequantised weight would be nan. The mean itself fits fp32, so it is
        # summed in float64. (Ordinary weights keep the fp32 mean, and their codes as they were.)
        offset = flat.to(torch.float64).mean().to(torch.float32)
    centred = flat - offset  # each in [-max, max]: no overflow
    n_groups = math.ceil(flat.numel() / block_size)
    groups = F.pad(centred, (0, n_groups * block_size - flat.numel())).view(n_groups, block_size)
    scale = groups.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / safe[:, None] * 127).clamp(-127, 127)
    codes = (q + 128).to(torch.uint8).reshape(-1)[: flat.numel()].clone()  # own storage only
    return codes, scale, offset


def dequantize_scales(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    block_size: int = DQ_BLOCK_SIZE,
) -> torch.Tensor:
    """The fp32 absmax that `quantize_scales` encoded, (n,); clamped to [0, fp32's largest].

    The upper clamp matters for scales near fp32's limit: offset + c can pass it by a rounding
    step, and an absmax of inf would make its whole block nan.
    """
    _check_codes(codes)
    n = codes.numel()
    n_groups = math.ceil(n / block_size)
    for name, value, shape in (("scale", scale, (n_groups,)), ("offset", offset, ())):
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{n} scale codes need {name} of shape {shape} (one per {block_size}), got {got}"
            )
    q = F.pad(codes.to(torch.float32) - 128, (0, n_groups * block_size - n))
    values = q.view(n_groups, block_size) / 127 * scale[:, None] + offset
    return values.reshape(-1)[:n].clamp(0, _FP32_MAX)


def _encode(
    w: torch.Tensor, scheme: str, block_size: int, double_quant: bool
) -> dict[str, torch.Tensor]:
    """The buffers of a packed 4-bit weight (see Linear4bit for their names)."""
    codes, absmax = quantize_blockwise(w, scheme, block_size)
    out = {"packed_weight": pack_4bit(codes)}
    if double_quant:
        out["absmax_codes"], out["absmax_scale"], out["absmax_offset"] = quantize_scales(absmax)
    else:
        out["absmax"] = absmax
    return out


def _decode(
    buffers: dict[str, torch.Tensor],
    scheme: str,
    block_size: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense weight that `_encode` packed, in `dtype`."""
    if "absmax_codes" in buffers:
        absmax = dequantize_scales(
            buffers["absmax_codes"], buffers["absmax_scale"], buffers["absmax_offset"]
        )
    else:
        absmax = buffers["absmax"]
    codes = unpack_4bit(buffers["packed_weight"])
    return _dequantize(codes, absmax, scheme, block_size, shape, dtype)
