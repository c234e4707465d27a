"""One training loop for full fine-tuning and LoRA: it trains whatever requires grad."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import psutil
import torch
from tqdm.auto import tqdm

from . import threads
from .memory import MemoryBreakdown, analytic_memory, measure_step_memory
from .model import ToyTransformer, default_device
from .step import autocast_dtype, make_optimizer, set_lr, training_step
from .surgery import check_trainable, lora_layers
from .tasks import SEQ_LEN, Task
from .text import format_bytes

__all__ = ["MAX_STEPS", "SEED_LIMIT", "TrainingDiverged", "TrainResult", "train"]

MAX_STEPS = 1_000_000  # the lab's runs take hundreds; a million already takes days on a laptop
SEED_LIMIT = 2**63  # seeds are ints in [0, 2**63), what every torch generator accepts


class TrainingDiverged(FloatingPointError):
    """A training loss became nan or inf; `step` and `loss` say where, `setting` what to lower."""

    def __init__(
        self, message: str, step: int, loss: float, setting: str, losses: list | None = None
    ) -> None:
        super().__init__(message)
        self.step, self.loss, self.setting = step, loss, setting
        self.losses = list(losses or [])  # the finite losses before `step`


def check_count(name: str, value: object, limit: int | None = None) -> None:
    """A positive int (not a bool), at most `limit`; TypeError/ValueError naming the value."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    if limit is not None and value > limit:
        raise ValueError(f"{name}={value:,} is more than the limit of {limit:,}")


def check_seed(seed: object) -> None:
    """An int in [0, 2**63); TypeError/ValueError naming the value."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed={seed!r}: expected an int in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed!r}: expected an int in [0, 2**63)")


def check_lr(lr: object, name: str = "lr") -> None:
    """A finite real number > 0 (not a bool, not a string)."""
    if not isinstance(lr, numbers.Real) or isinstance(lr, bool):
        raise TypeError(
            f"{name}={lr!r}: expected a positive finite number, got {type(lr).__name__}"
        )
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name}={lr!r}: expected a positive finite number")


def check_weight_decay(weight_decay: object) -> None:
    """A finite real number >= 0 (not a bool, not a string)."""
    if not isinstance(weight_decay, numbers.Real) or isinstance(weight_decay, bool):
        raise TypeError(
            f"weight_decay={weight_decay!r}: expected a finite number >= 0, "
            f"got {type(weight_decay).__name__}"
        )
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r}: expected a finite number >= 0")


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes a run may still use on `device`: the GPU's free memory, or what the OS can give
    without swapping (psutil's `available`, MemAvailable on Linux); None when unknown.

    The lab's one free-memory probe: training checks a run against it, a sweep plans with it
    (asked once per plan).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """MemoryError before allocating when `needed` bytes are more than `device` has available."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise too_large(needed, free, device, what)


