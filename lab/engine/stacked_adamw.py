"""AdamW over stacked (K, ...) parameters with one learning rate per configuration.

The batched engine (lab.engine.batched) trains K configurations' adapters stacked along a leading
dimension. Adam is elementwise, so one optimizer over the stacks is K independent AdamW
optimizers, as long as each slice gets its own learning rate (and LoRA+'s ratio, or 0 for a
tensor that keeps its start).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BETAS", "EPS", "StackedAdamW"]

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which lab.train uses


class StackedAdamW:
    """AdamW over stacked (K, ...) parameters with one learning rate per configuration.

    Adam is elementwise, so this is K independent AdamW optimizers. The arithmetic follows
    torch.optim.AdamW's single-tensor path step for step (decoupled weight decay, lerp for the
    first moment, bias corrections), so a slice trains as AdamW would train it alone.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        n_configs: int,
        weight_decay: float = 0.0,
        lr_scales: Sequence[Sequence[float] | None] | None = None,
    ):
        self.params = list(params)
        self.n_configs, self.weight_decay = n_configs, weight_decay
        # lr_scales[i][k]: parameter i's learning-rate multiplier for configuration k (LoRA+
        # trains B at lr_ratio times A's rate); None means 1 for every configuration.
        scales = list(lr_scales) if lr_scales is not None else [None] * len(self.params)
        if len(scales) != len(self.params):
            raise ValueError(f"got {len(scales)} lr_scales for {len(self.params)} parameters")
        self.lr_scales = scales
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One update; lrs[k] is configuration k's learning rate for this step."""
        if len(lrs) != self.n_configs:
            raise ValueError(f"got {len(lrs)} learning rates for {self.n_configs} configurations")
        self.step_count += 1
        beta1, beta2 = BETAS
        bias1 = 1 - beta1**self.step_count
        bias2_sqrt = (1 - beta2**self.step_count) ** 0.5
        # One small host-to-device copy per step for all parameters, not one per parameter.
        first = self.params[0]
        plans = {}  # one (step size, decay) pair per distinct multiplier list
        for scales in self.lr_scales:
            key = None if scales is None else tuple(scales)
            if key not in plans:
                eff = list(lrs) if key is None else [lr * s for lr, s in zip(lrs, key, strict=True)]
                size = torch.tensor([-lr / bias1 for lr in eff], dtype=first.dtype)
                decay = torch.tensor([1 - lr * self.weight_decay for lr in eff], dtype=first.dtype)
                plans[key] = (size.to(first.device), decay.to(first.device))
        for p, m, v, scales in zip(self.params, self.exp_avg, self.exp_avg_sq, self.lr_scales,
                                   strict=True):  # fmt: skip
            if p.grad is None:
                continue
            step_size, decay = plans[None if scales is None else tuple(scales)]
            shape = (self.n_configs,) + (1,) * (p.dim() - 1)
            grad = p.grad
            if self.weight_decay:
                p.mul_(decay.view(shape))
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(EPS)
            p.add_((m / denom) * step_size.view(shape))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
