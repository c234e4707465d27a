"""Tests for lab/merging.py: one layer's merge and unmerge, exact, all-or-nothing, and recorded."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lab.lora import LoRALinear
from lab.surgery import (
    add_lora,
    merge_lora,
    unmerge_lora,
)


def test_double_merge_and_double_unmerge_leave_weights_unchanged():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    merged_w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base.weight, merged_w) and layer.merged
    layer.unmerge()
    unmerged_w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.base.weight, unmerged_w) and not layer.merged


@pytest.mark.parametrize(("dtype", "fill"), [(torch.float16, 1e3), (torch.float32, 1e38)])
def test_merge_refuses_non_finite_weights_and_changes_nothing(dtype, fill):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8, dtype=dtype), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_A.fill_(fill)
        layer.lora_B.fill_(fill)
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite weights"):
        layer.merge()
    assert torch.equal(layer.base.weight, w0) and not layer.merged


def test_unmerge_after_edit_restores_w(lora_model):
    w0 = lora_model[0].base.weight.detach().clone()
    merge_lora(lora_model)
    with torch.no_grad():
        lora_model[0].lora_B.add_(1.0)
    with pytest.warns(UserWarning, match="changed while the layer was merged"):
        unmerge_lora(lora_model)
    assert torch.allclose(lora_model[0].base.weight, w0, atol=1e-6)


def test_unmerge_without_edit_is_silent(lora_model):
    w0 = lora_model[2].base.weight.detach().clone()
    merge_lora(lora_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unmerge_lora(lora_model)
    assert torch.allclose(lora_model[2].base.weight, w0, atol=1e-6)


def test_merge_on_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    add_lora(model, "0", rank=2, alpha=4)
    merge_lora(model)
    unmerge_lora(model)
    assert not model[0].merged


def test_deepcopy_merged_keeps_record(lora_model):
    merge_lora(lora_model)
    other = copy.deepcopy(lora_model)
    unmerge_lora(other)
    assert not other[0].merged
