"""Train many LoRA configurations at once over one shared frozen base.

A sweep's points differ only in their adapters: the frozen base is the same for all of them. So
instead of K training runs one after another, each step runs ONE forward and backward pass of
the base over K batches stacked along the batch dimension, and every adapted layer carries K
adapters stacked along a new leading dimension (batched_layer.BatchedLoRALinear beside this file,
trained by stacked_adamw.StackedAdamW). Each configuration's loss, gradients, Adam moments, learning
rate, data order and dropout masks stay its own, so it trains exactly as it would alone
(`lab.train`, as a sweep's run of one point does); the test suite checks that on the CPU to
float32 tolerance. Nothing is shared except the frozen weights, which is what makes the big
matmuls cheaper than K small ones.

The flavours: rsLoRA and LoRA+ are per-configuration scalings and learning rates; an init that
moves part of W into the adapter (PiSSA) gives each configuration its own residual base; a
flavour with a layer of its own trains here through the BatchedForm its module registers (DoRA:
a stacked magnitude and rescaled rows). A flavour without one, and a 4-bit base, are not batched:
`batchable` says False, and sweeps train those points one run at a time and say so.

On a CUDA device the dropout masks come from per-configuration CUDA generators instead of the
global CPU stream, so runs with dropout are statistically, not bitwise, the same as alone.
`dropout_draw="fast"` draws every configuration's mask at once from one generator of the chunk
(16 random bits per entry instead of a float per entry and a Bernoulli test): cheaper, and
statistically the same dropout, but no longer the masks training alone would draw.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import threads
from ..base import model_from_state
from ..checks import check_rank_fits as _check_rank_fits
from ..config import ALL_LINEAR, INITS, LoRAConfig
from ..model import IGNORE_INDEX, ToyTransformer, default_device
from ..step import autocast_dtype, forward_loss
from ..surgery import add_lora, build_layer
from ..tasks import Task
from ..text import plural
from ..training import (
    MAX_STEPS,
    _lr_at,
    check_count,
    check_fits,
    check_lr,
    check_seed,
    check_weight_decay,
    diverged_message,
    plan_memory,
)
from ..variants.registry import batched_form
from .batched_layer import DROPOUT_DRAWS, BatchedLoRALinear, check_dropout_draw
from .stacked_adamw import StackedAdamW

__all__ = [
    "AdapterSpec",
    "BatchedLoRALinear",
    "BatchedRun",
    "BatchedTrainer",
    "batchable",
    "StackedAdamW",
    "CPU_ROWS_PER_STEP",
    "DROPOUT_DRAWS",
    "train_batched",
]


@dataclass(frozen=True)
class AdapterSpec:
    """One configuration in a batched run: its adapter (a LoRAConfig), its lr and its seed."""

    config: LoRAConfig
    lr: float = 2e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.config, LoRAConfig):
            raise TypeError(
                f"config must be a lab.LoRAConfig, got {type(self.config).__name__} "
                "(e.g. AdapterSpec(LoRAConfig(rank=4, alpha=8), lr=2e-2))"
            )
        check_lr(self.lr)
        check_seed(self.seed)
        if not batchable(self.config):
            raise ValueError(
                f"{self.config.describe()} cannot be trained batched exactly; "
                "train it alone (lab.train), as sweeps do"
            )

    # The adapter's settings, read through to the config.
    targets = property(lambda self: self.config.targets)
    rank = property(lambda self: self.config.rank)
    alpha = property(lambda self: self.config.alpha)
    dropout = property(lambda self: self.config.dropout)
    rslora = property(lambda self: self.config.rslora)
    lr_ratio = property(lambda self: self.config.lr_ratio)

    @property
    def scaling(self) -> float:
        """alpha / rank (or alpha / sqrt(rank) for rsLoRA), exactly as LoRALinear computes it."""
        return self.config.scaling

    def add_to(self, model: nn.Module) -> list[str]:
        """Give `model` this spec's adapter exactly as a run of it alone starts.

        Seeds the global generator with `seed` first: LoRA's A initialisation and the adapter
        dropout masks come from it (the data order has its own generator, in lab.train).
        Returns add_lora's list of wrapped layers.
        """
        torch.manual_seed(self.seed)
        return add_lora(model, self.config)

    def targets_layer(self, name: str) -> bool:
        """True if a module with qualified name `name` is one of this spec's targets."""
        if self.targets == (ALL_LINEAR,):  # every linear the engine batches (never the head)
            return True
        return any(name == t or name.endswith("." + t) for t in self.targets)


