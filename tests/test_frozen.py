"""lab/frozen.py: what LoRA can wrap, and the frozen weight it reads (a 4-bit base dequantised)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lab.frozen import frozen_weight, is_frozen_linear, is_quantized, weight_dtype_device
from lab.lora import LoRALinear
from lab.quant import Linear4bit


def four_bit(dtype: torch.dtype = torch.float32) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(64, 32).to(dtype))


class NotALinear(nn.Module):
    """It can dequantize, but has no in_features/out_features: not a frozen linear."""

    def dequantize(self) -> torch.Tensor:
        return torch.zeros(2, 2)


@pytest.mark.parametrize(
    ("module", "frozen", "quantized"),
    [
        (nn.Linear(4, 3), True, False),
        (four_bit(), True, True),
        (nn.LayerNorm(4), False, False),
        (NotALinear(), False, False),
        (nn.Linear(4, 3).weight, False, False),  # a tensor, not a module
        ("q_proj", False, False),
    ],
)
def test_what_lora_can_wrap(module, frozen, quantized):
    assert is_frozen_linear(module) is frozen and is_quantized(module) is quantized


def test_a_linear_gives_its_own_weight_and_a_4bit_base_its_dequantised_one():
    linear = nn.Linear(4, 3)
    assert frozen_weight(linear) is linear.weight
    q = four_bit()
    assert torch.equal(frozen_weight(q), q.dequantize())
    assert frozen_weight(q).shape == (32, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_device_without_dequantising(dtype):
    assert weight_dtype_device(nn.Linear(4, 3).to(dtype)) == (dtype, torch.device("cpu"))
    q = four_bit(dtype)
    assert weight_dtype_device(q) == (q.compute_dtype, torch.device("cpu"))
    assert q.compute_dtype == dtype


def test_lora_on_a_4bit_base_reads_the_dequantised_weight_and_trains_fp32_adapters():
    q = four_bit(torch.bfloat16)
    layer = LoRALinear(q, rank=2, alpha=4)
    assert torch.equal(layer.base_weight(), q.dequantize())
    assert layer.lora_A.dtype == torch.float32 and layer.delta_weight().dtype == torch.bfloat16
