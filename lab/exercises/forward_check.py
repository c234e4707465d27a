"""Exercise 1: the LoRA forward pass, checked against lab.LoRALinear's in eval and train mode."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..lora import LoRALinear
from .compare import _bad_tensor, _close, _factor, _match_factor, _where
from .feedback import ACTIVE_WATCHES, Feedback, _call, _no, _safe

__all__ = ["check_forward"]


IN, OUT, RANK, ALPHA = 16, 12, 4, 6.0  # not square: swapping A and B cannot go unnoticed
SCALING = ALPHA / RANK  # 1.5, distinct from 1/scaling, sqrt(rank), rank and 1/rank
# The update came out k times the expected one: what that usually means. Exercises 1 and 2
# share the scaling slips (the forward's update and the merge's ΔW are both scaling · B A).
_SCALING_FACTORS = {
    1 / SCALING: "the scaling is not applied: multiply by `scaling`",
    SCALING: "the scaling is applied twice",
    1 / SCALING**2: "you divided by `scaling`: multiply by it (scaling = alpha / r)",
    1 / RANK: "you divided by the rank again: `scaling` already is alpha / r",
    math.sqrt(RANK): "that is alpha / sqrt(r), rsLoRA's rule: use `scaling` as given (alpha / r)",
    float(RANK): "you multiplied by the rank: that gives alpha, not alpha / r",
}
_FORWARD_FACTORS = {
    0.0: "your output is the frozen layer's alone: add the low-rank path",
    **_SCALING_FACTORS,
    1 / SCALING: "the scaling is not applied: multiply the low-rank path by `scaling`",
    -1.0: "the low-rank path has the wrong sign: it is added to the frozen path",
}


class _FixedDropout(nn.Dropout):
    """nn.Dropout whose mask is fixed (so train mode has one right answer); logs input shapes."""

    def __init__(self, p: float, mask: torch.Tensor) -> None:
        super().__init__(p)
        self.mask, self.shapes = mask, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        if not self.training:
            return x
        if x.shape != self.mask.shape:  # applied to something other than x: random, as usual
            return F.dropout(x, self.p, True)
        return x * self.mask / (1 - self.p)


def _forward_case(
    n_in: int = IN, n_out: int = OUT, rank: int = RANK, alpha: float = ALPHA, seed: int = 0
) -> tuple[LoRALinear, torch.Tensor]:
    """A lab LoRALinear (bias, non-zero B, dropout 0.5) and an input (2, 3, n_in); seeded."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(n_in, n_out), rank, alpha, dropout=0.5)
    with torch.no_grad():
        for t in (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B):
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
    x = torch.randn(2, 3, n_in, generator=g)
    layer.dropout = _FixedDropout(0.5, (torch.rand(x.shape, generator=g) > 0.5).float())
    return layer, x


FORWARD_CALL = "my_forward(x, base, A, B, scaling, dropout)"