def batchable(config: LoRAConfig) -> bool:
    """True if the batched engine trains `config` exactly as it trains alone.

    Plain LoRA with either scaling rule and any LoRA+ ratio, and every flavour whose module
    registers a batched form (lab.variants.registry.batched_form): yes. A flavour without one
    trains one run at a time; it is never trained here as plain LoRA.
    """
    return batched_form(config) is not None


@dataclass
class BatchedRun:
    """What a batched run produced: per-configuration losses and one model per configuration."""

    specs: list[AdapterSpec]
    losses: torch.Tensor  # (K, steps) training loss per configuration and step, on the CPU
    models: list[ToyTransformer]  # configuration k alone: the base plus its trained LoRALinears
    layers: dict[str, BatchedLoRALinear]  # the stacked adapters as trained (for inspection)
    wall_seconds: float  # the whole group's training loop
    # Per configuration: None, or lab.train's divergence message for a configuration whose loss
    # became nan/inf (it was stopped there: its adapter zeroed, its lr 0; the others went on).
    diverged: list[str | None] = field(default_factory=list)


def _batched_model(
    base: ToyTransformer,
    specs: Sequence[AdapterSpec],
    device: torch.device,
    dropout_draw: str = "exact",
) -> tuple[ToyTransformer, dict[str, BatchedLoRALinear]]:
    """The base (on the CPU) with every targeted linear replaced by a BatchedLoRALinear.

    A is initialised for configuration k exactly as `AdapterSpec.add_to` does: after
    torch.manual_seed(seed), LoRALinear wrappers are built in module order from the global
    generator, and its state afterwards seeds k's dropout masks, as alone the same stream would.
    """
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    used = [n for n in names if any(s.targets_layer(n) for s in specs)]
    for s in specs:
        unmatched = [t for t in s.targets if not any(s.targets_layer(n) for n in names)]
        if unmatched:
            leaves = sorted({n.rpartition(".")[2] for n in names})
            raise ValueError(f"targets {unmatched} match no layer; layers are named {leaves}")
        for n in used:
            if s.targets_layer(n):
                _check_rank_fits(s.rank, base.get_submodule(n), n)
    start: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    generators: list[torch.Generator | None] = []
    saved = torch.get_rng_state()
    try:
        for k, s in enumerate(specs):
            torch.manual_seed(s.seed)
            for n in used:
                if s.targets_layer(n):
                    # Built on a copy: an init may change the base (PiSSA), the shared W may not.
                    sub = copy.deepcopy(base.get_submodule(n))
                    w = sub.weight.detach().clone()
                    layer = build_layer(sub, s.config.replace(dropout=0.0))
                    start[k, n] = {key: t.detach() for key, t in layer.adapter_parameters().items()}
                    _check_base_change(s.config, n, w, layer)
            if device.type == "cpu":
                g = torch.Generator()
                g.set_state(torch.get_rng_state())
            else:
                g = torch.Generator(device).manual_seed(s.seed)
            generators.append(g if s.dropout > 0 else None)
    finally:
        torch.set_rng_state(saved)
    forms = [batched_form(s.config) for s in specs]
    for (k, n), tensors in start.items():  # a form names only tensors its layer has
        unknown = sorted((set(forms[k].extra) | set(forms[k].frozen)) - set(tensors))
        if unknown:
            raise ValueError(
                f"variant={specs[k].config.variant!r}: its batched form names {unknown}, which "
                f"its layer at {n} does not have (its adapter tensors: {sorted(tensors)})"
            )
    layers = {}
    for n in used:
        ranks = [s.rank if s.targets_layer(n) else 0 for s in specs]
        layer = BatchedLoRALinear(
            base.get_submodule(n),
            ranks,
            [s.scaling if r else 0.0 for s, r in zip(specs, ranks, strict=True)],
            [s.dropout if r else 0.0 for s, r in zip(specs, ranks, strict=True)],
            generators,
            forms,
            dropout_draw,
        )
        with torch.no_grad():
            for k, r in enumerate(ranks):
                if not r:
                    continue
                tensors = start[k, n]
                layer.lora_A[k, :r] = tensors["lora_A"]
                layer.lora_B[k, :, :r] = tensors["lora_B"]
                for key in forms[k].extra:  # the flavour's own tensors (DoRA's magnitude)
                    layer.add_extra(key, tensors[key].shape)
                    getattr(layer, key)[k] = tensors[key]
                if INITS[specs[k].config.init].changes_base:
                    layer.set_residual(k, tensors["lora_A"], tensors["lora_B"])
        parent, _, leaf = n.rpartition(".")
        setattr(base.get_submodule(parent), leaf, layer)
        layers[n] = layer
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in layer.stacked_parameters().values():
            p.requires_grad_(True)
    return base.to(device), layers


