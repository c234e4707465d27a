"""PiSSA (lab/variants/pissa.py): a 4-bit base refused, W given back, PEFT's init reproduced.

The shared properties run over PiSSA in tests/variants/test_variants.py's table."""

from __future__ import annotations

import pytest
import torch
from flavour_cases import _peft_pair, base_model, make
from torch import nn

import lab
from lab.surgery import lora_layers


def test_pissa_on_a_4bit_base_is_refused_with_the_model_unchanged():
    model = base_model("nf4")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="full-precision W"):
        lab.add_lora(model, rank=4, alpha=8, init="pissa")
    assert not lora_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_pissa_removed_unmerged_gives_the_original_weights_back():
    reference = base_model(None)
    model, _ = make({"init": "pissa"}, None)
    lab.remove_lora(model, merge=False)
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear) and name != "head":
            torch.testing.assert_close(
                model.get_submodule(name).weight, module.weight, rtol=1e-6, atol=1e-6
            )


def test_pissa_matches_peft_init_residual_and_outputs():
    ours, theirs, lin = _peft_pair({"init": "pissa"}, {"init_lora_weights": "pissa"})
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs_delta = (lin.lora_B["default"].weight @ lin.lora_A["default"].weight) * lin.scaling[
        "default"
    ]
    torch.testing.assert_close(ours.proj.delta_weight(), theirs_delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.proj.base.weight, lin.base_layer.weight, rtol=1e-4, atol=1e-5)
