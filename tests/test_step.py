"""lab/step.py: the one training step, its optimizer groups (LoRA+) and its precision rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lab.config import LoRAConfig
from lab.model import ToyTransformer, get_preset
from lab.step import autocast_dtype, forward_loss, make_optimizer, set_lr, training_step
from lab.surgery import add_lora


def lora_model(lr_ratio: float = 1.0) -> ToyTransformer:
    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    add_lora(model, LoRAConfig(rank=2, alpha=4, lr_ratio=lr_ratio))
    return model


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, get_preset("tiny").vocab_size, (4, 8), generator=g)


def test_autocast_is_bf16_on_cuda_and_off_elsewhere():
    assert autocast_dtype("cuda") is torch.bfloat16 and autocast_dtype("cuda:1") is torch.bfloat16
    assert autocast_dtype("cpu") is None and autocast_dtype(torch.device("meta")) is None


def test_plain_lora_trains_in_one_group_at_the_given_rate():
    optimizer = make_optimizer(lora_model(), lr=1e-3, weight_decay=0.1)
    (group,) = optimizer.param_groups
    assert group["lr"] == 1e-3 and group["lr_scale"] == 1.0 and group["weight_decay"] == 0.1
    assert all(p.requires_grad for p in group["params"])


def test_lora_plus_puts_b_at_lr_ratio_times_a_and_set_lr_keeps_the_ratio():
    model = lora_model(lr_ratio=16)
    optimizer = make_optimizer(model, lr=1e-3)
    by_scale = {g["lr_scale"]: g for g in optimizer.param_groups}
    assert set(by_scale) == {1.0, 16.0}
    b_ids = {id(m.lora_B) for m in model.modules() if hasattr(m, "lora_B")}
    assert {id(p) for p in by_scale[16.0]["params"]} == b_ids
    set_lr(optimizer, 2e-3)
    assert by_scale[1.0]["lr"] == 2e-3 and by_scale[16.0]["lr"] == pytest.approx(32e-3)


def test_a_model_with_nothing_to_train_is_refused():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, lr=1e-3)


def test_a_step_returns_the_batch_loss_moves_only_adapters_and_clears_gradients():
    model = lora_model()
    x = batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = make_optimizer(model, lr=1e-2)
    phases = []
    loss = training_step(model, x, x, optimizer, observe=phases.append)
    assert phases == ["forward", "backward", "step"]
    assert not loss.requires_grad and torch.equal(loss, forward_loss(lora_model(), x, x))
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], w) for n, w in frozen.items())
    assert any(p.abs().sum() > 0 for n, p in now.items() if n.endswith("lora_B"))
    assert all(p.grad is None for p in model.parameters())
