"""Linear4bit: a frozen linear stored as packed 4-bit codes, dequantised on the fly."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import _decode, _encode
from .formats import (
    DQ_BLOCK_SIZE,
    SCHEMES,
    _check_block_size,
    _check_double_quant,
    _check_float_dtype,
    _check_scheme,
    _check_weight,
)

__all__ = [
    "Linear4bit",
    "dense_linear",
]


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
