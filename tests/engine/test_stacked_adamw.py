"""StackedAdamW: K independent AdamW optimizers over stacked parameters."""

from __future__ import annotations

import pytest
import torch

from lab.engine.stacked_adamw import StackedAdamW


def test_stacked_adamw_matches_torch_adamw_per_slice():
    torch.manual_seed(0)
    stacked = torch.randn(3, 4, 5, requires_grad=True)
    alone = [torch.nn.Parameter(stacked[k].detach().clone()) for k in range(3)]
    lrs = [1e-2, 3e-3, 5e-2]
    opt = StackedAdamW([stacked], 3, weight_decay=0.1)
    torch_opts = [
        torch.optim.AdamW([p], lr=lr, weight_decay=0.1) for p, lr in zip(alone, lrs, strict=True)
    ]
    for _ in range(20):
        grads = torch.randn(3, 4, 5)
        stacked.grad = grads.clone()
        opt.step(lrs)
        for k, (p, o) in enumerate(zip(alone, torch_opts, strict=True)):
            p.grad = grads[k].clone()
            o.step()
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), alone[k].detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="2 learning rates for 3"):
        opt.step([1e-2, 1e-2])
