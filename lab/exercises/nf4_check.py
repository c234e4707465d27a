"""Exercise 7: NF4 quantisation and dequantisation of one block of 64 weights."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import torch

from ..quant import FP4_LEVELS, INT4_LEVELS, NF4_LEVELS, dequantize_blockwise, quantize_blockwise
from .compare import _bad_tensor, _close, _where
from .feedback import Feedback, _call, _no, _safe

__all__ = [
    "check_nf4",
]


NF4_BLOCK = 64  # QLoRA's block size: one absmax per 64 weights
_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2  # NF4's decision boundaries
_WRONG_TABLES: dict[str, tuple[float, ...]] = {  # what a student may code instead of NF4
    "uniform int4 levels (k / 7, evenly spaced)": INT4_LEVELS,
    "uniform int4 levels ((k - 7) / 7, evenly spaced)": tuple((k - 7) / 7 for k in range(16)),
    "evenly spaced levels (torch.linspace(-1, 1, 16), uniform int4)": tuple(
        torch.linspace(-1, 1, 16).tolist()
    ),
    "FP4's levels (a tiny float: 1 sign, 2 exponent, 1 mantissa bit)": FP4_LEVELS,
}
_TABLE_TIP = (
    "NF4's 16 levels are lab.NF4_LEVELS (quantiles of a normal distribution, dense near 0 "
    "where most weights are): code k means NF4_LEVELS[k]"
)
NF4_QUANTIZE_TODO = (
    "Return (codes, absmax): absmax = the block's largest |w|, and for each w the index (0..15) "
    "of the NF4 level nearest to w / absmax."
)
NF4_DEQUANTIZE_TODO = "Return NF4_LEVELS[code] * absmax for every code, a float32 tensor (64,)."
NF4_CALLS = "my_quantize(block) -> (codes, absmax) and my_dequantize(codes, absmax) -> block"


@functools.cache
def _nf4_blocks() -> tuple[tuple[str, torch.Tensor], ...]:
    """The fixed test blocks of 64 float32 weights, each with what it is there to catch."""
    g = torch.Generator().manual_seed(7)
    normal = 0.02 * torch.randn(NF4_BLOCK, generator=g)  # weights as a trained layer has them
    on_levels = 0.5 * _NF4.repeat(4)[torch.randperm(NF4_BLOCK, generator=g)]  # exactly on levels
    delta = 0.004  # in units of absmax: well inside a gap (the narrowest half gap is 0.04)
    near = torch.cat([_MIDPOINTS + k * delta for k in (-3, -1, 1, 3)])
    near = 2.0 * torch.cat([near, torch.tensor([1.0, 0.0, -0.75, 0.6])])  # absmax 2
    negative = (0.8 * torch.randn(NF4_BLOCK, generator=g)).clamp(-2.4, 2.4)
    negative[17] = -3.0  # the largest magnitude is negative: absmax is 3, not -3 or max(w)
    return (
        ("normal weights", normal),
        ("values exactly on the levels (times 0.5)", on_levels),
        ("values near the midpoints between levels", near),
        ("a block whose largest magnitude is negative (-3.0)", negative),
    )


def _nearest(scaled: torch.Tensor, table: Sequence[float]) -> torch.Tensor:
    """Index of the nearest level of `table` for every value (ties: the first, lower level)."""
    t = torch.tensor(table, dtype=torch.float32)
    return (scaled[:, None] - t).abs().argmin(dim=1)


def _as_absmax(value: object) -> tuple[float | None, str]:
    """(absmax as a float, '') or (None, what is wrong with it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, (
                f"absmax should be one number for the block (a float or a 0-d tensor), got a "
                f"tensor of shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool or value.is_meta:
            return None, f"absmax should be a real number, got a {value.dtype} tensor"
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None, f"absmax should be a number (a float or a 0-d tensor), got {value!r}"
    if not math.isfinite(value):
        return None, f"absmax is {value}: divide by the largest |w|, a finite positive number"
    return float(value), ""


def _as_codes(value: object) -> tuple[torch.Tensor | None, str]:
    """(codes as a long tensor (64,), '') or (None, what is wrong with them)."""
    if not isinstance(value, torch.Tensor):
        return None, f"codes should be a torch tensor of integers 0..15, got {type(value).__name__}"
    if value.is_meta:
        return None, "codes are on the meta device (a shape, no values)"
    if value.shape != (NF4_BLOCK,):
        return (
            None,
            f"codes have shape {tuple(value.shape)}; expected ({NF4_BLOCK},), one per weight",
        )
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        if value.is_floating_point() and bool(torch.isin(value.float(), _NF4).all()):
            return None, (
                "codes are the levels themselves (floats): return their indices 0..15, an "
                "integer tensor (the index is what takes 4 bits)"
            )
        return None, (
            f"codes should be an integer tensor (torch.uint8 or torch.long) of indices 0..15, "
            f"got {value.dtype}"
        )
    codes = value.detach().cpu().long()
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        return None, (
            f"codes run from {int(codes.min())} to {int(codes.max())}: a 4-bit code is an "
            "index 0..15 into NF4_LEVELS"
        )
    return codes, ""


def _absmax_hint(got: float, w: torch.Tensor, want: float) -> str:
    """Why the student's absmax differs from max |w|."""
    extreme = float(w[w.abs().argmax()])
    if extreme < 0 and math.isclose(got, extreme, rel_tol=1e-5):
        return (
            f"your absmax is {got:.4g}, negative: this block's largest magnitude is a negative "
            f"weight, and absmax is a magnitude, max |w| = {want:.4g}: use block.abs().max() "
            "(a negative absmax would flip every sign)"
        )
    if math.isclose(got, float(w.max()), rel_tol=1e-5):
        return (
            f"your absmax is block.max() = {got:.4g}, but this block's largest magnitude is "
            f"negative ({extreme:.4g}): the sign matters, so take |w| first, "
            f"block.abs().max() = {want:.4g}"
        )
    if any(math.isclose(got, v, rel_tol=1e-5) for v in (float(w.min()), -float(w.min()))):
        return (
            "your absmax comes from block.min(): use the largest |w|, "
            f"block.abs().max() = {want:.4g}"
        )
    if math.isclose(got, 1.0):
        return (
            f"your absmax is 1: without a per-block scale the levels do not fit the weights "
            f"(here |w| <= {want:.4g}). absmax = block.abs().max(), and w is divided by it"
        )
    return f"absmax should be the block's largest |w|, {want:.4g}; yours is {got:.4g}"


def _codes_hint(codes: torch.Tensor, w: torch.Tensor, absmax: float) -> str:
    """The mistake that gives exactly these codes for block `w`, or where they differ."""
    scaled = w / absmax
    levels = _NF4
    candidates: list[tuple[str, torch.Tensor]] = [
        (
            "no absmax scaling: your codes are the levels nearest to w itself. Divide by "
            "absmax first: the codes index the level nearest to w / absmax, in [-1, 1]",
            _nearest(w, NF4_LEVELS),
        ),
        (
            "you multiplied by absmax: divide instead, the level nearest to w / absmax",
            _nearest(w * absmax, NF4_LEVELS),
        ),
    ]
    candidates += [
        (f"wrong code table: those codes use {name}. {_TABLE_TIP}", _nearest(scaled, table))
        for name, table in _WRONG_TABLES.items()
    ]
    candidates += [
        (
            "rounding to the wrong neighbour: your codes take the level just below w / absmax "
            "(floor). Take the nearest level: the smallest |w / absmax - level|",
            (torch.searchsorted(levels, scaled, right=True) - 1).clamp(0, 15),
        ),
        (
            "rounding to the wrong neighbour: your codes take the level just above w / absmax "
            "(ceil). Take the nearest level: the smallest |w / absmax - level|",
            torch.searchsorted(levels, scaled).clamp(0, 15),
        ),
        (
            "the sign is lost: your codes are those of |w| / absmax. NF4 has negative levels "
            "(codes 0..6): quantise w / absmax with its sign",
            _nearest(scaled.abs(), NF4_LEVELS),
        ),
        (
            "the sign is flipped: your codes are those of -w / absmax",
            _nearest(-scaled, NF4_LEVELS),
        ),
    ]
    for hint, wrong in candidates:
        if torch.equal(codes, wrong):
            return hint
    want = _nearest(scaled, NF4_LEVELS)
    i = int((codes != want).nonzero()[0])
    return (
        f"for w = {float(w[i]):.4g} (w / absmax = {float(scaled[i]):.4f}) your code is "
        f"{int(codes[i])} (level {float(levels[codes[i]]):.4f}); the nearest NF4 level is "
        f"{float(levels[want[i]]):.4f}, code {int(want[i])}"
    )


def _dequantize_hint(out: torch.Tensor, codes: torch.Tensor, absmax: float) -> str:
    """The mistake that gives exactly this dequantized block, or what the formula is."""
    lv = _NF4[codes]
    candidates = [
        (
            "no absmax scaling: you returned the levels NF4_LEVELS[code] alone. Multiply back "
            "by absmax: w ≈ NF4_LEVELS[code] * absmax",
            lv,
        ),
        ("you divided by absmax: multiply, w ≈ NF4_LEVELS[code] * absmax", lv / absmax),
    ]
    candidates += [
        (f"wrong code table: that decodes with {name}. {_TABLE_TIP}", _tensor(t)[codes] * absmax)
        for name, t in _WRONG_TABLES.items()
    ]
    candidates += [
        (
            "the sign is lost: your values are all >= 0; NF4_LEVELS[code] keeps its sign",
            lv.abs() * absmax,
        ),
        ("the sign is flipped: w ≈ NF4_LEVELS[code] * absmax, not minus that", -lv * absmax),
    ]
    for hint, wrong in candidates:
        if _close(out, wrong):
            return hint
    return "it should be NF4_LEVELS[code] * absmax, code by code"


def _tensor(table: Sequence[float]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.float32)


@_safe
def check_nf4(quantize: Callable, dequantize: Callable) -> Feedback:
    """Exercise 7: NF4 quantise/dequantise of one block of 64, against lab.quant's blockwise code.

    quantize(block (64,) float32) -> (codes (64,) integers 0..15, absmax: a number);
    dequantize(codes (64,) long, absmax 0-d float32 tensor) -> (64,) float32.
    """
    blocks = _nf4_blocks()
    dtype_why = "like the block (the levels times a float32 absmax)"
    mask_tip = dict.fromkeys(
        ("mask",),
        "Indexing with a uint8 tensor is read as a mask: index with codes.long()",
    )
    # 1. my_quantize, block by block: absmax first, then the codes.
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want_absmax = float(ref_absmax[0])
        given = block.clone()
        out, problem = _call(
            quantize, "my_quantize", NF4_QUANTIZE_TODO, given, call="my_quantize(block)"
        )
        if problem:
            return problem
        if not torch.equal(given, block):
            return _no("my_quantize changed the block in place: compute new tensors instead")
        if not isinstance(out, tuple | list) or len(out) != 2:
            got = (
                f"a {type(out).__name__}"
                if not isinstance(out, tuple | list)
                else f"{len(out)} values"
            )
            return _no(f"my_quantize should return two things, (codes, absmax); it returned {got}")
        codes, why = _as_codes(out[0])
        if codes is None:
            return _no(f"on {name}: {why}")
        absmax, why = _as_absmax(out[1])
        if absmax is None:
            return _no(f"on {name}: {why}")
        if not math.isclose(absmax, want_absmax, rel_tol=1e-5):
            return _no(f"on {name}: {_absmax_hint(absmax, block, want_absmax)}")
        if not torch.equal(codes, ref_codes.long()):
            wrong = int((codes != ref_codes.long()).sum())
            hint = _codes_hint(codes, block, want_absmax)
            return _no(f"on {name}, {wrong} of your 64 codes differ from lab.quant's: {hint}")
    # 2. my_dequantize on the lab's codes.
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want = dequantize_blockwise(ref_codes, ref_absmax, "nf4", NF4_BLOCK)
        codes, absmax = ref_codes.long(), ref_absmax[0].clone()
        out, problem = _call(
            dequantize,
            "my_dequantize",
            NF4_DEQUANTIZE_TODO,
            codes,
            absmax,
            call="my_dequantize(codes, absmax)",
        )
        if problem:
            return problem
        if not (torch.equal(codes, ref_codes.long()) and torch.equal(absmax, ref_absmax[0])):
            return _no("my_dequantize changed codes or absmax in place: compute a new tensor")
        if problem := _bad_tensor(out, "my_dequantize", want, dtype_why):
            return problem
        if not _close(out.detach(), want):
            hint = _dequantize_hint(out.detach(), codes, float(absmax))
            return _no(
                f"on {name}, my_dequantize differs from lab.quant's "
                f"{_where(out.detach() - want)}: {hint}"
            )
    # 3. The round trip, your codes into your dequantize (a uint8 code tensor can trip it).
    errors = []
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want = dequantize_blockwise(ref_codes, ref_absmax, "nf4", NF4_BLOCK)
        pair, problem = _call(quantize, "my_quantize", NF4_QUANTIZE_TODO, block.clone())
        if problem:
            return problem
        out, problem = _call(
            dequantize,
            "my_dequantize",
            NF4_DEQUANTIZE_TODO,
            *pair,
            hints=mask_tip,
            call="my_dequantize(*my_quantize(block))",
        )
        if problem:
            return _no(f"on your own codes, my_dequantize(*my_quantize(block)): {problem.message}")
        if problem := _bad_tensor(out, "my_dequantize(*my_quantize(block))", want, dtype_why):
            return problem
        if not _close(out.detach(), want):
            return _no(
                f"on {name}, my_dequantize(*my_quantize(block)) differs from lab.quant's round "
                f"trip {_where(out.detach() - want)}, though each is right on the lab's values: "
                "does my_dequantize read the codes and absmax that my_quantize returns?"
            )
        errors.append(float((want - block).abs().max() / ref_absmax[0]))
    return Feedback(
        True,
        f"my_quantize and my_dequantize match lab.quant on {len(blocks)} blocks of 64 (normal "
        "weights, values on the levels, values near the midpoints, a negative extreme): "
        "absmax = max |w|, code = index of the NF4 level nearest to w / absmax, "
        "w ≈ NF4_LEVELS[code] * absmax. On the normal block the round trip is off by at most "
        f"{errors[0]:.3f} x absmax (at most half the gap between two neighbouring levels). "
        "Storage: 64 codes of 4 bits (32 bytes) and one float32 absmax (4 bytes) make 4.5 bits "
        "per weight; double quantisation stores absmax in 8 bits, 4.127.",
    )
