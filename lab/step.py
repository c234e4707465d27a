"""The lab's one training step, and its one rule for autocast.

Every trainer in the lab (`lab.train`, the memory measurement, the batched sweep engine, the
benchmarks and the exercises) runs this step, so they cannot drift apart:

    forward (under autocast on CUDA) -> loss -> backward -> optimizer.step() -> zero_grad

`observe`, when given, is called after each phase ("forward", "backward", "step") with the
loss so far: the memory tracker takes its snapshots there instead of copying the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .model import lm_loss

__all__ = ["autocast_dtype", "forward_loss", "make_optimizer", "set_lr", "training_step"]


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 on CUDA (tensor cores, half the activation memory), none (plain fp32) elsewhere.

    The lab's one precision rule: LoRA's adapters stay fp32 parameters either way; only the
    forward's matmuls run in bf16 on a GPU. CPUs gain little from bf16 autocast and lose
    exactness, so the CPU runs float32.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def forward_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The language-model loss of `model` on (inputs, targets); the forward runs under autocast.

    Only the forward is autocast; the loss is computed in fp32 by lm_loss either way.
    """
    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(inputs)
    return lm_loss(logits, targets, reduction=reduction)


def training_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    dtype: torch.dtype | None = None,
    observe: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the batch's loss (detached, on the device).

    `observe(phase)` is called after "forward", "backward" and "step" (before zero_grad), for
    instruments that look at memory between phases. Gradients are set to None at the end.
    """
    loss = forward_loss(model, inputs, targets, dtype)
    if observe is not None:
        observe("forward")
    loss.backward()
    loss = loss.detach()  # the graph is freed: nothing of the forward lives through step()
    if observe is not None:
        observe("backward")
    optimizer.step()
    if observe is not None:
        observe("step")
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over what requires grad in `model`, in the lab's parameter groups.

    Groups come from lab.surgery.parameter_groups: with LoRA+ (a config's lr_ratio != 1) B's
    group runs at lr_ratio times A's rate. Each group keeps its multiplier as "lr_scale", so
    a schedule sets every group with `set_lr(optimizer, lr)` and the ratio survives.
    """
    from .engine.devices import keep_torch_cache_at_home
    from .surgery import parameter_groups  # lab.surgery imports nothing from here; keep it so

    groups = parameter_groups(model)
    if not groups:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    # torch makes its compiler cache folder when an optimizer is built (/tmp by default, one per
    # user on a shared host): the lab points it into the user's cache folder first.
    keep_torch_cache_at_home()
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to lr times its "lr_scale" (1 where it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
