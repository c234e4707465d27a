"""One training loop for full fine-tuning and LoRA: it trains whatever requires grad."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .memory import MemoryBreakdown, measure_step_memory
from .model import ToyTransformer, default_device, lm_loss
from .tasks import Task

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What one training run measured."""

    task: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    device: str
    trainable_parameters: int
    losses: list[float]  # training loss per step
    heldout: dict[str, float]  # task.evaluate() after training: loss, accuracy, n
    wall_seconds: float  # training loop only, evaluation excluded
    tokens_per_second: float  # input tokens processed per second of training
    memory: MemoryBreakdown | None  # measured on the first step (None when not measured)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-friendly dict."""
        out = {k: v for k, v in self.__dict__.items() if k != "memory"}
        out["memory"] = None if self.memory is None else self.memory.to_dict()
        return out


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of `lr`."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: ToyTransformer,
    task: Task,
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    measure_memory: bool = True,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train the parameters of `model` that require grad on `task` with AdamW; evaluate after.

    The same loop serves full fine-tuning (everything trainable) and LoRA (only adapters are).
    The model is moved to `device` (default: `default_device()`). On CUDA the forward runs
    under bf16 autocast. Losses stay on the device during the loop; the progress bar's loss is
    refreshed every 25 steps, the only host sync inside the loop.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r}: expected a positive finite number")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    model.train()
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = task.train_inputs.to(device), task.train_targets.to(device)
    # Every step's batch indices, drawn up front from the seeded CPU generator (the same numbers,
    # in the same order, as drawing them step by step) and copied to the device once, so the
    # loop never waits on a host-to-device copy. The same seed gives the same data on any device.
    order = torch.randint(len(train_x), (steps, batch_size), generator=generator).to(device)
    losses = torch.zeros(steps, device=device)
    memory = None

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[step]
        return train_x[idx], train_y[idx]

    bar = tqdm(range(steps), desc=f"train {task.name}", disable=not progress, leave=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        x, y = batch(step)
        if step == 0 and measure_memory:
            # The first step runs under the memory tracker; it is a real step all the same.
            memory = measure_step_memory(model, x, y, optimizer, autocast_dtype)
            losses[step] = memory.loss
        else:
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x)
            loss = lm_loss(logits, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step] = loss.detach()
        if progress and (step % 25 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{losses[step].item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    bar.close()
    heldout = task.evaluate(model)
    return TrainResult(
        task=task.name,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=str(device),
        trainable_parameters=sum(p.numel() for p in params),
        losses=losses.tolist(),
        heldout=heldout,
        wall_seconds=wall,
        tokens_per_second=steps * batch_size * train_x.shape[1] / wall,
        memory=memory,
    )
