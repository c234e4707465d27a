"""QLoRA's frozen 4-bit base (Dettmers et al. 2023), written from scratch.

A frozen weight W (out, in) is flattened and cut into blocks of `block_size` numbers (64 in the
paper). Each block keeps one scale, its absolute maximum, and every number becomes a 4-bit code:
the index of the nearest of 16 levels in [-1, 1] after dividing by the block's absmax.

    W -> blocks (n_blocks, 64) -> w / absmax -> nearest level -> code 0..15 -> two codes a byte

Three 16-level tables (the "data types" of the paper's section 3):
  - int4: evenly spaced levels k/7 (absmax int4),
  - fp4:  a tiny float with 2 exponent bits and 1 mantissa bit (bitsandbytes' e2m1),
  - nf4:  NormalFloat, levels at quantiles of N(0, 1), so that normally distributed weights use
          every level equally often (section 3, "4-bit NormalFloat Quantization").

Double quantisation (section 3, "Double Quantization") stores the fp32 absmax of every block in
8 bits too, one fp32 scale per 256 of them: 32/64 = 0.5 bits per weight become
8/64 + 32/(64*256) = 0.127, so a weight costs 4.127 bits instead of 4.5.

`Linear4bit` holds the packed codes as buffers and dequantises on the fly in forward and again in
backward, so no dense copy of W stays alive between the two. `quantize_base` swaps a model's
frozen linears for them; LoRA then trains on top.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DQ_BLOCK_SIZE",
    "FP4_LEVELS",
    "INT4_LEVELS",
    "MAX_BLOCK_SIZE",
    "NF4_LEVELS",
    "SCHEMES",
    "Linear4bit",
    "build_fp4_levels",
    "build_nf4_levels",
    "dequantize_base",
    "dequantize_blockwise",
    "dequantize_scales",
    "levels",
    "pack_4bit",
    "quantization_error",
    "quantize_base",
    "quantize_blockwise",
    "quantize_scales",
    "unpack_4bit",
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


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

_FP32_BUFFERS = ("absmax", "absmax_scale", "absmax_offset")  # stay fp32 whatever .to(dtype) says


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantised in forward and AGAIN in backward.

    Autograd would otherwise keep the dense W (out * in floats) from forward until backward,
    which is most of the memory a 4-bit base is meant to save. Only the packed uint8 codes are
    saved (so an in-place change to them between forward and backward is caught), W gets no
    gradient (it is frozen) and neither does the frozen bias.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit, dtype: torch.dtype) -> torch.Tensor:
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        ctx.save_for_backward(layer.packed_weight)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x.to(dtype), layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ctx.saved_tensors  # noqa: B018  raises if the packed codes changed since forward
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantize(ctx.dtype)  # (out, in), freed when backward returns
            grad_x = (grad_out.to(ctx.dtype) @ weight).to(ctx.x_dtype)
        return grad_x, None, None


def dense_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen nn.Linear with `weight` (out, in) and `base`'s bias: a full-precision stand-in."""
    dense = nn.Linear(
        base.in_features, base.out_features, bias=base.bias is not None,
        device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        dense.weight.copy_(weight)
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    return dense.requires_grad_(False)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored as packed 4-bit codes (QLoRA's base).

    Buffers (in state_dict, moved by .to(device)):
      packed_weight  uint8 (n_blocks * block_size / 2,)  two codes a byte, row-major W
      absmax         fp32 (n_blocks,)                     without double quantisation, or
      absmax_codes   uint8 (n_blocks,)                    with it: 8-bit block scales,
      absmax_scale   fp32 (ceil(n_blocks / 256),)         one fp32 scale per 256 of them,
      absmax_offset  fp32 ()                              and the mean they were centred on.
    The state dict also holds `_extra_state`, the format (scheme, block size, double quant,
    shape): load_state_dict refuses codes of another format instead of decoding them wrongly.
    There is deliberately no `.weight`: code that would read or write a dense weight fails
    loudly instead of silently working on a copy. Use `dequantize()` for a dense W.

    `.to(dtype)` sets the compute dtype (and the bias's); the 4-bit storage stays uint8 codes
    and fp32 scales, so storage_bytes() does not change.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        _check_scheme(scheme)
        _check_block_size(block_size)
        _check_double_quant(double_quant)
        if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise TypeError(f"compute_dtype must be a float torch.dtype, got {compute_dtype!r}")
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.block_size, self.double_quant = scheme, int(block_size), double_quant
        self.compute_dtype = compute_dtype
        n_blocks = math.ceil(in_features * out_features / block_size)
        u8, f32 = (
            {"dtype": torch.uint8, "device": device},
            {"dtype": torch.float32, "device": device},
        )
        self.register_buffer("packed_weight", torch.zeros(n_blocks * block_size // 2, **u8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, **u8))
            groups = math.ceil(n_blocks / DQ_BLOCK_SIZE)
            self.register_buffer("absmax_scale", torch.zeros(groups, **f32))
            self.register_buffer("absmax_offset", torch.zeros((), **f32))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, **f32))
        frozen_bias = torch.zeros(out_features, dtype=compute_dtype, device=device)
        self.register_parameter(
            "bias", nn.Parameter(frozen_bias, requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: str = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """The 4-bit copy of `linear` (on its device; compute dtype = its weight's dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_scheme(scheme)
        _check_block_size(block_size)
        _check_double_quant(double_quant)
        weight = linear.weight
        _check_weight(weight, "linear.weight")
        if linear.bias is not None:
            _check_weight(linear.bias, "linear.bias")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            scheme=scheme,
            block_size=block_size,
            double_quant=double_quant,
            compute_dtype=weight.dtype,
            device=weight.device,
        )
        for name, tensor in _encode(weight, scheme, block_size, double_quant).items():
            setattr(layer, name, tensor)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _buffers_dict(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self._buffers.items() if buf is not None}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight W (out_features, in_features) in `dtype` (default: compute_dtype)."""
        if dtype is not None:
            _check_float_dtype(dtype)
        shape = (self.out_features, self.in_features)
        return _decode(
            self._buffers_dict(), self.scheme, self.block_size, shape, dtype or self.compute_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype (autocast's under autocast)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"Linear4bit expects a floating-point tensor, got {got}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs (..., {self.in_features}), got shape {tuple(x.shape)}"
            )
        dtype = x.dtype
        device_type = x.device.type
        # The meta device has no autocast (torch raises when asked): shapes only, x's dtype.
        if (
            x.dtype != torch.float64
            and device_type != "meta"
            and torch.is_autocast_enabled(device_type)
        ):
            dtype = torch.get_autocast_dtype(device_type)
        return _Linear4bitFunction.apply(x, self, dtype)

    def to_linear(self) -> nn.Linear:
        """A frozen nn.Linear holding the dequantised weight and the bias (in compute_dtype)."""
        return dense_linear(self, self.dequantize())

    # The format travels with the codes. Without it an int4 layer would load nf4 codes and
    # decode them with the wrong table, silently: every weight moves, nothing fails.
    # state_dict()["_extra_state"] is (scheme index in SCHEMES, block_size, double_quant,
    # out_features, in_features) as an int64 tensor (a tensor, so state dicts stay tensors).

    def quant_format(self) -> tuple[str, int, bool, int, int]:
        """(scheme, block_size, double_quant, out_features, in_features)."""
        return (
            self.scheme, self.block_size, self.double_quant, self.out_features, self.in_features
        )  # fmt: skip

    def get_extra_state(self) -> torch.Tensor:
        scheme, block_size, double_quant, out_f, in_f = self.quant_format()
        return torch.tensor([SCHEMES.index(scheme), block_size, int(double_quant), out_f, in_f])

    def set_extra_state(self, state: object) -> None:
        problem = _format_mismatch(state, self.quant_format())
        if problem:
            raise ValueError(problem)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checked before torch copies a single code in: on a mismatch this layer keeps its
        # own codes and torch's load_state_dict raises with the message below.
        where = prefix.rstrip(".") or "Linear4bit"
        key = prefix + "_extra_state"
        problem = None
        if key in state_dict:
            problem = _format_mismatch(state_dict[key], self.quant_format())
        elif prefix + "packed_weight" in state_dict:  # codes whose format is unknown, even
            problem = (  # under strict=False: their scheme cannot be checked
                "the state dict holds 4-bit codes but no _extra_state (their scheme, block "
                "size, double quant and shape): their format cannot be checked"
            )
        if problem is None:
            problem = _scale_problem(state_dict, prefix)
        if problem:
            error_msgs.append(f"{where}: {problem}")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def storage_bytes(self) -> int:
        """Bytes of the 4-bit weight: packed codes and every scale buffer (not the bias)."""
        return sum(b.numel() * b.element_size() for b in self._buffers_dict().values())

    def bits_per_parameter(self) -> float:
        """storage_bytes() * 8 / (in_features * out_features): 4.127 for NF4 + double quant."""
        return self.storage_bytes() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                "Linear4bit has no .weight: its weight is stored as packed 4-bit codes; "
                "use .dequantize() for a dense copy"
            )
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(
                "Linear4bit has no .weight to set: it would be ignored by forward. Build a new "
                "layer with Linear4bit.from_linear(nn.Linear) instead"
            )
        super().__setattr__(name, value)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # .to(dtype)/.half()/.double() would cast the fp32 scales too (fp16 scales would lose
        # precision and change the format). Keep them fp32, move them with the device, and take
        # the new float dtype as the compute dtype.
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.packed_weight.device))
        kept = {n: self._buffers.pop(n) for n in _FP32_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                self._buffers[name] = buf.to(probe.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self


def _describe_format(fmt: tuple[str, int, bool, int, int]) -> str:
    scheme, block_size, double_quant, out_f, in_f = fmt
    dq = "with" if double_quant else "without"
    return (
        f"{scheme} codes of a ({out_f}, {in_f}) weight (block_size {block_size}, {dq} double "
        "quantisation)"
    )


def _format_mismatch(state: object, mine: tuple[str, int, bool, int, int]) -> str | None:
    """Why a saved format record cannot load into a layer of format `mine`, or None."""
    valid = (
        isinstance(state, torch.Tensor)
        and state.shape == (5,)
        and not state.is_floating_point()
        and not state.is_complex()
        and 0 <= int(state[0]) < len(SCHEMES)
        and int(state[2]) in (0, 1)
    )
    if not valid:
        return (
            f"its _extra_state {state!r:.80} is not a Linear4bit format record (scheme index, "
            "block_size, double_quant, out_features, in_features): not a Linear4bit state dict"
        )
    index, block_size, double_quant, out_f, in_f = (int(v) for v in state.tolist())
    theirs = (SCHEMES[index], block_size, bool(double_quant), out_f, in_f)
    if theirs == mine:
        return None
    return (
        f"the state dict holds {_describe_format(theirs)}, but this layer decodes "
        f"{_describe_format(mine)}: decoding one format's codes as another's would silently "
        f"change every weight. Load it into Linear4bit(..., scheme={theirs[0]!r}, "
        f"block_size={theirs[1]}, double_quant={theirs[2]})"
    )


def _scale_problem(state_dict: dict, prefix: str) -> str | None:
    """Why the block scales in a state dict would dequantise to nan or wrong signs, or None."""
    for name in _FP32_BUFFERS:
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            return (
                f"its {name} is not finite floating point ({value.dtype}): the codes would "
                "decode to nan"
            )
        if name == "absmax" and bool((value < 0).any()):
            return "its absmax holds negative block scales (each is a block's largest |w|, >= 0)"
    return None


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

# Modules that read a child linear's .weight directly instead of calling it (see lab.lora).
_WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered by more than one module (tied weights)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def quantize_base(
    model: nn.Module, scheme: str = "nf4", block_size: int = 64, double_quant: bool = True
) -> list[str]:
    """Replace the frozen nn.Linear layers of the transformer blocks by Linear4bit layers.

    With `model.blocks` (a ToyTransformer) every nn.Linear inside the blocks is quantised: the
    embedding, layer norms and the head (tied to the embedding) stay as they are. A model
    without `.blocks` has every nn.Linear quantised whose weight is not tied to another module.
    Returns the replaced names in module order. Everything is validated first (on error the
    model is unchanged); call it before add_lora. A model that already holds a Linear4bit
    anywhere (quantised, or half of it by hand) is refused, naming those layers and their
    format: quantising the rest would mix schemes in one model without a word.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_double_quant(double_quant)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"the model already has LoRA layers ({', '.join(lora[:3])}"
            f"{', ...' if len(lora) > 3 else ''}): quantize the base before add_lora "
            "(or call remove_lora first)"
        )
    already = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if already:
        listed = ", ".join(
            f"{n or 'the model itself'} ({m.scheme}, block_size {m.block_size}"
            f"{', double quant' if m.double_quant else ''})"
            for n, m in list(already.items())[:3]
        )
        raise ValueError(
            f"the model is already quantised: {len(already)} Linear4bit "
            f"layer{'s' * (len(already) != 1)} ({listed}"
            f"{', ...' if len(already) > 3 else ''}); quantising the rest would mix formats. "
            "Load a fresh base (lab.load_base_model()) and quantise it once, or call "
            "lab.quant.dequantize_base(model) first"
        )
    blocks = getattr(model, "blocks", None)
    root, prefix = (blocks, "blocks.") if isinstance(blocks, nn.Module) else (model, "")
    shared = _shared_parameter_ids(model)
    places = [(prefix + n, m) for n, m in root.named_modules(remove_duplicate=False) if n]
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in places:
        if not isinstance(module, nn.Linear) or id(module.weight) in shared:
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name), _WEIGHT_READING_PARENTS):
            continue  # the parent reads .weight itself: a Linear4bit there would break forward
        _check_weight(module.weight, f"{name}.weight")
        if module.bias is not None:
            _check_weight(module.bias, f"{name}.bias")
        chosen.append((name, module))
    if not chosen:
        where = "inside model.blocks" if prefix else "in the model"
        raise ValueError(
            f"nothing to quantise: no nn.Linear {where} whose weight is not tied to another module"
        )
    # Build every new layer first, then swap them all in: nothing changes if a build fails.
    # One nn.Linear used at several places becomes one Linear4bit at all of them.
    built: dict[int, Linear4bit] = {}
    for _, module in chosen:
        if id(module) not in built:
            built[id(module)] = Linear4bit.from_linear(module, scheme, block_size, double_quant)
    for name, module in chosen:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, built[id(module)])
    return [name for name, _ in chosen]


def dequantize_base(model: nn.Module) -> list[str]:
    """Replace every Linear4bit of `model` by a frozen nn.Linear holding its dequantised weight.

    The undo of quantize_base as far as 4 bits allow: the weights are the 4-bit ones, W-hat,
    not the originals. A model with LoRA layers is refused (remove_lora first). Returns the
    replaced names in module order; a layer used at several places stays one layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"the model has LoRA layers ({', '.join(lora[:3])}{', ...' if len(lora) > 3 else ''})"
            ": call lab.remove_lora(model) first (it merges or drops each adapter)"
        )
    places = [
        (n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, Linear4bit)
    ]
    if not places:
        raise ValueError("the model has no Linear4bit layers: nothing to dequantise")
    if any(not n for n, _ in places):
        raise ValueError("model is itself a Linear4bit: call model.to_linear() instead")
    built: dict[int, nn.Linear] = {}
    for _, module in places:  # every dense copy first: nothing changes if one fails
        if id(module) not in built:
            if module.packed_weight.is_meta:
                raise ValueError("the 4-bit layers are on the meta device (no codes to decode)")
            built[id(module)] = module.to_linear()
    for name, module in places:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, built[id(module)])
    return [name for name, _ in places]


def quantization_error(
    linear_or_weight: nn.Linear | torch.Tensor,
    scheme: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> dict[str, float]:
    """How far the 4-bit weight is from the original: relative error ‖W − Ŵ‖/‖W‖, MSE, max.

    Takes an nn.Linear (its weight) or a weight tensor; quantises a copy, changes nothing.
    """
    if isinstance(linear_or_weight, nn.Linear):
        w = linear_or_weight.weight
    elif isinstance(linear_or_weight, torch.Tensor):
        w = linear_or_weight
    else:
        raise TypeError(
            f"expected an nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}"
        )
    _check_weight(w)
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_double_quant(double_quant)
    ref = w.detach().to(torch.float64)
    buffers = _encode(w, scheme, block_size, double_quant)
    approx = _decode(buffers, scheme, block_size, tuple(w.shape), torch.float64)
    diff = ref - approx
    norm = ref.norm().item()
    return {
        "relative_error": diff.norm().item() / norm if norm > 0 else 0.0,
        "mse": (diff**2).mean().item(),
        "max_abs_error": diff.abs().max().item(),
    }
