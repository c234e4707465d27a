"""One frozen linear carrying K stacked adapters: the layer of the batched engine (batched.py).

Every adapted layer of a batched run holds K configurations' adapters along a new leading
dimension, and the K configurations' batches arrive one after another along the batch one:

    y[k] = x[k] W^T + scaling[k] * (drop_k(x[k]) A[k]^T) B[k]^T,   k = 0 .. K-1

    A: (K, R, in), B: (K, out, R), R = the largest rank in the group

A configuration of rank r < R uses only the first r rows of its A and columns of its B; the
rest are masked to zero in the forward pass, so they get exactly zero gradients and stay
exactly zero. A configuration that does not target a layer has rank 0 there.

A flavour adds to this what its lab.variants.registry.BatchedForm says: its own stacked
tensors (DoRA's magnitude), tensors that keep their start (LoRA-FA's A), its own output (DoRA's
row rescaling). An init that moves part of W into the adapter (PiSSA: W_res = W - s B0 A0) gives
each configuration its own residual base, computed as the shared x W^T minus a frozen low-rank
term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..variants.registry import PLAIN, BatchedForm

__all__ = ["DROPOUT_DRAWS", "FAST_BITS", "BatchedLoRALinear", "check_dropout_draw"]

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


class BatchedLoRALinear(nn.Module):
    """One frozen nn.Linear carrying K stacked adapters; input (K*B, ..., in) -> (K*B, ..., out).

    The leading dimension holds the K configurations' batches one after another. `ranks[k]` is
    configuration k's rank in this layer (0: it has no adapter here); `forms[k]` its flavour's
    BatchedForm (default: plain LoRA for all).
    """

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        scalings: Sequence[float],
        dropouts: Sequence[float],
        generators: Sequence[torch.Generator | None],
        forms: Sequence[BatchedForm] | None = None,
        dropout_draw: str = "exact",
    ) -> None:
        super().__init__()
        self.dropout_draw = check_dropout_draw(dropout_draw)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        k = len(ranks)
        if not k or not (len(scalings) == len(dropouts) == len(generators) == k):
            raise ValueError("ranks, scalings, dropouts and generators need one entry per config")
        forms = list(forms) if forms is not None else [PLAIN] * k
        if len(forms) != k or not all(isinstance(f, BatchedForm) for f in forms):
            raise ValueError("forms needs one lab.variants.registry.BatchedForm per config")
        # Each flavour's own output is computed over the whole stack (the others' rows as plain
        # LoRA), so one stack holds at most one flavour with an output of its own.
        outputs = {f.output for f, r in zip(forms, ranks, strict=True) if r and f.output}
        if len(outputs) > 1:
            raise ValueError("one stacked layer can hold only one flavour with its own output")
        self.output = outputs.pop() if outputs else None
        uses = [bool(r) and f.output is self.output is not None
                for f, r in zip(forms, ranks, strict=True)]  # fmt: skip
        self.register_buffer("uses_output", torch.tensor(uses), persistent=False)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n_configs, self.max_rank = k, max(max(ranks), 1)
        self.ranks = list(ranks)
        self.forms = forms
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
        self.extra_names: list[str] = []  # the flavours' own stacked tensors (DoRA: magnitude)

    def add_extra(self, name: str, shape: Sequence[int], fill: float = 1.0) -> None:
        """A flavour's own adapter tensor, stacked (K, *shape); unused entries hold `fill`."""
        if name in self.extra_names:
            return
        like = {"dtype": self.lora_A.dtype, "device": self.lora_A.device}
        self.register_parameter(name, nn.Parameter(torch.full((self.n_configs, *shape), fill,
                                                              **like)))  # fmt: skip
        self.extra_names.append(name)

    def stacked_parameters(self) -> dict[str, nn.Parameter]:
        """The layer's trainable stacks by name: lora_A, lora_B and the flavours' own."""
        extras = {name: getattr(self, name) for name in self.extra_names}
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, **extras}

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
        if self.output is not None:  # a flavour's own output (DoRA's rescaled rows)
            return self.output(self, out, h, u, a, b, self.uses_output)
        if u.dtype != out.dtype:
            return out + torch.bmm(u, b.transpose(1, 2)).to(out.dtype).view(out.shape)
        flat = torch.baddbmm(out.reshape(k, -1, self.out_features), u, b.transpose(1, 2))
        return flat.view(out.shape)

    def frozen_weights(self) -> torch.Tensor:
        """Each configuration's frozen W_k (K, out, in): W, minus its PiSSA residual if any."""
        w = self.base.weight.to(self.lora_A.dtype)[None]
        if self.init_A is None:
            return w
        return w - self.scaling * (self.init_B @ self.init_A)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"configs={self.n_configs}, ranks={self.ranks}"
        )
