"""Exercise 2: merging the adapter into the frozen weight, and leaving the adapters as they were."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from ..lora import LoRALinear
from .compare import _close, _factor, _match_factor, _where
from .feedback import Feedback, _call, _no, _safe
from .forward_check import _SCALING_FACTORS, ALPHA, IN, OUT, RANK

__all__ = [
    "check_merge",
]


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
