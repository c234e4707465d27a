"""Exercises 1 to 8: the LoRA forward, merge, counting, a budget, a sweep, memory, NF4, DoRA.

Each `check_*` says what is wrong with an answer, not only that it is (lab.exercises.feedback
says how a checker behaves on any input). A passing message holds no machine-dependent numbers
(nbval compares it).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..analysis import format_table
from ..base import load_base_model
from ..lora import LoRALinear, add_lora, count_parameters, lora_layers
from ..memory import analytic_memory, format_bytes, measure_step_memory
from ..model import PRESETS, ModelConfig, ToyTransformer, get_preset
from ..quant import FP4_LEVELS, INT4_LEVELS, NF4_LEVELS, dequantize_blockwise, quantize_blockwise
from ..sweeps import ALL_TARGETS, load_grid_file, select
from ..tasks import get_task
from ..training import train
from ..variants.dora import DoRALinear
from .feedback import ACTIVE_WATCHES, Feedback, _call, _no, _safe

__all__ = [
    "BUDGET",
    "BUDGET_ACCURACY",
    "BUDGET_TASK",
    "SWEEP_CHOICES",
    "Feedback",
    "check_budget",
    "check_count",
    "check_dora_forward",
    "check_forward",
    "check_memory",
    "check_merge",
    "check_nf4",
    "check_sweep_answer",
    "train_budget",
    "sweep_evidence",
]

BUDGET = 4096  # exercise 4: trainable parameters allowed (q and v at rank 4 fit exactly)
BUDGET_TASK, BUDGET_ACCURACY = "rotate", 0.9
MEMORY_TARGETS, MEMORY_RANK = ("q_proj", "v_proj"), 8  # exercise 6's LoRA setting


def _where(diff: torch.Tensor) -> str:
    """'by 3.2e-01 at position [0, 5]': the largest entry of |diff| and where it is."""
    index = torch.unravel_index(diff.abs().argmax(), diff.shape)
    return f"by {float(diff.abs().max()):.1e} at position {[int(i) for i in index]}"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def _factor(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """k if got == k * want everywhere (k from a least-squares fit), else None."""
    k = float((got * want).sum() / (want * want).sum())
    return k if _close(got, k * want) else None


def _match_factor(k: float | None, messages: dict[float, str]) -> str | None:
    if k is None:
        return None
    return next((m for f, m in messages.items() if math.isclose(k, f, abs_tol=1e-3)), None)


def _bad_tensor(
    out: object, name: str, want: torch.Tensor, why: str = "the base's dtype"
) -> Feedback | None:
    """Feedback when `out` is not a finite CPU tensor with want's shape and dtype."""
    if out is None:
        return _no(f"{name} returned None: return the output tensor")
    if not isinstance(out, torch.Tensor):
        return _no(f"{name} returned a {type(out).__name__}; expected a torch.Tensor")
    if out.device != want.device:
        return _no(f"{name} returned a tensor on {out.device}; expected {want.device}, like x")
    if out.shape != want.shape:
        return _no(f"{name} returned shape {tuple(out.shape)}; expected {tuple(want.shape)}")
    if out.dtype != want.dtype:
        return _no(f"{name} returned {out.dtype}; expected {want.dtype}, {why}")
    if not bool(torch.isfinite(out).all()):
        return _no(f"{name} returned inf or nan values")
    return None


# ---------------------------------------------------------------------------------------------
# Exercise 1: the forward pass
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Exercise 2: merge
# ---------------------------------------------------------------------------------------------


def _merge_case(dtype: torch.dtype) -> LoRALinear:
    """A LoRALinear whose ΔW is as large as W, so that rounding twice shows in bf16."""
    g = torch.Generator().manual_seed(2)
    layer = LoRALinear(nn.Linear(IN, OUT, bias=False).to(dtype), RANK, ALPHA)
    with torch.no_grad():
        for t, std in ((layer.base.weight, 1.0), (layer.lora_A, 0.5), (layer.lora_B, 0.5)):
            t.copy_(std * torch.randn(t.shape, generator=g))
    return layer