def _check_base_change(config: LoRAConfig, name: str, before: torch.Tensor, layer) -> None:
    """Refuse an init that changed W otherwise than the batched engine reproduces it.

    The engine keeps one shared W and gives a configuration whose init changes the base
    (changes_base) the residual W - scaling * B0 A0; any other init must leave W as it was.
    """
    after = layer.base.weight.detach()
    expected = before
    if INITS[config.init].changes_base:
        expected = before - layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach())
    tolerance = 1e-5 * max(1.0, float(before.abs().max()))
    if not torch.allclose(after, expected.to(after.dtype), rtol=0, atol=tolerance):
        raise ValueError(
            f"{name}: init={config.init!r} is registered as batched, but it changed W otherwise "
            "than the batched engine reproduces (W, or W - scaling * B0 A0 with changes_base); "
            "register it with batched=False so that it trains one run at a time"
        )


def _extract(
    base_state: dict[str, torch.Tensor],
    config,
    layers: dict[str, BatchedLoRALinear],
    spec: AdapterSpec,
    k: int,
    device: torch.device,
) -> ToyTransformer:
    """Configuration k as an ordinary model: the base plus LoRALinears holding its adapters."""
    # Its own copy of the base: an init that changes the base (PiSSA) must not write into the
    # shared state that the other configurations (and later chunks) start from.
    model = model_from_state(config, {k: v.clone() for k, v in base_state.items()}).to(device)
    with torch.random.fork_rng(devices=[]):  # A's init is overwritten below: keep the stream
        spec.add_to(model)
    with torch.no_grad():
        for name, layer in layers.items():
            if spec.targets_layer(name):
                target = model.get_submodule(name).adapter_parameters()
                target["lora_A"].copy_(layer.lora_A[k, : spec.rank])
                target["lora_B"].copy_(layer.lora_B[k, :, : spec.rank])
                for key in layer.forms[k].extra:
                    target[key].copy_(getattr(layer, key)[k])
    return model


# On a CPU a configuration's own step at batch 64 already runs the matmuls near the cores' peak;
# stacking more rows only pushes activations out of cache (benchmarks/results/bench.md, "How it
# scales with grid size": at batch 64 two configurations per step were fastest, at batch 8
# sixteen). So on a CPU a batched step holds about this many sequences in all.
CPU_ROWS_PER_STEP = 128


