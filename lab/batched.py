"""Train many LoRA configurations at once over one shared frozen base.

A sweep's points differ only in their adapters: the frozen base is the same for all of them. So
instead of K training runs one after another, each step runs ONE forward and backward pass of
the base over K batches stacked along the batch dimension, and every adapted layer carries K
adapters stacked along a new leading dimension:

    y[k] = x[k] W^T + scaling[k] * (drop_k(x[k]) A[k]^T) B[k]^T,   k = 0 .. K-1

    A: (K, R, in), B: (K, out, R), R = the largest rank in the group

A configuration of rank r < R uses only the first r rows of its A and columns of its B; the
rest are masked to zero in the forward pass, so they get exactly zero gradients and stay
exactly zero. A configuration that does not target a layer has rank 0 there. Each
configuration's loss, gradients, Adam moments, learning rate, data order and dropout masks stay
its own, so it trains exactly as it would alone (`lab.sweep.run_point`); the test suite checks
that on the CPU to float32 tolerance. Nothing is shared except the frozen weights, which is what
makes the big matmuls cheaper than K small ones.

The flavours: rsLoRA and LoRA+ are per-configuration scalings and learning rates; PiSSA gives
configuration k its own residual base W - s B0_k A0_k, computed as the shared x W^T minus a
frozen low-rank term; DoRA adds a stacked magnitude (K, out) and rescales configuration k's rows
by m_k / ||W_k + ΔW_k||. A 4-bit base is not batched (its sweeps train one by one).

On a CUDA device the dropout masks come from per-configuration CUDA generators instead of the
global CPU stream, so runs with dropout are statistically, not bitwise, the same as alone.
`dropout_draw="fast"` draws every configuration's mask at once from one generator of the chunk
(16 random bits per entry instead of a float per entry and a Bernoulli test): cheaper, and
statistically the same dropout, but no longer the masks training alone would draw.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import threads
from .base import model_from_state
from .checks import check_rank_fits as _check_rank_fits
from .config import ALL_LINEAR, INITS, VARIANTS, LoRAConfig
from .memory import analytic_memory
from .model import IGNORE_INDEX, ModelConfig, ToyTransformer, default_device
from .step import autocast_dtype, forward_loss
from .surgery import add_lora, build_layer
from .tasks import SEQ_LEN, Task
from .training import (
    MAX_STEPS,
    _lr_at,
    check_count,
    check_fits,
    check_lr,
    check_seed,
    check_weight_decay,
    diverged_message,
)
from .variants.dora import row_scale

__all__ = [
    "AdapterSpec",
    "BatchedLoRALinear",
    "BatchedRun",
    "BatchedTrainer",
    "batchable",
    "StackedAdamW",
    "bytes_per_config",
    "CPU_ROWS_PER_STEP",
    "DROPOUT_DRAWS",
    "default_max_configs",
    "max_configs_for_memory",
    "train_batched",
]

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, which lab.train uses
# How a batched step draws dropout masks: "exact", each configuration from its own generator as
# nn.Dropout would alone (the default: batched == alone); "fast", all at once (statistically
# the same dropout, not the same masks; see BatchedLoRALinear._fast_dropped).
DROPOUT_DRAWS = ("exact", "fast")
FAST_BITS = 16  # random bits per mask entry in the fast draw: keep-probability error < 2**-16


def check_dropout_draw(dropout_draw: object) -> str:
    """`dropout_draw` if it is one of DROPOUT_DRAWS; ValueError naming it otherwise."""
    if not isinstance(dropout_draw, str) or dropout_draw not in DROPOUT_DRAWS:
        raise ValueError(
            f"dropout_draw={dropout_draw!r}: expected one of {', '.join(map(repr, DROPOUT_DRAWS))}"
        )
    return dropout_draw


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

    Plain LoRA with either scaling rule and any LoRA+ ratio: yes. A flavour or an init the
    registry marks as not batched (DoRA, PiSSA) trains one by one.
    """
    return VARIANTS[config.variant].batched and INITS[config.init].batched