@_safe
def check_merge(fn: Callable) -> Feedback:
    """Exercise 2: fn(layer) folds scaling * B @ A into layer.base.weight, like LoRALinear.merge.

    A passing merge changes W in place (rounding once), sets merged, leaves A, B and the
    scaling as they were, does nothing the second time, and leaves W restorable: W - scaling B A
    (the lab's unmerge) comes back to the original W within rounding.
    """
    todo = "Add scaling * B @ A to layer.base.weight in place, then set layer.merged = True."
    hints = dict.fromkeys(("grad", "leaf"), "Do the update inside `with torch.no_grad():`")
    hints.update(
        dict.fromkeys(
            ("must match", "size of tensor", "shape"),
            f"W is (out, in) = ({OUT}, {IN}) and ΔW = scaling * B @ A has that shape",
        )
    )
    call = "my_merge(layer)"
    restore: dict[torch.dtype, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = _merge_case(dtype)
        ref = copy.deepcopy(layer)
        ref.merge()
        param, base = layer.base.weight, layer.base
        w0 = param.detach().clone()
        a0, b0, s0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling
        x = torch.randn(5, IN, generator=torch.Generator().manual_seed(3)).to(dtype)
        with torch.no_grad():
            before = layer(x)
        used_lab = []
        layer.merge = functools.partial(used_lab.append, 1)  # the lab's merge is no answer
        returned, problem = _call(fn, "my_merge", todo, layer, hints=hints, call=call)
        if problem:
            return problem
        if used_lab:
            return _no("my_merge called the lab's layer.merge(): write the update yourself")
        if layer.base is not base:
            return _no(
                "my_merge replaced layer.base: change its weight in place instead, so that "
                "anything holding the layer (an optimizer, the model) sees the merge"
            )
        w, want = layer.base.weight, ref.base.weight
        if not isinstance(w, torch.Tensor) or w.shape != w0.shape:
            return _no("layer.base.weight is no longer a weight of the same shape")
        if w.dtype != dtype:
            return _no(
                f"layer.base.weight is now {w.dtype}, was {dtype}: cast the merged weight back "
                "to the base's dtype (the adapters are float32 on a bfloat16 base)"
            )
        if w.requires_grad:
            return _no(
                "layer.base.weight now requires grad, so the frozen base would train: update "
                "it in place under torch.no_grad() rather than making a new nn.Parameter"
            )
        if w is not param:
            return _no(
                "layer.base.weight is a new tensor: change the existing one in place "
                "(w.copy_(...) or w += ...), so that an optimizer or a tied module sees it"
            )
        if problem := _adapters_changed(layer, a0, b0, s0):
            return problem
        w = w.detach()
        if torch.equal(w, w0):
            if isinstance(returned, torch.Tensor) and _close(returned.detach(), want):
                return _no("you returned the merged weight but left layer.base.weight as it was")
            return _no(f"layer.base.weight did not change. {todo}")
        if dtype == torch.float32 and not _close(w, want):
            k = _factor(w - w0, want - w0)
            known = {
                **_SCALING_FACTORS,
                -1.0: "you subtracted ΔW: that is unmerge",
                # here sqrt(r) is 2: one number, two slips
                2.0: "ΔW was added twice (or scaled by alpha / sqrt(r), rsLoRA's rule: use "
                "`scaling` as given)",
            }
            hint = _match_factor(k, known)
            if hint is None and _close(w, w0 + s0 * (a0.T @ b0.T).T):
                hint = "that is (A.T @ B.T).T: ΔW is B @ A"
            hint = hint or "is it W + scaling * B @ A?"
            return _no(f"your merged weight differs from the reference {_where(w - want)}: {hint}")
        # In bf16, rounding once gives exactly the lab's result; a few entries may still differ
        # when a float32 sum rounded to the other side of a bf16 boundary.
        wrong = (w != want).float().mean().item()
        if dtype == torch.bfloat16 and wrong > 0.01:
            # bf16 keeps 8 significant bits: rounding W, ΔW or their sum moves each entry by at
            # most 2**-8 of the larger of |W| and |ΔW|; a formula error moves it further.
            w0f, wantf = w0.float(), want.float()
            steps = 2.0**-6 * (w0f.abs() + (wantf - w0f).abs())
            if bool(((w.float() - wantf).abs() <= steps).all()):
                return _no(
                    "in bfloat16 many of your merged entries are one rounding step off: "
                    "you rounded twice, casting ΔW to bfloat16 before adding (delta_weight() "
                    "does that). Add in float32, round once: (W.float() + ΔW).to(W.dtype)"
                )
            return _no(f"in bfloat16 your merged weight differs {_where(w.float() - want.float())}")
        if layer.merged is not True:
            return _no(
                "layer.merged is still False: set it, or the forward adds B A x a second time "
                "on top of the merged weight"
            )
        with torch.no_grad():
            after = layer(x)
        if dtype == torch.float32 and not _close(after, before):
            return _no(f"after merging, the layer's output changed {_where(after - before)}")
        w1 = w.clone()
        _, problem = _call(fn, "my_merge", todo, layer, hints=hints, call=call)
        if problem:
            return _no(f"on an already merged layer, {problem.message}")
        if layer.base is not base or layer.base.weight is not param:
            return _no("calling my_merge on a merged layer replaced the weight: do nothing then")
        if not torch.equal(layer.base.weight.detach(), w1):
            return _no(
                "calling my_merge on a merged layer changed W again: ΔW is now in it twice. "
                "Check layer.merged first and return without doing anything"
            )
        if problem := _adapters_changed(layer, a0, b0, s0, " on an already merged layer"):
            return problem
        if layer.merged is not True:
            return _no("calling my_merge on a merged layer set layer.merged back: leave it True")
        # Unmerge as the lab does (subtract in float32 with the original A, B, scaling, round
        # once) and measure how far W comes back from where it started.
        back = (w1.float() - s0 * (b0 @ a0)).to(dtype)
        err = (back.float() - w0.float()).abs()
        restore[dtype] = float(err.max())
        if dtype == torch.float32 and restore[dtype] > 1e-5:
            return _no(
                f"after your merge, unmerging (W - scaling * B @ A) leaves W off by "
                f"{restore[dtype]:.2g}: W cannot be restored"
            )
        if dtype == torch.bfloat16 and not bool(
            (err <= 2.0**-6 * (w0.float().abs() + (s0 * b0 @ a0).abs())).all()
        ):
            return _no(
                f"in bfloat16, unmerging after your merge leaves W off by {restore[dtype]:.2g}, "
                "more than rounding explains: W cannot be restored"
            )
    return Feedback(
        True,
        "my_merge folds scaling * B @ A into W in place, rounds once, keeps the dtype, sets "
        "merged, leaves A and B as they were, and a second call changes nothing. Unmerged "
        "(W - scaling * B @ A, as the lab's unmerge does), W comes back to within "
        f"{restore[torch.float32]:.0e} in float32 but only to within "
        f"{restore[torch.bfloat16]:.1g} in bfloat16 (largest entry error): each step rounds to "
        "8 significant bits, and the second rounding does not undo the first.",
    )


def _adapters_changed(
    layer: LoRALinear, a0: torch.Tensor, b0: torch.Tensor, s0: float, when: str = ""
) -> Feedback | None:
    """Feedback if the merge changed A, B or the scaling (which unmerging needs as they were)."""
    for name, before in (("lora_A", a0), ("lora_B", b0)):
        now = getattr(layer, name, None)
        if not isinstance(now, torch.Tensor) or now.shape != before.shape:
            return _no(f"my_merge replaced layer.{name}{when}: leave the adapters as they are")
        if not torch.equal(now.detach(), before):
            return _no(
                f"my_merge changed layer.{name}{when}: a merge leaves A and B untouched, so "
                "that unmerge (W - scaling * B @ A) can restore W and training can go on"
            )
    if layer.scaling != s0:
        return _no(f"my_merge changed layer.scaling{when}: leave it, unmerge needs it")
    return None


# ---------------------------------------------------------------------------------------------
# Exercise 3: counting trainable parameters
# ---------------------------------------------------------------------------------------------

# Drawn afresh for every check, so no table of answers can pass: each case is a model of random
# size (blocks, width, MLP width, vocabulary, biases) with random targets and rank. The shapes
# of the draws make the known slips tell apart: one case adapts attention only, one a single
# MLP layer beside attention (so A and B differ in size), one has biases, one many blocks.
PAPER_CASE = ("gpt3-175b", ("q_proj", "v_proj"), 1)  # the LoRA paper's 4.7M (Table 4)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _random_config(rng: random.Random, bias: bool = False, layers: int = 12) -> ModelConfig:
    heads = rng.randint(1, 16)
    d = heads * rng.choice((8, 16, 32, 64))
    return ModelConfig(
        vocab_size=rng.randint(30, 60_000),
        d_model=d,
        n_layers=rng.randint(2, layers),
        n_heads=heads,
        d_ff=rng.randint(d + 1, 6 * d),  # any width, not always 4 x d_model
        max_seq_len=rng.randint(16, 4096),
        bias=bias,
    )


def _count_cases(
    rng: random.Random | None = None,
) -> list[tuple[ModelConfig, tuple[str, ...], int]]:
    """(config, targets, rank) for one check: four random cases, then the paper's."""
    rng = rng or random.SystemRandom()  # the system's entropy: nothing a notebook can seed

    def some(pool: Sequence[str], least: int = 1) -> list[str]:
        return rng.sample(list(pool), rng.randint(least, len(pool)))

    mlp = rng.choice(("up_proj", "down_proj"))
    drawn = [
        (_random_config(rng), some(ATTENTION_TARGETS)),
        (_random_config(rng), [*some(ATTENTION_TARGETS), mlp]),
        (_random_config(rng, bias=True), some(ALL_TARGETS)),
        (_random_config(rng, layers=96), some(ALL_TARGETS, 2)),
    ]
    cases = [  # a rank the lab accepts: at most the smallest side of every adapted layer
        (config, tuple(sorted(targets, key=ALL_TARGETS.index)), rng.randint(1, min(64, d)))
        for config, targets in drawn
        for d in [config.d_model]
    ]
    preset, targets, rank = PAPER_CASE
    return [*cases, (get_preset(preset), targets, rank)]


@functools.lru_cache(maxsize=256)
def _lab_count(config: ModelConfig, targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """(trainable, total) from the lab: add_lora on the meta device, then count_parameters."""
    with torch.device("meta"):
        model = ToyTransformer(config)
    add_lora(model, targets, rank=rank)
    counts = count_parameters(model)
    return counts.trainable, counts.total


def _count_mistakes(
    config: ModelConfig, targets: Sequence[str], rank: int
) -> list[tuple[str, int]]:
    """(hint, the count that mistake gives on this case), in the order they are tried."""
    d, f, n = config.d_model, config.d_ff, config.n_layers
    dims = [{"up_proj": (d, f), "down_proj": (f, d)}.get(t, (d, d)) for t in targets]
    ins, outs = sum(i for i, _ in dims), sum(o for _, o in dims)
    expected, total = _lab_count(config, tuple(targets), rank)
    dense = sum(i * o for i, o in dims)
    mlp = sum(t in ("up_proj", "down_proj") for t in targets)
    four_d = expected + n * rank * mlp * (4 * d - f)  # the MLP as if d_ff were 4 x d_model
    return [
        ("that counts every parameter: the frozen base does not train, only A and B", total),
        ("that is the frozen base's size: count only the adapters A and B", total - expected),
        ("that counts only A (r x in): add B (out x r)", n * rank * ins),
        ("that counts only B (out x r): add A (r x in)", n * rank * outs),
        ("that is one block's worth: multiply by n_layers, the number of blocks", expected // n),
        ("you counted one bias per output: A and B have none", expected + n * outs),
        ("A (r x in) and B (out x r) hold r * (in + out), not r * in * out", n * rank * dense),
        ("that is the size of the target weights (in x out): LoRA trains A and B", n * dense),
        ("the rank is missing: A has r rows and B r columns", n * (ins + outs)),
        ("up_proj is d_model -> d_ff, down_proj d_ff -> d_model", n * rank * 2 * d * len(dims)),
        ("d_ff is config.d_ff, not 4 x d_model: read it from the config", four_d),
        ("twice the right count: is each adapter counted twice?", 2 * expected),
    ]


def _count_hint(answers: list[int], cases: Sequence[tuple]) -> str:
    """The mistake that explains the answers on every case, or ''."""
    per_case = [_count_mistakes(*case) for case in cases]
    for i, (hint, _) in enumerate(per_case[0]):
        if all(answer == case[i][1] for answer, case in zip(answers, per_case, strict=True)):
            return hint
    return ""


def _describe_case(config: ModelConfig, targets: Sequence[str], rank: int) -> str:
    model = next((n for n, c in PRESETS.items() if c == config), None)
    model = model or (
        f"a model with d_model {config.d_model}, d_ff {config.d_ff}, {config.n_layers} blocks"
        + (", biases on" if config.bias else "")
    )
    return f"{model}, targets {', '.join(targets)}, rank {rank}"


class _BuildsModules:
    """Counts the parameters any nn.Module registers while it is active (a model being built)."""

    kind = "builds_modules"

    def __enter__(self) -> _BuildsModules:
        self.count = 0
        ACTIVE_WATCHES.append(self)

        def hook(module: nn.Module, name: str, param: object) -> None:
            self.count += 1

        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        ACTIVE_WATCHES.remove(self)
        self.handle.remove()


@_safe
def check_count(fn: Callable) -> Feedback:
    """Exercise 3: fn(config, targets, rank) -> trainable parameters, on cases drawn per check."""
    todo = "Return the number of trainable parameters, an int: count what A and B hold."
    call = "my_count(config, targets, rank)"
    cases = _count_cases()
    answers, first_wrong = [], None
    for config, targets, rank in cases:
        expected, _ = _lab_count(config, targets, rank)
        given = copy.deepcopy(config)  # the student's own copy: the check keeps its case
        with _BuildsModules() as built:
            answer, problem = _call(fn, "my_count", todo, given, targets, rank, call=call)
        if problem:
            return problem
        if given != config:
            return _no("my_count changed the config it was given: read it, do not change it")
        if built.count:
            return _no(
                "my_count builds a model (its layers registered parameters): count by hand, "
                "from config.d_model, config.d_ff and config.n_layers, with no model and no "
                "lab.count_parameters"
            )
        if isinstance(answer, torch.Tensor) and answer.numel() == 1:
            answer = answer.item()
        if answer is None:
            return _no(f"my_count returned None. {todo}")
        if not isinstance(answer, numbers.Real) or isinstance(answer, bool):
            return _no(f"my_count returned a {type(answer).__name__}; expected an int")
        if not (math.isfinite(answer) and answer == int(answer)):
            return _no(f"my_count returned {answer!r}; a parameter count is a whole number")
        answers.append(int(answer))
        if int(answer) != expected and first_wrong is None:
            # The expected count is not shown: the case is new every time, but a count the
            # student can read back is one a table could hold.
            side = "more" if int(answer) > expected else "fewer"
            first_wrong = (
                f"for {_describe_case(config, targets, rank)}: you count {int(answer):,}, "
                f"{side} than the lab counts"
            )
    if first_wrong:
        hint = _count_hint(answers, cases) or (
            "each adapted layer has A (r x in) and B (out x r), r * (in + out) numbers, in "
            "each of the n_layers blocks; read in and out from the config"
        )
        return _no(f"{first_wrong}. {hint}")
    paper, _ = _lab_count(*cases[-1])
    return Feedback(
        True,
        f"your counts match the lab's on {len(cases) - 1} models drawn at random for this check "
        "(widths, blocks, biases, targets and ranks all vary) and on GPT-3 175B with LoRA on "
        f"q and v at rank 1: {paper:,}, the LoRA paper's 4.7M.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 4: a parameter budget
# ---------------------------------------------------------------------------------------------


SHORT_TARGETS = {t.removesuffix("_proj"): t for t in ALL_TARGETS}  # q -> q_proj, ..., down
BUDGET_STEPS, BUDGET_LR, BUDGET_ALPHA = 300, 2e-2, 16.0


def _budget_targets(targets: object) -> tuple[tuple[str, ...], Feedback | None]:
    """Full target names from TARGETS (short names q, k, v, o, up, down welcome), or feedback."""
    valid = ", ".join(f"{t} ({s})" for s, t in SHORT_TARGETS.items())
    if isinstance(targets, str):  # one name, or names separated by commas or spaces
        targets = tuple(t for t in targets.replace(",", " ").split() if t)
    if not isinstance(targets, tuple | list | set | frozenset):
        return (), _no(f"TARGETS should be a tuple of names, got {targets!r}; choose among {valid}")
    names, unknown = [], []
    for t in targets:
        name = SHORT_TARGETS.get(t, t) if isinstance(t, str) else t
        (names if name in ALL_TARGETS else unknown).append(name if name in ALL_TARGETS else t)
    if unknown:
        return (), _no(f"TARGETS: {unknown!r} are not LoRA targets here; choose among {valid}")
    if not names:
        return (), _no(f"TARGETS is empty; choose among {valid}")
    return tuple(sorted(set(names), key=ALL_TARGETS.index)), None


def train_budget(targets: object, rank: object, steps: object = 150) -> object:
    """Exercise 4's model: the shipped base with LoRA on `targets` at `rank` (alpha 16, seed 0),
    trained `steps` steps on rotate at lr 2e-2, as notebook 4 does with lab.add_lora and
    lab.train. None while nothing is chosen; a Feedback (what to fix) for a choice that cannot
    be trained, or is over the budget, without training anything.
    """
    if not targets and not rank:
        return None
    names, problem = _budget_targets(targets)
    if problem:
        return problem
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= 128:
        return _no(f"RANK should be a whole number from 1 to 128 (d_model), got {rank!r}")
    rank = int(rank)  # a numpy integer is a whole number too
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= BUDGET_STEPS:
        return _no(f"STEPS should be a whole number from 1 to {BUDGET_STEPS}, got {steps!r}")
    cost, _ = _lab_count(PRESETS["cpu"], names, rank)
    if cost > BUDGET:
        return _no(
            f"rank {rank} on {', '.join(names)} costs {cost:,} parameters, over the budget of "
            f"{BUDGET:,} (not trained). Each adapted layer costs r * (in + out) in each of the "
            "2 blocks: q, k, v, o are 128 -> 128, up and down 128 <-> 512"
        )
    torch.manual_seed(0)  # A's random initialisation
    model = load_base_model("cpu")
    add_lora(model, targets=names, rank=rank, alpha=BUDGET_ALPHA)
    train(
        model,
        get_task(BUDGET_TASK),
        steps=steps,
        lr=BUDGET_LR,
        progress=False,
        measure_memory=False,
    )
    return model


@functools.cache
def _shipped_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load_base_model("cpu").state_dict().items()}


@functools.cache
def _shipped_modules() -> dict[str, type]:
    return {n: type(m) for n, m in load_base_model("cpu").named_modules()}


def _structure_problem(model: ToyTransformer) -> Feedback | None:
    """Feedback if the model is not the shipped architecture with LoRALinears on its linears."""
    shipped = _shipped_modules()
    seen = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in seen):
            continue  # a LoRALinear's own insides (base, dropout)
        if isinstance(module, LoRALinear):
            if shipped.get(name) is not nn.Linear:
                return _no(f"{name} is a LoRA layer where the shipped base has none: remove it")
            seen.add(name)
            continue
        if shipped.get(name) is not type(module):
            got = type(module).__name__
            return _no(f"{name or 'the model'} is a {got}, not the shipped base's: use add_lora")
        if "forward" in vars(module):
            return _no(f"{name or 'the model'} has its forward replaced: keep the model's own")
    if missing := [n for n in shipped if n and n not in dict(model.named_modules())]:
        return _no(f"the model lacks {missing[0]}, which the shipped base has")
    return None


@_safe
def check_budget(model: object) -> Feedback:
    """Exercise 4: LoRA on the shipped base, adapters <= BUDGET values, accuracy on BUDGET_TASK.

    The budget counts the adapter's size: every value of every lora_A and lora_B, whether or not
    it requires grad, and any other parameter that differs from the shipped base.
    """
    todo = (
        f"Choose targets and a rank that train at most {BUDGET:,} parameters, add them to "
        f"lab.load_base_model() and train on {BUDGET_TASK!r} to held-out accuracy "
        f">= {BUDGET_ACCURACY:.2f}. Exercise 3's count gives the cost before you train."
    )
    if isinstance(model, Feedback):  # train_budget's word on a choice it did not train
        if not model.passed:  # train_budget never returns a passing one: that is no model
            return model
        return _no(f"check_budget wants the trained model that train_budget returns. {todo}")
    if model is None:
        return _no(f"no trained model yet. {todo}")
    if not isinstance(model, ToyTransformer) or model.config != PRESETS["cpu"]:
        return _no(f"expected the shipped base (lab.load_base_model()), got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        return _no(f"the model has no LoRA layers: call lab.add_lora before training. {todo}")
    leaves = sorted({name.rpartition(".")[2] for name in layers}, key=_target_order)
    if invalid := [t for t in leaves if t not in ALL_TARGETS]:
        return _no(f"{invalid} are not LoRA targets here; choose among {', '.join(ALL_TARGETS)}")
    if problem := _structure_problem(model):
        return problem
    if any(layer.merged is not False for layer in layers.values()):
        return _no("the adapters are merged: call lab.unmerge_lora(model) so they can be checked")
    adapters = {id(p): p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if extra:
        more = " and more" if len(extra) > 1 else ""
        return _no(f"parameters outside the adapters train ({extra[0]}{more}): freeze them")
    shipped = _shipped_weights()
    state = model.state_dict()
    for name, value in state.items():
        key = name.replace(".base.", ".")
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if key not in shipped:
            return _no(f"the model has {name}, which the shipped base lacks: add only LoRA")
        same = value.dtype == shipped[key].dtype and value.shape == shipped[key].shape
        if not (same and torch.equal(value.detach().cpu(), shipped[key])):
            return _no(f"{key} differs from the shipped base: train only the adapters")
    size = sum(p.numel() for p in adapters.values())
    frozen = [n for n, p in model.named_parameters() if id(p) in adapters and not p.requires_grad]
    ranks = "/".join(str(r) for r in sorted({layer.lora_A.shape[0] for layer in layers.values()}))
    plan = f"rank {ranks} on {', '.join(leaves)}"
    if size > BUDGET:
        froze = (
            f" Freezing {frozen[0].rpartition('.')[2]} does not make it cheaper: the budget "
            "counts the adapter's size, every value of A and B, trained or not (a frozen A "
            "is still random numbers the adapter must store)."
            if frozen
            else ""
        )
        return _no(
            f"{plan}: its adapters hold {size:,} values, over the budget of {BUDGET:,}.{froze} "
            "Each adapted layer costs r * (in + out) in each of the 2 blocks: q, k, v, o are "
            "128 -> 128, up and down 128 <-> 512. Lower the rank or adapt fewer layers"
        )
    if not all(bool(torch.isfinite(p).all()) for p in adapters.values()):
        return _no(f"{plan}: the adapters hold inf or nan: train again with a smaller lr")
    accuracy = get_task(BUDGET_TASK).evaluate(model)["accuracy"]
    if not accuracy >= BUDGET_ACCURACY:
        return _no(
            f"{plan} ({size:,} parameters) reaches held-out accuracy {accuracy:.2f} on "
            f"{BUDGET_TASK}, below {BUDGET_ACCURACY:.2f}: train longer (up to "
            f"{BUDGET_STEPS} steps, lr 2e-2), or spend the budget on other layers"
        )
    return Feedback(
        True,
        f"{plan}: {size:,} adapter parameters (budget {BUDGET:,}), held-out accuracy "
        f"on {BUDGET_TASK} at least {BUDGET_ACCURACY:.2f}, the base untouched.",
    )


def _target_order(name: str) -> int:
    return ALL_TARGETS.index(name) if name in ALL_TARGETS else len(ALL_TARGETS)


# ---------------------------------------------------------------------------------------------
# Exercise 5: explaining a sweep
# ---------------------------------------------------------------------------------------------

SWEEP_CHOICES: dict[str, tuple[str, str]] = {  # letter -> (choice, why it is right or wrong)
    "A": (
        "At rank 64 rsLoRA trains more parameters, so it overfits the training set.",
        "both rules train the same 65,536 parameters (the scaling is a number, not a "
        "parameter), and rsLoRA's training loss stays high too: it underfits, it does not overfit",
    ),
    "B": (
        "alpha / r is the better rule: one alpha and lr serve every rank, while alpha / sqrt(r) "
        "breaks down at high rank.",
        "that holds only at the alpha and lr the grid tuned for alpha / r. At one rank the rules "
        "differ only by a factor sqrt(r) in the scaling: rsLoRA at rank 64 with alpha 2 has "
        "exactly alpha / r's scaling at alpha 16 (2 / 8 = 16 / 64 = 0.25) and trains the same. "
        "Which rule looks better depends on which one alpha and lr were tuned for",
    ),
    "C": (
        "alpha / r makes ΔW grow with the rank, which is why alpha / r improves up to rank 64.",
        "alpha / r shrinks the scaling as the rank grows (2 at rank 8, 0.25 at rank 64); it "
        "improves because more rank means more capacity, at a step size that stays tame",
    ),
    "D": (
        "The comparison favours alpha / r: alpha 16 and lr 2e-2 were tuned for it. Under Adam "
        "each step moves A and B by about lr per entry whatever the gradient's scale, so ΔW's "
        "step grows with scaling x lr; at rank 64 alpha / sqrt(r) is 8 times alpha / r (2 "
        "instead of 0.25), too large a step. rsLoRA at its own tuned alpha (or lr) does "
        "comparably.",
        "with Adam the scaling acts like a learning-rate multiplier on ΔW, so each rule needs "
        "its own alpha (or lr): alpha / r keeps the step about level as the rank grows, rsLoRA "
        "needs about alpha / sqrt(r_tuned) (16 / sqrt(8) = 5.7 to match rank 8) or a smaller "
        "lr. A comparison at one rule's tuned settings says little about the other rule",
    ),
    "E": (
        "Rank 64 is more than a 128 x 128 layer can use, so rsLoRA's extra rank is thrown away.",
        "rank 64 is below min(in, out) = 128, and alpha / r at the same rank reaches 0.91: "
        "the rank itself is usable",
    ),
    "F": (
        "Adam moves A and B by about lr per step, and at rank 64 alpha / sqrt(r)'s scaling is "
        "8 times alpha / r's, so lr 2e-2 is too large a step for rsLoRA.",
        "right about the mechanism, but incomplete: a complete answer also says that the "
        "comparison depends on the alpha and lr each rule was tuned for (here alpha / r's), "
        "and how rsLoRA does at its own tuned alpha or lr",
    ),
    "G": (
        "It is seed noise: one unlucky run.",
        "the rsLoRA column falls steadily as the rank grows, and the repeated rank-8 runs agree "
        "within a couple of points: a drop of about 60 points is not noise",
    ),
}
SWEEP_ANSWER = "D"


def sweep_evidence() -> str:
    """The shipped grid on sort_desc at alpha 16: accuracy and final loss by rank, both rules."""
    results = select(load_grid_file(), task="sort_desc", alpha=16.0, dropout=0.0, seed=0)
    rows = []
    for rank in (8, 16, 32, 64):
        row: dict[str, object] = {"rank": rank}
        for rslora, label in ((False, "LoRA"), (True, "rsLoRA")):
            hits = [r for r in results if r.point.rank == rank and r.point.rslora == rslora]
            if hits:
                tail = hits[0].losses[-50:]  # the training loss where training ended
                row[f"{label} scaling"] = f"{16 / (math.sqrt(rank) if rslora else rank):.2f}"
                row[f"{label} acc"] = f"{hits[0].heldout['accuracy']:.2f}"
                row[f"{label} loss"] = f"{sum(tail) / len(tail):.2f}"
        rows.append(row)
    return format_table(rows)


@_safe
def check_sweep_answer(answer: object) -> Feedback:
    """Exercise 5: the letter of the explanation in SWEEP_CHOICES; every wrong one is explained."""
    letters = ", ".join(SWEEP_CHOICES)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return _no(f"no answer yet: set ANSWER to one letter, {letters}")
    if not isinstance(answer, str):
        return _no(f"ANSWER should be one letter in quotes, like 'A'; got {answer!r}")
    letter = answer.strip().strip(".)").strip().upper()
    if letter not in SWEEP_CHOICES:
        several = [c for c in letter if c in SWEEP_CHOICES]
        if len(several) > 1 and len(letter) <= 3 * len(several):
            return _no(f"answer one letter, the one explanation that is complete; got {answer!r}")
        return _no(f"answer one letter of {letters}; got {answer!r}")
    _, why = SWEEP_CHOICES[letter]
    if letter == SWEEP_ANSWER:
        return Feedback(True, f"{letter}: {why}.")
    return _no(f"{letter} is not it: {why}.")


# ---------------------------------------------------------------------------------------------
# Exercise 6: predicting the memory LoRA saves
# ---------------------------------------------------------------------------------------------


@functools.cache
def _state_bytes() -> dict[str, dict[str, int]]:
    """Gradient + AdamW bytes, analytic and measured (one real CPU step), full and LoRA."""
    config = get_preset("cpu")
    out: dict[str, dict[str, int]] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (4, 19), generator=g)
    y = torch.randint(0, config.vocab_size, (4, 19), generator=g)
    for kind, targets in (("full", None), ("lora", MEMORY_TARGETS)):
        rank = MEMORY_RANK if targets else 0
        predicted = analytic_memory(config, 4, 19, lora_targets=targets, lora_rank=rank)
        torch.manual_seed(0)
        model = load_base_model("cpu").train()
        if targets:
            add_lora(model, targets, rank=MEMORY_RANK)
        params = [p for p in model.parameters() if p.requires_grad]
        measured = measure_step_memory(model, x, y, torch.optim.AdamW(params, lr=1e-3))
        out[kind] = {
            "trainable": sum(p.numel() for p in params),
            "analytic": predicted.gradients + predicted.optimizer,
            "measured": measured.gradients + measured.optimizer,
        }
    return out


def _memory_mistakes(kind: str) -> list[tuple[str, float]]:
    """(hint, the bytes that mistake predicts) for `kind`, in the order they are tried."""
    config = get_preset("cpu")
    d, f, n, v, t = (
        config.d_model,
        config.d_ff,
        config.n_layers,
        config.vocab_size,
        config.max_seq_len,
    )
    if kind == "lora":
        one = n * MEMORY_RANK * 2 * d  # one 128 -> 128 target, both blocks
        return [
            (
                "that is half the adapters: LoRA here is on q and v, in both blocks, each "
                "with A (r x in) and B (out x r)",
                12 * one,
            ),
            ("that is LoRA on q, k, v and o: this setting adapts q and v only", 12 * 4 * one),
            (
                "that is LoRA on all six projections: this setting adapts q and v only",
                12 * n * MEMORY_RANK * (4 * 2 * d + 2 * (d + f)),
            ),
        ]
    linear = 4 * d * d + 2 * d * f  # one block's q, k, v, o, up and down (no biases)
    norms = 2 * 2 * d  # one block's two LayerNorms, a weight and a bias each
    n_full = v * d + t * d + n * (linear + norms) + 2 * d  # + the final LayerNorm
    return [
        (
            "the output head is counted twice: it shares its weight with the token embedding "
            "(weight tying), so the model holds that matrix once",
            12 * (n_full + v * d),
        ),
        (
            "both embeddings are left out: the token embedding (64 x 128, which the output "
            "head shares) and the position embedding (32 x 128) train too",
            12 * (n_full - v * d - t * d),
        ),
        ("the token embedding (64 x 128, shared with the head) is left out", 12 * (n_full - v * d)),
        ("the position embedding (32 x 128) is left out", 12 * (n_full - t * d)),
        (
            "that counts only the blocks' linear layers: the embeddings and the LayerNorms "
            "(a weight and a bias each) train too",
            12 * n * linear,
        ),
        (
            "the LayerNorms are left out: two per block and a final one, a weight and a bias "
            "each, 128 values apiece",
            12 * (n_full - n * norms - 2 * d),
        ),
        ("that is one block's worth of the blocks: the base has 2", 12 * (n_full - linear - norms)),
    ]


def _bytes_hint(kind: str, guess: float, n: int, n_frozen: int, swapped: bool) -> str:
    """Why a byte count is off: a known mistake's value, or its value per parameter."""
    if swapped:
        return "that is the other prediction's value: are FULL_BYTES and LORA_BYTES swapped?"
    # A known slip is an exact count: only the same number (to the byte) names it.
    matches = [h for h, v in _memory_mistakes(kind) if guess == v]
    per = guess / n
    known = {
        4: "that is the gradients alone: AdamW also keeps two moments per parameter",
        8: "one fp32 value per parameter is missing: a gradient and two Adam moments",
        16: "you included the weights themselves: the question is gradients + optimizer state",
        24: "that is 8 bytes per value: the lab trains in float32, 4 bytes",
        1: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        3: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        6: "that is 2 bytes per value: the lab trains in float32, 4 bytes",
    }
    per_hint = next((h for v, h in known.items() if math.isclose(per, v, rel_tol=0.02)), None)
    if matches and per_hint and kind == "full":  # one number, two explanations: say both
        return f"{matches[0]} (or {per_hint})"
    # LoRA is checked after full fine-tuning passed, bytes per value and all: a LoRA number
    # that is off is off in what it counts.
    if hint := (matches[0] if matches else per_hint):
        return hint
    if n_frozen and math.isclose(guess / (n + n_frozen), 12, rel_tol=0.05):
        return "you counted the frozen base too: only A and B get gradients and Adam moments"
    want = 12 * n
    for unit, size in (("KiB", 2**10), ("MiB", 2**20), ("kB", 1e3), ("MB", 1e6)):
        if math.isclose(guess * size, want, rel_tol=0.15):
            return f"that looks like {unit}: give bytes (multiply by {size:,.0f})"
    if guess < 1e4:
        return "that is very small: give bytes, not KiB or MiB"
    close = "close, but not exact: " if math.isclose(guess, want, rel_tol=0.15) else ""
    return (
        f"{close}count the trainable parameters exactly (every tensor that trains, each once), "
        "then 12 bytes each: a float32 gradient and two AdamW moments"
    )


@_safe
def check_memory(full_bytes: object, lora_bytes: object) -> Feedback:
    """Exercise 6: predicted bytes of gradients + AdamW state, full fine-tuning and LoRA, exact."""
    guesses = {"full": full_bytes, "lora": lora_bytes}
    for kind, guess in guesses.items():
        if guess is None:
            return _no(
                f"no prediction for {kind} yet: give a number of bytes for FULL_BYTES and "
                "LORA_BYTES (gradients + AdamW state on the 'cpu' preset)"
            )
        if isinstance(guess, torch.Tensor) and guess.numel() == 1 and not guess.is_complex():
            guess = guesses[kind] = guess.item()
        number = isinstance(guess, numbers.Real) and not isinstance(guess, bool)
        if not number or not math.isfinite(guess) or guess <= 0:
            return _no(f"the {kind} prediction should be a positive number of bytes: {guess!r}")
    state = _state_bytes()
    full, lora = state["full"], state["lora"]
    names = {"full": "full fine-tuning", "lora": f"LoRA r={MEMORY_RANK} on q, v"}
    for kind, guess in guesses.items():
        # The count is exact: each slip the exercise warns about moves it by a few percent.
        want = state[kind]["analytic"]
        if guess != want:
            n, frozen = state[kind]["trainable"], full["trainable"] - state[kind]["trainable"]
            other = "lora" if kind == "full" else "full"
            swapped = guess == state[other]["analytic"] and guesses[other] == want
            return _no(
                f"{names[kind]}: you predict {format_bytes(guess)} ({guess:,.0f} bytes), not "
                f"the lab's count: {_bytes_hint(kind, float(guess), n, frozen, swapped)}"
            )
    return Feedback(
        True,
        "exactly the lab's count on both. Gradients + AdamW state: full fine-tuning "
        f"{full['trainable']:,} x 12 bytes = {format_bytes(full['analytic'])} (measured "
        f"{format_bytes(full['measured'])}), LoRA {lora['trainable']:,} x 12 bytes = "
        f"{format_bytes(lora['analytic'])} (measured {format_bytes(lora['measured'])}): "
        f"{full['analytic'] / lora['analytic']:.0f} times less. The frozen weights and the "
        "activations are still there in both: LoRA saves only on what trains.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 7: NF4 for one block
# ---------------------------------------------------------------------------------------------

NF4_BLOCK = 64  # QLoRA's block size: one absmax per 64 weights
_NF4 = torch.tensor(NF4_LEVELS, dtype=torch.float32)
_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2  # NF4's decision boundaries
_WRONG_TABLES: dict[str, tuple[float, ...]] = {  # what a student may code instead of NF4
    "uniform int4 levels (k / 7, evenly spaced)": INT4_LEVELS,
    "uniform int4 levels ((k - 7) / 7, evenly spaced)": tuple((k - 7) / 7 for k in range(16)),
    "evenly spaced levels (torch.linspace(-1, 1, 16), uniform int4)": tuple(
        torch.linspace(-1, 1, 16).tolist()
    ),
    "FP4's levels (a tiny float: 1 sign, 2 exponent, 1 mantissa bit)": FP4_LEVELS,
}
_TABLE_TIP = (
    "NF4's 16 levels are lab.NF4_LEVELS (quantiles of a normal distribution, dense near 0 "
    "where most weights are): code k means NF4_LEVELS[k]"
)
NF4_QUANTIZE_TODO = (
    "Return (codes, absmax): absmax = the block's largest |w|, and for each w the index (0..15) "
    "of the NF4 level nearest to w / absmax."
)
NF4_DEQUANTIZE_TODO = "Return NF4_LEVELS[code] * absmax for every code, a float32 tensor (64,)."
NF4_CALLS = "my_quantize(block) -> (codes, absmax) and my_dequantize(codes, absmax) -> block"


@functools.cache
def _nf4_blocks() -> tuple[tuple[str, torch.Tensor], ...]:
    """The fixed test blocks of 64 float32 weights, each with what it is there to catch."""
    g = torch.Generator().manual_seed(7)
    normal = 0.02 * torch.randn(NF4_BLOCK, generator=g)  # weights as a trained layer has them
    on_levels = 0.5 * _NF4.repeat(4)[torch.randperm(NF4_BLOCK, generator=g)]  # exactly on levels
    delta = 0.004  # in units of absmax: well inside a gap (the narrowest half gap is 0.04)
    near = torch.cat([_MIDPOINTS + k * delta for k in (-3, -1, 1, 3)])
    near = 2.0 * torch.cat([near, torch.tensor([1.0, 0.0, -0.75, 0.6])])  # absmax 2
    negative = (0.8 * torch.randn(NF4_BLOCK, generator=g)).clamp(-2.4, 2.4)
    negative[17] = -3.0  # the largest magnitude is negative: absmax is 3, not -3 or max(w)
    return (
        ("normal weights", normal),
        ("values exactly on the levels (times 0.5)", on_levels),
        ("values near the midpoints between levels", near),
        ("a block whose largest magnitude is negative (-3.0)", negative),
    )


def _nearest(scaled: torch.Tensor, table: Sequence[float]) -> torch.Tensor:
    """Index of the nearest level of `table` for every value (ties: the first, lower level)."""
    t = torch.tensor(table, dtype=torch.float32)
    return (scaled[:, None] - t).abs().argmin(dim=1)


def _as_absmax(value: object) -> tuple[float | None, str]:
    """(absmax as a float, '') or (None, what is wrong with it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, (
                f"absmax should be one number for the block (a float or a 0-d tensor), got a "
                f"tensor of shape {tuple(value.shape)}"
            )
        if value.is_complex() or value.dtype == torch.bool or value.is_meta:
            return None, f"absmax should be a real number, got a {value.dtype} tensor"
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None, f"absmax should be a number (a float or a 0-d tensor), got {value!r}"
    if not math.isfinite(value):
        return None, f"absmax is {value}: divide by the largest |w|, a finite positive number"
    return float(value), ""


def _as_codes(value: object) -> tuple[torch.Tensor | None, str]:
    """(codes as a long tensor (64,), '') or (None, what is wrong with them)."""
    if not isinstance(value, torch.Tensor):
        return None, f"codes should be a torch tensor of integers 0..15, got {type(value).__name__}"
    if value.is_meta:
        return None, "codes are on the meta device (a shape, no values)"
    if value.shape != (NF4_BLOCK,):
        return (
            None,
            f"codes have shape {tuple(value.shape)}; expected ({NF4_BLOCK},), one per weight",
        )
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        if value.is_floating_point() and bool(torch.isin(value.float(), _NF4).all()):
            return None, (
                "codes are the levels themselves (floats): return their indices 0..15, an "
                "integer tensor (the index is what takes 4 bits)"
            )
        return None, (
            f"codes should be an integer tensor (torch.uint8 or torch.long) of indices 0..15, "
            f"got {value.dtype}"
        )
    codes = value.detach().cpu().long()
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        return None, (
            f"codes run from {int(codes.min())} to {int(codes.max())}: a 4-bit code is an "
            "index 0..15 into NF4_LEVELS"
        )
    return codes, ""


def _absmax_hint(got: float, w: torch.Tensor, want: float) -> str:
    """Why the student's absmax differs from max |w|."""
    extreme = float(w[w.abs().argmax()])
    if extreme < 0 and math.isclose(got, extreme, rel_tol=1e-5):
        return (
            f"your absmax is {got:.4g}, negative: this block's largest magnitude is a negative "
            f"weight, and absmax is a magnitude, max |w| = {want:.4g}: use block.abs().max() "
            "(a negative absmax would flip every sign)"
        )
    if math.isclose(got, float(w.max()), rel_tol=1e-5):
        return (
            f"your absmax is block.max() = {got:.4g}, but this block's largest magnitude is "
            f"negative ({extreme:.4g}): the sign matters, so take |w| first, "
            f"block.abs().max() = {want:.4g}"
        )
    if any(math.isclose(got, v, rel_tol=1e-5) for v in (float(w.min()), -float(w.min()))):
        return (
            "your absmax comes from block.min(): use the largest |w|, "
            f"block.abs().max() = {want:.4g}"
        )
    if math.isclose(got, 1.0):
        return (
            f"your absmax is 1: without a per-block scale the levels do not fit the weights "
            f"(here |w| <= {want:.4g}). absmax = block.abs().max(), and w is divided by it"
        )
    return f"absmax should be the block's largest |w|, {want:.4g}; yours is {got:.4g}"


def _codes_hint(codes: torch.Tensor, w: torch.Tensor, absmax: float) -> str:
    """The mistake that gives exactly these codes for block `w`, or where they differ."""
    scaled = w / absmax
    levels = _NF4
    candidates: list[tuple[str, torch.Tensor]] = [
        (
            "no absmax scaling: your codes are the levels nearest to w itself. Divide by "
            "absmax first: the codes index the level nearest to w / absmax, in [-1, 1]",
            _nearest(w, NF4_LEVELS),
        ),
        (
            "you multiplied by absmax: divide instead, the level nearest to w / absmax",
            _nearest(w * absmax, NF4_LEVELS),
        ),
    ]
    candidates += [
        (f"wrong code table: those codes use {name}. {_TABLE_TIP}", _nearest(scaled, table))
        for name, table in _WRONG_TABLES.items()
    ]
    candidates += [
        (
            "rounding to the wrong neighbour: your codes take the level just below w / absmax "
            "(floor). Take the nearest level: the smallest |w / absmax - level|",
            (torch.searchsorted(levels, scaled, right=True) - 1).clamp(0, 15),
        ),
        (
            "rounding to the wrong neighbour: your codes take the level just above w / absmax "
            "(ceil). Take the nearest level: the smallest |w / absmax - level|",
            torch.searchsorted(levels, scaled).clamp(0, 15),
        ),
        (
            "the sign is lost: your codes are those of |w| / absmax. NF4 has negative levels "
            "(codes 0..6): quantise w / absmax with its sign",
            _nearest(scaled.abs(), NF4_LEVELS),
        ),
        (
            "the sign is flipped: your codes are those of -w / absmax",
            _nearest(-scaled, NF4_LEVELS),
        ),
    ]
    for hint, wrong in candidates:
        if torch.equal(codes, wrong):
            return hint
    want = _nearest(scaled, NF4_LEVELS)
    i = int((codes != want).nonzero()[0])
    return (
        f"for w = {float(w[i]):.4g} (w / absmax = {float(scaled[i]):.4f}) your code is "
        f"{int(codes[i])} (level {float(levels[codes[i]]):.4f}); the nearest NF4 level is "
        f"{float(levels[want[i]]):.4f}, code {int(want[i])}"
    )


def _dequantize_hint(out: torch.Tensor, codes: torch.Tensor, absmax: float) -> str:
    """The mistake that gives exactly this dequantized block, or what the formula is."""
    lv = _NF4[codes]
    candidates = [
        (
            "no absmax scaling: you returned the levels NF4_LEVELS[code] alone. Multiply back "
            "by absmax: w ≈ NF4_LEVELS[code] * absmax",
            lv,
        ),
        ("you divided by absmax: multiply, w ≈ NF4_LEVELS[code] * absmax", lv / absmax),
    ]
    candidates += [
        (f"wrong code table: that decodes with {name}. {_TABLE_TIP}", _tensor(t)[codes] * absmax)
        for name, t in _WRONG_TABLES.items()
    ]
    candidates += [
        (
            "the sign is lost: your values are all >= 0; NF4_LEVELS[code] keeps its sign",
            lv.abs() * absmax,
        ),
        ("the sign is flipped: w ≈ NF4_LEVELS[code] * absmax, not minus that", -lv * absmax),
    ]
    for hint, wrong in candidates:
        if _close(out, wrong):
            return hint
    return "it should be NF4_LEVELS[code] * absmax, code by code"


def _tensor(table: Sequence[float]) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.float32)


@_safe
def check_nf4(quantize: Callable, dequantize: Callable) -> Feedback:
    """Exercise 7: NF4 quantise/dequantise of one block of 64, against lab.quant's blockwise code.

    quantize(block (64,) float32) -> (codes (64,) integers 0..15, absmax: a number);
    dequantize(codes (64,) long, absmax 0-d float32 tensor) -> (64,) float32.
    """
    blocks = _nf4_blocks()
    dtype_why = "like the block (the levels times a float32 absmax)"
    mask_tip = dict.fromkeys(
        ("mask",),
        "Indexing with a uint8 tensor is read as a mask: index with codes.long()",
    )
    # 1. my_quantize, block by block: absmax first, then the codes.
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want_absmax = float(ref_absmax[0])
        given = block.clone()
        out, problem = _call(
            quantize, "my_quantize", NF4_QUANTIZE_TODO, given, call="my_quantize(block)"
        )
        if problem:
            return problem
        if not torch.equal(given, block):
            return _no("my_quantize changed the block in place: compute new tensors instead")
        if not isinstance(out, tuple | list) or len(out) != 2:
            got = (
                f"a {type(out).__name__}"
                if not isinstance(out, tuple | list)
                else f"{len(out)} values"
            )
            return _no(f"my_quantize should return two things, (codes, absmax); it returned {got}")
        codes, why = _as_codes(out[0])
        if codes is None:
            return _no(f"on {name}: {why}")
        absmax, why = _as_absmax(out[1])
        if absmax is None:
            return _no(f"on {name}: {why}")
        if not math.isclose(absmax, want_absmax, rel_tol=1e-5):
            return _no(f"on {name}: {_absmax_hint(absmax, block, want_absmax)}")
        if not torch.equal(codes, ref_codes.long()):
            wrong = int((codes != ref_codes.long()).sum())
            hint = _codes_hint(codes, block, want_absmax)
            return _no(f"on {name}, {wrong} of your 64 codes differ from lab.quant's: {hint}")
    # 2. my_dequantize on the lab's codes.
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want = dequantize_blockwise(ref_codes, ref_absmax, "nf4", NF4_BLOCK)
        codes, absmax = ref_codes.long(), ref_absmax[0].clone()
        out, problem = _call(
            dequantize,
            "my_dequantize",
            NF4_DEQUANTIZE_TODO,
            codes,
            absmax,
            call="my_dequantize(codes, absmax)",
        )
        if problem:
            return problem
        if not (torch.equal(codes, ref_codes.long()) and torch.equal(absmax, ref_absmax[0])):
            return _no("my_dequantize changed codes or absmax in place: compute a new tensor")
        if problem := _bad_tensor(out, "my_dequantize", want, dtype_why):
            return problem
        if not _close(out.detach(), want):
            hint = _dequantize_hint(out.detach(), codes, float(absmax))
            return _no(
                f"on {name}, my_dequantize differs from lab.quant's "
                f"{_where(out.detach() - want)}: {hint}"
            )
    # 3. The round trip, your codes into your dequantize (a uint8 code tensor can trip it).
    errors = []
    for name, block in blocks:
        ref_codes, ref_absmax = quantize_blockwise(block, "nf4", NF4_BLOCK)
        want = dequantize_blockwise(ref_codes, ref_absmax, "nf4", NF4_BLOCK)
        pair, problem = _call(quantize, "my_quantize", NF4_QUANTIZE_TODO, block.clone())
        if problem:
            return problem
        out, problem = _call(
            dequantize,
            "my_dequantize",
            NF4_DEQUANTIZE_TODO,
            *pair,
            hints=mask_tip,
            call="my_dequantize(*my_quantize(block))",
        )
        if problem:
            return _no(f"on your own codes, my_dequantize(*my_quantize(block)): {problem.message}")
        if problem := _bad_tensor(out, "my_dequantize(*my_quantize(block))", want, dtype_why):
            return problem
        if not _close(out.detach(), want):
            return _no(
                f"on {name}, my_dequantize(*my_quantize(block)) differs from lab.quant's round "
                f"trip {_where(out.detach() - want)}, though each is right on the lab's values: "
                "does my_dequantize read the codes and absmax that my_quantize returns?"
            )
        errors.append(float((want - block).abs().max() / ref_absmax[0]))
    return Feedback(
        True,
        f"my_quantize and my_dequantize match lab.quant on {len(blocks)} blocks of 64 (normal "
        "weights, values on the levels, values near the midpoints, a negative extreme): "
        "absmax = max |w|, code = index of the NF4 level nearest to w / absmax, "
        "w ≈ NF4_LEVELS[code] * absmax. On the normal block the round trip is off by at most "
        f"{errors[0]:.3f} x absmax (at most half the gap between two neighbouring levels). "
        "Storage: 64 codes of 4 bits (32 bytes) and one float32 absmax (4 bytes) make 4.5 bits "
        "per weight; double quantisation stores absmax in 8 bits, 4.127.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 8: DoRA's forward
# ---------------------------------------------------------------------------------------------

DORA_CALL = "my_dora_forward(x, W, A, B, m, scaling)"
DORA_TODO = (
    "Write the body: m / ||W + scaling · B A|| (one norm per output row) times "
    "(x Wᵀ + scaling · x Aᵀ Bᵀ)."
)
_DORA_AXIS = (
    "the norm is over the wrong axis: .norm(dim=0) gives one norm per input column. DoRA "
    "takes one per output row, over the input dimension, (W + ΔW).norm(dim=1): shape (out,), "
    "like m"
)
_DORA_BROADCAST = (
    "m and the norms scale the input columns: m * V / V.norm(dim=1) broadcasts them along "
    "V's last dimension (in). They belong to the output rows: (m / V.norm(dim=1))[:, None] * V, "
    "or scale the output y's last dimension"
)


def _dora_case(
    n_in: int = 12, n_out: int = 12, rank: int = 4, alpha: float = 6.0, seed: int = 11
) -> tuple[DoRALinear, torch.Tensor]:
    """A lab DoRALinear (no bias, B != 0, m away from ||W|| and ||W + ΔW||) and x (2, 3, in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layer's own init leaves torch's seed alone
        layer = DoRALinear(nn.Linear(n_in, n_out, bias=False), rank, alpha)
    with torch.no_grad():
        for t in (layer.base.weight, layer.lora_A, layer.lora_B):
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
        folded = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
        # 30 to 70% above ||W + ΔW||: with m = ||W + ΔW|| DoRA would compute LoRA's output
        layer.magnitude.copy_(folded.norm(dim=1) * (1.3 + 0.4 * torch.rand(n_out, generator=g)))
    return layer.eval(), torch.randn(2, 3, n_in, generator=g)


def _dora_mistakes(
    x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float
) -> list[tuple[str, torch.Tensor]]:
    """(hint, the output that mistake gives) for this case, in the order they are tried."""

    def path(k: float) -> torch.Tensor:  # x (W + k B A)^T, in two thin matmuls
        return x @ W.T + k * (x @ A.T @ B.T)

    def v(k: float) -> torch.Tensor:
        return W + k * (B @ A)

    rows = v(s).norm(dim=1)
    mistakes = [
        (_DORA_AXIS, x @ (m[:, None] * v(s) / v(s).norm(dim=0)).T),
        (
            "that divides by the norm of the whole matrix: DoRA takes one norm per output row, "
            "(W + ΔW).norm(dim=1)",
            m / v(s).norm() * path(s),
        ),
        (
            "the magnitude is not applied: you return the direction (W + ΔW) / ||W + ΔW|| "
            "alone. Multiply each output row by m",
            path(s) / rows,
        ),
        (
            "that is plain LoRA's output, x (W + ΔW)ᵀ: DoRA rescales each output row by "
            "m / ||W + ΔW||",
            path(s),
        ),
        (
            "you multiplied by m but did not divide by ||W + ΔW|| (one norm per output row)",
            m * path(s),
        ),
        (
            "you divided by the norm of W: DoRA normalises the adapted weight, "
            "||W + ΔW|| with ΔW = scaling · B A",
            m / W.norm(dim=1) * path(s),
        ),
        (
            "the low-rank update is missing from the output: add scaling · x Aᵀ Bᵀ",
            m / rows * path(0),
        ),
        (
            "the scaling is not applied: ΔW = scaling · B A, in the norm and in the update",
            m / v(1).norm(dim=1) * path(1),
        ),
        (
            "the scaling is applied twice, in the norm and in the update",
            m / v(s * s).norm(dim=1) * path(s * s),
        ),
        ("the scaling is missing from the update: scaling · x Aᵀ Bᵀ", m / rows * path(1)),
        (
            "the scaling is missing from the norm: ||W + scaling · B A||",
            m / v(1).norm(dim=1) * path(s),
        ),
        ("the scaling is applied twice in the update", m / rows * path(s * s)),
        ("the scaling is applied twice in the norm", m / v(s * s).norm(dim=1) * path(s)),
    ]
    if W.shape[0] == W.shape[1]:  # these only run without a shape error on a square W
        mistakes[1:1] = [
            (_DORA_AXIS, m / v(s).norm(dim=0) * path(s)),
            (_DORA_BROADCAST, x @ ((m / rows)[None, :] * v(s)).T),
            (
                "m scales the input columns (m * V broadcasts along V's last dimension): m has "
                "one entry per output row, m[:, None] * V / ||V||",
                x @ (m[None, :] * v(s) / rows[:, None]).T,
            ),
        ]
    return mistakes


def _dora_hint(out: torch.Tensor, layer: DoRALinear, x: torch.Tensor) -> str | None:
    W, A, B = layer.base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    with torch.no_grad():
        mistakes = _dora_mistakes(x, W, A, B, layer.magnitude.detach(), layer.scaling)
    return next((hint for hint, wrong in mistakes if _close(out, wrong)), None)


@_safe
def check_dora_forward(fn: Callable) -> Feedback:
    """Exercise 8: fn(x, W, A, B, m, scaling) must equal lab.DoRALinear's forward (no bias)."""

    def run(layer: DoRALinear, x: torch.Tensor) -> tuple[object, Feedback | None]:
        W, A, B, m = layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude
        inputs = {"x": x, "W": W, "A": A, "B": B, "m": m}
        saved = {k: v.detach().clone() for k, v in inputs.items()}
        (out_f, in_f), r = W.shape, A.shape[0]
        shapes = (
            f"x is (..., in) = (..., {in_f}), W (out, in) = ({out_f}, {in_f}), A (r, in) = "
            f"({r}, {in_f}), B (out, r) = ({out_f}, {r}), m (out,) = ({out_f},): ΔW = "
            "scaling * B @ A is (out, in), and its norm is one per output row, norm(dim=1)"
        )
        hints = dict.fromkeys(("shape", "size", "dimension"), shapes)
        args = (x, W, A, B, m, layer.scaling)
        out, problem = _call(fn, "my_dora_forward", DORA_TODO, *args, hints=hints, call=DORA_CALL)
        if problem:
            return None, problem
        changed = [k for k, v in inputs.items() if not torch.equal(v.detach(), saved[k])]
        if changed:
            return None, _no(f"my_dora_forward changed {changed[0]} in place: a forward must not")
        want = x.new_empty(*x.shape[:-1], out_f)
        problem = _bad_tensor(out, "my_dora_forward", want, "like x and W")
        return (None, problem) if problem else (out, None)

    layer, x = _dora_case()
    with torch.no_grad():
        ref = layer(x)
    raw, problem = run(layer, x)
    if problem:
        return problem
    out = raw.detach()
    if not _close(out, ref):
        hint = _dora_hint(out, layer, x) or (
            "compare with y = m / ||W + scaling · B A|| * (x Wᵀ + scaling · x Aᵀ Bᵀ), the norm "
            "taken per output row, (W + scaling * B @ A).norm(dim=1)"
        )
        return _no(f"your output differs from lab.DoRALinear's {_where(out - ref)}: {hint}")

    # Training needs the gradient to reach m, A and B through the output.
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    (want_m,) = torch.autograd.grad((layer(x) * weights).sum(), (layer.magnitude,))
    if not raw.requires_grad:
        return _no(
            "your output carries no gradient, so training would never change m, A or B: do not "
            "compute it under torch.no_grad() or detach it"
        )
    params = (layer.magnitude, layer.lora_A, layer.lora_B)
    got = torch.autograd.grad((raw * weights).sum(), params, allow_unused=True)
    if got[0] is None or not _close(got[0], want_m):
        return _no(
            "the gradient reaching m through your output is wrong: use m as given "
            "(no .detach(), no copies of m)"
        )
    for name, g in zip(("A", "B"), got[1:], strict=True):
        if g is None:
            return _no(
                f"no gradient reaches {name} through your output: compute ΔW from A and B as "
                f"given (no .detach(), no copies of {name})"
            )

    # Another layer, not square: a function that hard-codes this layer's numbers shows it here.
    layer2, x2 = _dora_case(10, 6, 2, 8.0, seed=12)
    with torch.no_grad():
        ref2 = layer2(x2)
    out2, problem = run(layer2, x2)
    second = "on a second layer (in 10, out 6, rank 2, scaling 4)"
    if problem:
        return _no(f"{second}: {problem.message}")
    if not _close(out2.detach(), ref2):
        hint = _dora_hint(out2.detach(), layer2, x2) or (
            "your function is right for the first layer but not for this one: use its "
            "arguments (W, A, B, m, scaling), not fixed numbers"
        )
        return _no(f"{second}, your output differs {_where(out2.detach() - ref2)}: {hint}")
    return Feedback(
        True,
        "my_dora_forward equals lab.DoRALinear's forward on two layers (12 -> 12 and 10 -> 6), "
        "the gradient reaching m included: each output row i is rescaled by "
        "m[i] / ||row i of W + scaling · B A||, so m sets the length of every row of the "
        "adapted weight and W + ΔW only its direction. With m = ||W + ΔW|| it is LoRA again.",
    )