class BatchedTrainer:
    """The state of a batched run, one `step()` at a time (train_batched drives it).

    `base` is not modified (a CPU copy is made). Learning rates follow lab.train's schedule
    (5% warmup, cosine to 10%) per configuration; each configuration draws its batches from
    torch.Generator().manual_seed(seed), as lab.train does. On CUDA the forward runs under bf16
    autocast, as in lab.train. `dropout_draw` is "exact" (each configuration's own masks, as
    alone) or "fast" (one cheaper draw for the chunk; see BatchedLoRALinear._fast_dropped).
    """

    def __init__(
        self,
        base: ToyTransformer,
        task: Task,
        specs: Sequence[AdapterSpec],
        steps: int,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        weight_decay: float = 0.0,
        dropout_draw: str = "exact",
    ) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError("specs is empty: give at least one AdapterSpec")
        bad = [s for s in specs if not isinstance(s, AdapterSpec)]
        if bad:
            raise TypeError(f"specs must be AdapterSpecs, got {type(bad[0]).__name__}")
        check_count("steps", steps, MAX_STEPS)
        check_count("batch_size", batch_size)
        check_weight_decay(weight_decay)
        check_dropout_draw(dropout_draw)
        self.device = torch.device(device) if device is not None else default_device()
        self.weight_decay = weight_decay
        self.stopped: list[str | None] = [None] * len(specs)
        self.base_state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
        self.config = base.config
        work = model_from_state(base.config, {k: v.clone() for k, v in self.base_state.items()})
        model, layers = _batched_model(work, specs, self.device, dropout_draw)
        plan = plan_memory(base.config, batch_size, steps, [(s.targets, s.rank) for s in specs])
        check_fits(plan.bytes(len(specs)), self.device, f"{plural(len(specs), 'configuration')} "
                   f"with batch_size={batch_size:,} for steps={steps:,}")  # fmt: skip
        self.model, self.layers = model, layers
        self.model.train()
        self.specs, self.steps, self.batch_size, self.task = specs, steps, batch_size, task
        params, scales = [], []
        forms = [batched_form(s.config) for s in specs]
        for layer in self.layers.values():
            for name, p in layer.stacked_parameters().items():
                params.append(p)
                # LoRA+ trains lora_B and one-dimensional tensors (DoRA's magnitude, as PEFT
                # groups it) at lr_ratio times the rate; a tensor a flavour keeps at its start
                # (LoRA-FA's A) at rate 0, which AdamW's decoupled decay leaves untouched too.
                ratio = name == "lora_B" or p.dim() == 2
                scale = [(s.lr_ratio if ratio else 1.0) * (name not in f.frozen)
                         for s, f in zip(specs, forms, strict=True)]  # fmt: skip
                scales.append(None if all(x == 1 for x in scale) else scale)
        self.optimizer = StackedAdamW(params, len(specs), weight_decay, scales)
        self.autocast = autocast_dtype(self.device)
        self.train_x = task.train_inputs.to(self.device)
        self.train_y = task.train_targets.to(self.device)
        # Every step's batch indices up front, per seed, as lab.train draws them: row `step` of
        # `order` is configuration 0's batch, then configuration 1's, ... (K * batch_size).
        seeds = sorted({s.seed for s in specs})
        n = len(self.train_x)
        drawn = torch.stack([
            torch.randint(n, (steps, batch_size), generator=torch.Generator().manual_seed(seed))
            for seed in seeds
        ])  # fmt: skip
        which = torch.tensor([seeds.index(s.seed) for s in specs])
        self.order = drawn[which].transpose(0, 1).reshape(steps, -1).to(self.device)
        self.step_index = 0

    def step(self) -> torch.Tensor:
        """One training step of every configuration; returns their losses (K,) on the device."""
        k, step = len(self.specs), self.step_index
        if step >= self.steps:
            raise RuntimeError(f"all {self.steps} steps are done; make a new BatchedTrainer")
        idx = self.order[step]  # configuration k's batch is block k
        x, y = self.train_x[idx], self.train_y[idx]
        token_loss = forward_loss(self.model, x, y, self.autocast, reduction="none").view(k, -1)
        counted = (y != IGNORE_INDEX).view(k, -1).sum(1)
        loss = token_loss.sum(1) / counted  # (K,) each configuration's own mean loss
        loss.sum().backward()  # the sum's gradient w.r.t. slice k is loss k's gradient
        lrs = [0.0 if self.stopped[i] else _lr_at(step, self.steps, s.lr)
               for i, s in enumerate(self.specs)]  # fmt: skip
        self.optimizer.step(lrs)
        self.optimizer.zero_grad()
        self.step_index += 1
        return loss.detach()

    def stop(self, k: int, message: str) -> None:
        """Stop configuration k (it diverged): zero its adapter and state, lr 0 from now on.

        Its slice never touches the others' (each configuration's adapters act on its own
        batch only), so zeroing it just keeps its nan/inf out of the stored tensors.
        """
        self.stopped[k] = message
        with torch.no_grad():
            for p, m, v in zip(self.optimizer.params, self.optimizer.exp_avg,
                               self.optimizer.exp_avg_sq, strict=True):  # fmt: skip
                p[k].zero_()
                m[k].zero_()
                v[k].zero_()

    def check_finite(self, losses: torch.Tensor) -> None:
        """Stop every configuration whose losses (steps so far, K) or adapters hold nan/inf."""
        finite = torch.isfinite(losses).all(0)
        for layer in self.layers.values():
            for p in layer.stacked_parameters().values():
                finite &= torch.isfinite(p.detach()).flatten(1).all(1)
        for k in (~finite).nonzero().flatten().tolist():
            if self.stopped[k]:
                continue
            bad = (~torch.isfinite(losses[:, k])).nonzero().flatten()
            step = int(bad[0]) if len(bad) else self.step_index
            value = float(losses[step, k]) if len(bad) else math.nan
            spec = self.specs[k]
            self.stop(k, diverged_message(step, value, spec.lr, self.weight_decay,
                                          spec.scaling)[0])  # fmt: skip

    def models(self) -> list[ToyTransformer]:
        """Every configuration as an ordinary model with its LoRALinears, as trained so far."""
        return [
            _extract(self.base_state, self.config, self.layers, s, i, self.device)
            for i, s in enumerate(self.specs)
        ]