class BatchedLoRALinear(nn.Module):
    """One frozen nn.Linear carrying K stacked adapters; input (K*B, ..., in) -> (K*B, ..., out).

    The leading dimension holds the K configurations' batches one after another. `ranks[k]` is
    configuration k's rank in this layer (0: it has no adapter here).
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        scalings: Sequence[float],
        dropouts: Sequence[float],
        generators: Sequence[torch.Generator | None],
        dora: Sequence[bool] | None = None,
        dropout_draw: str = "exact",
    ) -> None:
        super().__init__()
        self.dropout_draw = check_dropout_draw(dropout_draw)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        k = len(ranks)
        if not k or not (len(scalings) == len(dropouts) == len(generators) == k):
            raise ValueError("ranks, scalings, dropouts and generators need one entry per config")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_configs, self.max_rank = k, max(max(ranks), 1)
        self.ranks = list(ranks)
        self.dropouts = [float(p) for p in dropouts]
        self.generators = list(generators)
        w = base.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        r, device = self.max_rank, w.device
        self.lora_A = nn.Parameter(torch.zeros(k, r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(k, self.out_features, r, dtype=dtype, device=device))
        mask = (torch.arange(r) < torch.tensor(self.ranks)[:, None]).to(dtype)  # (K, R)
        self.register_buffer("rank_mask", mask.to(device), persistent=False)
        scale = torch.tensor([float(s) for s in scalings], dtype=dtype).view(k, 1, 1)
        self.register_buffer("scaling", scale.to(device), persistent=False)
        # An initialisation that moves part of W into the adapter (PiSSA: W_res = W - s B0 A0)
        # gives each configuration its own residual base. The shared W stays as it is and each
        # configuration subtracts its own s B0 A0 (frozen, low rank) in the forward pass.
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        # DoRA configurations: a magnitude per output feature, m / ||W_k + ΔW_k|| rescaling
        # their rows (1 for the others, whose magnitude entries stay unused).
        dora = [bool(d) for d in dora] if dora is not None else [False] * k
        if len(dora) != k:
            raise ValueError("dora needs one entry per config")
        self.dora = dora
        self.magnitude = None
        if any(dora):
            mask = torch.tensor(dora, device=device)[:, None]
            self.register_buffer("dora_mask", mask, persistent=False)
            self.magnitude = nn.Parameter(
                torch.ones(k, self.out_features, dtype=dtype, device=device)
            )

    def set_residual(self, k: int, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Configuration k's base is W - scaling[k] * b0 @ a0 (its adapter starts at a0, b0)."""
        if self.init_A is None:
            self.init_A = torch.zeros_like(self.lora_A, requires_grad=False)
            self.init_B = torch.zeros_like(self.lora_B, requires_grad=False)
        r = a0.shape[0]
        with torch.no_grad():
            self.init_A[k].zero_()
            self.init_B[k].zero_()
            self.init_A[k, :r] = a0
            self.init_B[k, :, :r] = b0

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Each configuration's dropout on its own slice (K, B, ..., in), from its own generator.

        The mask is drawn exactly as nn.Dropout draws it on the CPU (bernoulli(1 - p), divided
        by 1 - p, multiplied in), with the same shape, so a configuration sees the same masks it
        would see training alone. Configurations without dropout here draw nothing: only their
        slices of the mask are filled with ones. With dropout_draw="fast", `_fast_dropped`.
        """
        drop = [p > 0 and r > 0 for p, r in zip(self.dropouts, self.ranks, strict=True)]
        if not self.training or not any(drop):
            return x
        if self.dropout_draw == "fast":
            return self._fast_dropped(x, drop)
        noise = torch.empty_like(x)
        for k, p in enumerate(self.dropouts):
            if drop[k]:
                noise[k].bernoulli_(1 - p, generator=self.generators[k]).div_(1 - p)
            else:
                noise[k].fill_(1)
        return x * noise

    def _fast_dropped(self, x: torch.Tensor, drop: list[bool]) -> torch.Tensor:
        """Every configuration's dropout from one draw of FAST_BITS random bits per entry.

        Entry j of configuration k is kept when its 16-bit integer is below round((1 - p_k) *
        2**16), and scaled by 1 / (1 - p_k) as nn.Dropout scales it: values 0 or 1 / (1 - p_k),
        kept with probability 1 - p_k to within 2**-16. One int64 draw gives four entries, from
        the generator of the first configuration with dropout: about a third of the exact
        draw's time on a CPU, but not the masks training alone draws.
        """
        k = self.n_configs
        n = x[0].numel()
        words = -(-k * n * FAST_BITS // 64)
        gen = next(g for g, d in zip(self.generators, drop, strict=True) if d)
        bits = torch.empty(words, dtype=torch.int64, device=x.device)
        bits.random_(-(2**63), 2**63 - 1, generator=gen)
        u = bits.view(torch.int16)[: k * n].view(x.shape)  # uniform on [-2**15, 2**15)
        keep = [1 - p if d else 1.0 for p, d in zip(self.dropouts, drop, strict=True)]
        # A threshold of 2**15 keeps every entry (configurations without dropout here).
        limit = torch.tensor([round(q * 2**FAST_BITS) - 2**15 for q in keep], device=x.device)
        scale = torch.tensor([1 / q for q in keep], dtype=x.dtype, device=x.device)
        shape = (k,) + (1,) * (x.dim() - 1)
        return x * (u < limit.view(shape)) * scale.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K*B, ..., in) -> (K*B, ..., out)."""
        k = self.n_configs
        if x.shape[0] % k:
            raise ValueError(
                f"input batch {x.shape[0]} is not a whole number of batches for {k} configurations"
            )
        out = self.base(x)
        xs = x.to(self.lora_A.dtype).reshape(k, x.shape[0] // k, *x.shape[1:])  # (K, B, ..., in)
        if self.init_A is not None:  # each configuration's own residual base (PiSSA)
            u0 = torch.bmm(xs.reshape(k, -1, self.in_features), self.init_A.transpose(1, 2))
            moved = torch.bmm(u0 * self.scaling, self.init_B.transpose(1, 2))  # (K, N, out)
            out = out - moved.to(out.dtype).view(out.shape)
        h = self._dropped(xs).reshape(k, -1, self.in_features)  # (K, N, in)
        a = self.lora_A * self.rank_mask[:, :, None]  # padded rows masked: their grads are 0
        b = self.lora_B * self.rank_mask[:, None, :]
        u = torch.bmm(h, a.transpose(1, 2)) * self.scaling  # (K, N, R), scaled while narrow
        if self.magnitude is not None:
            return self._dora(out, h, u, a, b)
        if u.dtype != out.dtype:
            return out + torch.bmm(u, b.transpose(1, 2)).to(out.dtype).view(out.shape)
        flat = torch.baddbmm(out.reshape(k, -1, self.out_features), u, b.transpose(1, 2))
        return flat.view(out.shape)

    def _frozen_weights(self) -> torch.Tensor:
        """Each configuration's frozen W_k (K, out, in): W, minus its PiSSA residual if any."""
        w = self.base.weight.to(self.lora_A.dtype)[None]
        if self.init_A is None:
            return w
        return w - self.scaling * (self.init_B @ self.init_A)

    def _dora(self, out, h, u, a, b) -> torch.Tensor:
        """DoRA's rows, as lab.variants.dora computes them, for the configurations that use it.

        result = out + (m/n - 1) * base_part + (m/n) * lora, n = ||W_k + ΔW_k|| per row
        (detached); base_part is x W_k^T (the dropped input's, for DoRA with dropout).
        """
        k = self.n_configs
        w_k = self._frozen_weights()
        norm = (w_k + self.scaling * (b @ a)).norm(dim=2).detach()  # (K, out)
        # m / n, and 1 on a row with no direction (n = 0), as DoRALinear does: never 0/0.
        scale = torch.where(self.dora_mask, row_scale(self.magnitude, norm), torch.ones_like(norm))
        scale = scale[:, None, :]  # (K, 1, out)
        out3 = out.reshape(k, -1, self.out_features)
        bias = self.base.bias
        base_part = out3.to(scale.dtype) if bias is None else (out3 - bias).to(scale.dtype)
        if self.training and any(
            d and p > 0 for d, p in zip(self.dora, self.dropouts, strict=True)
        ):
            dropped = torch.matmul(h, w_k.transpose(1, 2))  # (K, N, out): x_dropped W_k^T
            use = torch.tensor([d and p > 0 for d, p in zip(self.dora, self.dropouts, strict=True)],
                               device=out.device)[:, None, None]  # fmt: skip
            base_part = torch.where(use, dropped, base_part)
        lora = torch.bmm(u, b.transpose(1, 2))  # (K, N, out)
        extra = (scale - 1) * base_part + scale * lora
        return (out3 + extra.to(out.dtype)).view(out.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"configs={self.n_configs}, ranks={self.ranks}"
        )


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
    init: dict[tuple[int, str], torch.Tensor] = {}
    generators: list[torch.Generator | None] = []
    saved = torch.get_rng_state()
    try:
        for k, s in enumerate(specs):
            torch.manual_seed(s.seed)
            for n in used:
                if s.targets_layer(n):
                    # Built on a copy: an init may change the base (PiSSA), the shared W may not.
                    sub = copy.deepcopy(base.get_submodule(n))
                    layer = build_layer(sub, s.config.replace(dropout=0.0))
                    m0 = getattr(layer, "magnitude", None)
                    init[k, n] = (layer.lora_A.detach(), layer.lora_B.detach(), m0)
            if device.type == "cpu":
                g = torch.Generator()
                g.set_state(torch.get_rng_state())
            else:
                g = torch.Generator(device).manual_seed(s.seed)
            generators.append(g if s.dropout > 0 else None)
    finally:
        torch.set_rng_state(saved)
    layers = {}
    for n in used:
        ranks = [s.rank if s.targets_layer(n) else 0 for s in specs]
        layer = BatchedLoRALinear(
            base.get_submodule(n),
            ranks,
            [s.scaling if r else 0.0 for s, r in zip(specs, ranks, strict=True)],
            [s.dropout if r else 0.0 for s, r in zip(specs, ranks, strict=True)],
            generators,
            [bool(r) and s.config.variant == "dora" for s, r in zip(specs, ranks, strict=True)],
            dropout_draw,
        )
        with torch.no_grad():
            for k, r in enumerate(ranks):
                if r:
                    a0, b0, m0 = init[k, n]
                    layer.lora_A[k, :r] = a0
                    layer.lora_B[k, :, :r] = b0
                    if m0 is not None:
                        layer.magnitude[k] = m0.detach()
                    if INITS[specs[k].config.init].changes_base:
                        layer.set_residual(k, a0, b0)
        parent, _, leaf = n.rpartition(".")
        setattr(base.get_submodule(parent), leaf, layer)
        layers[n] = layer
    for p in base.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in _stacked_parameters(layer):
            p.requires_grad_(True)
    return base.to(device), layers


def _stacked_parameters(layer: BatchedLoRALinear) -> list[nn.Parameter]:
    """A layer's trainable stacks: lora_A, lora_B and, with DoRA configurations, magnitude."""
    return [layer.lora_A, layer.lora_B] + ([layer.magnitude] if layer.magnitude is not None else [])


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
                target = model.get_submodule(name)
                target.lora_A.copy_(layer.lora_A[k, : spec.rank])
                target.lora_B.copy_(layer.lora_B[k, :, : spec.rank])
                if layer.magnitude is not None and hasattr(target, "magnitude"):
                    target.magnitude.copy_(layer.magnitude[k])
    return model


def bytes_per_config(config: ModelConfig, specs: Sequence[AdapterSpec], batch_size: int) -> int:
    """A generous estimate of what one more configuration adds to a batched step's memory.

    From `analytic_memory` for the largest adapter among `specs`. Activations dominate; dropout
    masks, backward temporaries and the allocator's slack can double them, so this plans for
    twice the prediction.
    """

    def size(s: AdapterSpec) -> int:  # all-linear: the toy's six block linears
        return s.rank * (6 if s.targets == (ALL_LINEAR,) else len(s.targets))

    largest = max(specs, key=size)
    predicted = analytic_memory(
        config, batch_size, SEQ_LEN, lora_targets=largest.targets, lora_rank=largest.rank
    )
    return 2 * (predicted.activations + predicted.gradients + predicted.optimizer)


def max_configs_for_memory(
    bytes_per_config: int, device: torch.device | str, fraction: float = 0.5
) -> int:
    """How many configurations fit in `fraction` of the device's free memory (at least 1)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30  # unknown: assume 4 GiB
    return max(1, int(free * fraction) // max(1, bytes_per_config))


# On a CPU a configuration's own step at batch 64 already runs the matmuls near the cores' peak;
# stacking more rows only pushes activations out of cache (benchmarks/results/bench.md, "How it
# scales with grid size": at batch 64 two configurations per step were fastest, at batch 8
# sixteen). So on a CPU a batched step holds about this many sequences in all.
CPU_ROWS_PER_STEP = 128


def default_max_configs(batch_size: int, device: torch.device | str, bytes_per_config: int) -> int:
    """How many configurations to train per batched step on `device`, by default.

    On CUDA: as many as fit in half the free memory. On a CPU: also no more than
    CPU_ROWS_PER_STEP // batch_size (at least 1), where the CPU measured fastest.
    """
    device = torch.device(device)
    cap = max_configs_for_memory(bytes_per_config, device)
    if device.type != "cuda":
        cap = min(cap, max(1, CPU_ROWS_PER_STEP // batch_size))
    return cap


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
        needed = len(specs) * bytes_per_config(base.config, specs, batch_size)
        needed += 8 * steps * batch_size * (len(specs) + len({s.seed for s in specs}))
        check_fits(needed, self.device, f"{len(specs)} configuration{'s' * (len(specs) != 1)} "
                   f"with batch_size={batch_size:,} for steps={steps:,}")  # fmt: skip
        self.model, self.layers = model, layers
        self.model.train()
        self.specs, self.steps, self.batch_size, self.task = specs, steps, batch_size, task
        params, scales = [], []
        ratios = [s.lr_ratio for s in specs]
        plain = all(r == 1 for r in ratios)
        for layer in self.layers.values():
            for p in _stacked_parameters(layer):
                params.append(p)
                # LoRA+ trains lora_B (and, as PEFT groups it, DoRA's magnitude) at lr_ratio.
                scales.append(None if plain or p is layer.lora_A else ratios)
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
            for p in _stacked_parameters(layer):
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