def too_large(needed: int, free: int, device: torch.device, what: str) -> MemoryError:
    """The one refusal of a run larger than the memory `device` has available."""
    return MemoryError(
        f"{what} needs about {format_bytes(needed)} but {device.type} has "
        f"{format_bytes(free)} available; use a smaller batch_size or fewer steps "
        "(or configurations)"
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The lab's one memory plan for training, in bytes: what configurations training together
    (one run alone, or a batched step's chunk) need, generously.

    `shared`: what they share once (the base weights and the task's examples); `per_config`: what
    each configuration adds (twice the step's activations, gradients and optimizer state that
    `analytic_memory` predicts: dropout masks, backward temporaries and the allocator's slack can
    double them; plus its batch indices).
    """

    shared: int
    per_config: int

    def bytes(self, count: int = 1) -> int:
        """What `count` configurations training together need."""
        return self.shared + count * self.per_config

    def how_many_fit(self, free: int, fraction: float = 1.0) -> int:
        """How many configurations fit in `fraction` of `free` bytes (0: not even one)."""
        return max(0, (int(free * fraction) - self.shared) // max(1, self.per_config))


def plan_memory(config, batch_size: int, steps: int, adapters=None, n_train: int = 0) -> MemoryPlan:
    """The memory plan of training on `config`'s base at `batch_size` for `steps` steps.

    `adapters`: each configuration's (targets, rank); the plan takes the largest for all of them.
    None plans for full fine-tuning (every weight trains), which no LoRA run exceeds: lab.train
    plans so for any model. `n_train`: the task's training examples, held once.
    """
    steps_kept = [
        analytic_memory(config, batch_size, SEQ_LEN, lora_targets=targets, lora_rank=rank)
        for targets, rank in adapters or [(None, 0)]  # (None, 0): every weight trains
    ]
    step = max(steps_kept, key=lambda m: m.activations + m.gradients + m.optimizer)
    per_config = 2 * (step.activations + step.gradients + step.optimizer)
    per_config += 8 * steps * batch_size + 4 * steps  # each step's batch indices, and its lr
    return MemoryPlan(shared=step.parameters + 16 * n_train * SEQ_LEN, per_config=per_config)


def diverged_message(step: int, loss: float, lr: float, weight_decay: float, scaling: float):
    """(message, setting) for a run whose loss became non-finite at `step`."""
    settings = f"lr={lr:g}"
    if weight_decay:
        settings += f", weight_decay={weight_decay:g}"
    if scaling:
        settings += f", LoRA scaling={scaling:g}"
    if weight_decay and lr * weight_decay >= 0.5:
        setting, hint = "weight_decay", "try a smaller weight_decay (lr * weight_decay << 1)"
    elif scaling > 64:
        setting, hint = "alpha", "try a smaller alpha (scaling = alpha / rank)"
    else:
        setting, hint = "lr", "try a smaller lr"
    return f"training diverged at step {step} (loss {loss}) with {settings}; {hint}", setting


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

    Everything is checked before anything is allocated: steps (at most MAX_STEPS), batch_size,
    lr, seed, weight_decay, an estimate of the run's memory against what the device has
    (MemoryError), and that no LoRA layer is merged. A loss that becomes nan or inf stops the
    run with TrainingDiverged, naming the step and the setting to lower. torch trains with the
    lab's thread count (`lab.threads.training_threads`: one rule for every entry point, and one
    line on stderr, once per process, when the machine is too busy for the quoted times).
    """
    check_count("steps", steps, MAX_STEPS)
    check_count("batch_size", batch_size)
    check_lr(lr)
    check_seed(seed)
    check_weight_decay(weight_decay)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lab Task (lab.get_task(name)), got {type(task).__name__}")
    check_trainable(model, action="training")  # a merged adapter no longer acts
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (nothing requires grad)")
    device = torch.device(device) if device is not None else default_device()
    config = getattr(model, "config", None)
    if config is not None:
        check_fits(
            plan_memory(config, batch_size, steps, n_train=task.n_train).bytes(),
            device,
            f"training with batch_size={batch_size:,} for steps={steps:,}",
        )
    scaling = max((layer.scaling for layer in lora_layers(model).values()), default=0.0)
    threads.training_threads()  # the lab's one thread rule; says once if the machine is busy
    model.to(device)
    model.train()
    precision = autocast_dtype(device)
    optimizer = make_optimizer(model, lr, weight_decay)  # LoRA+ layers: B at lr_ratio * lr
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
        set_lr(optimizer, _lr_at(step, steps, lr))
        x, y = batch(step)
        if step == 0 and measure_memory:
            # The first step runs under the memory tracker; it is a real step all the same.
            memory = measure_step_memory(model, x, y, optimizer, precision)
            losses[step] = memory.loss
        else:
            losses[step] = training_step(model, x, y, optimizer, precision)
        if step % 25 == 0 or step == steps - 1:  # the loop's one host sync
            if not bool(torch.isfinite(losses[: step + 1]).all()):
                bar.close()
                first = int((~torch.isfinite(losses[: step + 1])).nonzero()[0, 0])
                value = float(losses[first])
                message, setting = diverged_message(first, value, lr, weight_decay, scaling)
                raise TrainingDiverged(message, first, value, setting, losses[:first].tolist())
            if progress:
                bar.set_postfix(loss=f"{losses[step].item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in params):  # the last update overflowed
        message, setting = diverged_message(steps, math.nan, lr, weight_decay, scaling)
        raise TrainingDiverged(message, steps, math.nan, setting, losses.tolist())
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