def train_batched(
    base: ToyTransformer,
    task: Task,
    specs: Sequence[AdapterSpec],
    steps: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
    weight_decay: float = 0.0,
    dropout_draw: str = "exact",
) -> BatchedRun:
    """Train every spec's adapter on `task` together, each exactly as it would train alone.

    See BatchedTrainer for the schedule, data order and precision; `base` is not modified.
    A configuration whose loss becomes nan or inf is stopped (its adapter zeroed, lr 0) and
    named in the result's `diverged`; the others train on unaffected. `dropout_draw="fast"`
    draws dropout masks more cheaply but not as alone (statistically the same dropout).
    """
    trainer = BatchedTrainer(base, task, specs, steps, batch_size, device, weight_decay,
                             dropout_draw)  # fmt: skip
    threads.training_threads()  # the lab's one thread rule; says once if the machine is busy
    device, k = trainer.device, len(trainer.specs)
    losses = torch.zeros(steps, k, device=device)
    bar = tqdm(
        range(steps),
        desc=f"train {k} config{'s' if k != 1 else ''}",
        disable=not progress,
        leave=False,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for step in bar:
        losses[step] = trainer.step()
        if step % 25 == 0 or step == steps - 1:  # the loop's one host sync
            trainer.check_finite(losses[: step + 1])
            if progress:
                bar.set_postfix(mean_loss=f"{losses[step].mean().item():.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    bar.close()
    return BatchedRun(
        specs=trainer.specs,
        losses=losses.T.cpu(),
        models=trainer.models(),
        layers=trainer.layers,
        wall_seconds=wall,
        diverged=list(trainer.stopped),
    )
