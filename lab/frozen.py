"""The frozen base a LoRA layer wraps: an nn.Linear, or a quantised linear that can dequantise.

LoRA only reads the base's weight (out, in); these helpers give it whatever stores it, so the
layer, surgery and merging treat a 4-bit base (lab.quant.Linear4bit) like any other.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["frozen_weight", "is_frozen_linear", "is_quantized", "weight_dtype_device"]


def is_frozen_linear(module: object) -> bool:
    """True for what LoRA can wrap: an nn.Linear, or a quantised linear that can dequantise.

    A quantised linear (lab.quant.Linear4bit) has in_features, out_features, bias and a
    `dequantize()` that returns its (out, in) weight; it has no `.weight` to write into.
    """
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Module)
        and callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def is_quantized(module: object) -> bool:
    """True for a frozen linear that stores its weight quantised (it has no `.weight`)."""
    return is_frozen_linear(module) and not isinstance(module, nn.Linear)


def frozen_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a frozen linear (a quantised one gives it dequantised)."""
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


def weight_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype the base computes in and the device it lives on, without dequantising."""
    if isinstance(base, nn.Linear):
        return base.weight.dtype, base.weight.device
    tensors = [*base.buffers(), *base.parameters()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return getattr(base, "compute_dtype", torch.float32), device