class _BuildsDelta(TorchDispatchMode):
    """Watches every tensor op; `built` is set when one computed from A or B makes (out, in).

    The update needs only thin products, (..., in) -> (..., r) -> (..., out): a tensor as large
    as the weight, made from the adapters, is B A (or its transpose) being built, whatever the
    code calls it (B @ A, einsum, a broadcast product summed).
    """

    kind = "builds_delta"

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.weight_dims = sorted((B.shape[0], A.shape[1]))
        self.derived = {id(A), id(B)}
        self.alive: list[torch.Tensor] = [A, B]  # keeps ids unique while the call runs
        self.built = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(id(t) in self.derived for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.derived.add(id(t))
                    self.alive.append(t)
                    if sorted(d for d in t.shape if d != 1) == self.weight_dims:
                        self.built = True
        return out

    def __enter__(self) -> _BuildsDelta:
        ACTIVE_WATCHES.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        ACTIVE_WATCHES.remove(self)
        super().__exit__(*exc)


def _forward_hint(
    out: torch.Tensor, ref: torch.Tensor, frozen: torch.Tensor, bias: torch.Tensor
) -> str:
    """What a wrong eval-mode output most likely did; the message says where it differs."""
    if _close(out, ref - bias):
        return "you left out the bias: base(x) includes it (x @ base.weight.T alone does not)"
    if _close(out, ref + bias):
        return "the bias is added twice: base(x) already includes it"
    for shift, note in ((0, ""), (1, "; and the bias is missing: base(x) includes it")):
        update = out + shift * bias - frozen  # what was added to the frozen path (with bias)
        if hint := _match_factor(_factor(update, ref - frozen), _FORWARD_FACTORS):
            return hint + note
    if _close(out, ref - frozen):
        return "you returned only the low-rank update: add the frozen path base(x)"
    if _close(out, SCALING * frozen + (ref - frozen)):
        return "you scaled the frozen path too: only the low-rank update gets `scaling`"
    k = _factor(out - frozen, ref - frozen)
    if k is not None:
        return f"the low-rank update is {k:.3g} times the expected one"
    return "compare with y = base(x) + scaling * (dropout(x) @ A.T @ B.T)"


@_safe
def check_forward(fn: Callable) -> Feedback:
    """Exercise 1: fn(x, base, A, B, scaling, dropout) must equal lab.LoRALinear's forward."""
    todo = "Write the body: the frozen layer plus the scaled low-rank update dropout(x) Aᵀ Bᵀ."
    layer, x = _forward_case()
    base, A, B, drop = layer.base, layer.lora_A, layer.lora_B, layer.dropout
    shapes = (
        f"x is (..., in) = (..., {IN}), base.weight (out, in) = {tuple(base.weight.shape)}, "
        f"A (r, in) = {tuple(A.shape)}, B (out, r) = {tuple(B.shape)}: "
        "the update is x @ A.T @ B.T"
    )
    hints = {w: shapes for w in ("shape", "size")}

    def run(lay: LoRALinear, xs: torch.Tensor, train: bool) -> tuple[object, Feedback | None]:
        """The student's raw output with dropout in train or eval mode, or feedback."""
        lay.dropout.train(train)
        inputs = {"x": xs, "base.weight": lay.base.weight, "A": lay.lora_A, "B": lay.lora_B}
        if lay.base.bias is not None:
            inputs["base.bias"] = lay.base.bias
        saved = {k: v.detach().clone() for k, v in inputs.items()}
        args = (xs, lay.base, lay.lora_A, lay.lora_B, lay.scaling, lay.dropout)
        out, problem = _call(fn, "your function", todo, *args, hints=hints, call=FORWARD_CALL)
        if problem:
            return None, problem
        rank = lay.lora_A.shape[0]
        if isinstance(out, torch.Tensor) and out.shape[-1:] == (rank,) != (lay.base.out_features,):
            return None, _no(f"your output has shape {tuple(out.shape)}: x @ A.T; apply B too")
        changed = [k for k, v in inputs.items() if not torch.equal(v.detach(), saved[k])]
        if changed:
            return None, _no(f"your function changed {changed[0]} in place: a forward must not")
        want = xs.new_empty(*xs.shape[:-1], lay.base.out_features)
        problem = _bad_tensor(out, "your function", want)
        return (None, problem) if problem else (out, None)

    with torch.no_grad():
        frozen, ref = base(x), layer.eval()(x)
    raw, problem = run(layer, x, train=False)
    if problem:
        return problem
    out = raw.detach()
    again, _ = run(layer, x, train=False)
    if isinstance(again, torch.Tensor) and not torch.equal(again.detach(), out):
        return _no(
            "in eval mode two calls gave different outputs: dropout is active at evaluation. "
            "Call the `dropout` module (off in eval mode); F.dropout defaults to training=True"
        )
    if not _close(out, ref):
        hint = _forward_hint(out, ref, frozen, base.bias.detach())
        return _no(f"your output differs from the reference {_where(out - ref)}: {hint}")
    with _BuildsDelta(A, B) as watch:
        run(layer, x, train=True)
        run(layer, x, train=False)  # last: the checks below expect dropout in eval mode
    if watch.built:
        return _no(
            f"your forward builds B @ A, an (out, in) = ({OUT}, {IN}) matrix as large as the "
            "weight: the exercise says never to. Two thin matmuls give the same update, "
            "(dropout(x) @ A.T) @ B.T, from (..., in) to (..., r) to (..., out)"
        )

    # Training needs gradients to reach A and B through the output.
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    want_grads = torch.autograd.grad((layer(x) * weights).sum(), (A, B))
    if not raw.requires_grad:
        return _no(
            "your output carries no gradient, so training would never change A or B: do not "
            "compute it under torch.no_grad() or detach it"
        )
    got = torch.autograd.grad((raw * weights).sum(), (A, B), allow_unused=True)
    for name, g, want in zip(("A", "B"), got, want_grads, strict=True):
        if g is None or not _close(g, want):
            return _no(
                f"the gradient reaching {name} through your output is wrong: compute the "
                f"update from A and B as given (no .detach(), no copies of {name})"
            )

    # Another layer: a function that hard-codes this layer's numbers shows it here.
    layer2, x2 = _forward_case(10, 6, 2, 8.0, seed=5)
    with torch.no_grad():
        ref2 = layer2.eval()(x2)
    out2, problem = run(layer2, x2, train=False)
    if problem:
        return _no(f"on a second layer (in 10, out 6, rank 2, scaling 4): {problem.message}")
    if not _close(out2.detach(), ref2):
        return _no(
            "your function is right for this layer but not for another (in 10, out 6, rank 2, "
            "scaling 4): use its arguments (scaling, A, B, base), not fixed numbers"
        )

    # Train mode with B = 0: whatever dropout does, the output must be the frozen layer's.
    with torch.no_grad():
        b_trained = B.clone()
        B.zero_()
    raw, problem = run(layer, x, train=True)
    if problem:
        return problem
    if not _close(raw.detach(), frozen):
        return _no(
            "in train mode with B = 0 your output differs from base(x): dropout reached the "
            "frozen path. Apply it to the adapter's input only: base(x) + dropout(x) @ A.T ..."
        )
    with torch.no_grad():
        B.copy_(b_trained)
        ref_train = layer.train()(x)
    drop.shapes.clear()
    raw, problem = run(layer, x, train=True)
    if problem:
        return problem
    out = raw.detach()
    if not _close(out, ref_train):
        if _close(out, ref):
            return _no("in train mode your output ignores dropout: use dropout(x) on the adapter")
        if not drop.shapes:  # e.g. F.dropout(x, p, training): right idea, but its own mask
            return _no(
                "in train mode your output differs from the reference: call the `dropout` module "
                "you were given, dropout(x); the check fixes its mask so the answer is unique"
            )
        if x.shape[:-1] + (RANK,) in drop.shapes:
            return _no("you applied dropout to x @ A.T; LoRA drops the adapter's input x")
        if x.shape[:-1] + (OUT,) in drop.shapes:
            return _no("you applied dropout to the update; LoRA drops the adapter's input x")
        return _no(
            f"in train mode your output differs from the reference {_where(out - ref_train)}"
        )
    return Feedback(
        True,
        "your forward equals lab.LoRALinear's in eval and train mode, on two layers, gradients "
        "included: the frozen path is untouched, dropout acts on the adapter's input only, the "
        "update is scaled by alpha / r.",
    )
