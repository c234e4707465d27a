"""PiSSA (Meng et al. 2024): start the adapter on W's principal singular directions.

With W = U S V^T and r the rank, A and B take the top r singular triplets and the frozen base
keeps the residual:

    B = U_r sqrt(S_r / scaling),  A = sqrt(S_r / scaling) V_r^T,  W_res = W - scaling * B A

so base + adapter compute exactly W at the start (up to rounding), but the base alone does
not: PiSSA's "fresh adapter" property is about the pair. Training then moves the directions
that matter most instead of a random subspace. Dropping the adapter unmerged gives W back.

The machinery (take r singular triplets of W into A and B, keep what was moved so that the
doctor can compare and removal can restore) serves any init that starts from W's singular
directions: `singular_directions_init` makes its record, top or minor ones.
"""

from __future__ import annotations

import functools

import torch

from ..config import Init, register_init
from ..frozen import is_quantized
from ..lora import LoRALinear

__all__ = ["singular_directions_init", "singular_init"]


def _check(name: str, display: str, base, config) -> None:
    """Refuse a 4-bit base: the init needs the full-precision W."""
    if is_quantized(base):
        raise ValueError(
            f"init={name!r} rewrites W as its residual W - scaling * B A and needs the "
            "full-precision W to take its singular directions; on a 4-bit base use "
            f"init='default' (or apply {display} before lab.quantize_base)"
        )


@torch.no_grad()
def singular_init(layer: LoRALinear, name: str, minor: bool) -> None:
    """Put W's top (minor=False) or bottom (minor=True) rank singular triplets into B A.

    B = U_r sqrt(S_r / scaling), A = sqrt(S_r / scaling) V_r^T, and W keeps W - scaling * B A.
    """
    w = layer.base.weight
    if w.is_meta:  # shapes only: nothing to decompose
        return
    u, s, vh = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    r, scaling = layer.rank, layer.scaling
    # A direction whose singular value is exactly zero gives a zero row of A and a zero column
    # of B: both factors' gradients are then zero, and it can never train. (A tiny nonzero one,
    # rounding noise, still trains: Adam's steps do not shrink with the gradient.)
    k = int((s > 0).sum())
    if k == 0:
        raise ValueError(
            f"init={name!r} on an all-zero weight: it has no singular direction to start from, "
            "and A and B would both start at zero and never train; use init='default'"
        )
    if minor and k < len(s):
        raise ValueError(
            f"init={name!r}: this weight has {len(s) - k} singular values of exactly zero, and "
            f"its {r} smallest would start with A and B both zero and never train; use "
            "init='default' here"
        )
    if k < r:
        raise ValueError(
            f"init={name!r} with rank={r}: this weight has only {k} nonzero singular values, so "
            f"{r - k} of its directions would start with A and B both zero and never train; "
            f"use rank <= {k} here, or init='default'"
        )
    pick = slice(len(s) - r, None) if minor else slice(0, r)
    root = (s[pick] / scaling).sqrt()
    b = u[:, pick] * root  # (out, r)
    a = root[:, None] * vh[pick]  # (r, in)
    layer.lora_A.copy_(a.to(layer.lora_A.dtype))
    layer.lora_B.copy_(b.to(layer.lora_B.dtype))
    residual = w.to(torch.float64) - scaling * (b @ a)
    w.copy_(residual.to(w.dtype))
    # What was moved out of W, kept (not saved) so that removing the adapter restores W.
    layer.register_buffer("_init_A0", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("_init_B0", layer.lora_B.detach().clone(), persistent=False)


@torch.no_grad()
def _restore(layer: LoRALinear) -> None:
    w = layer.base.weight
    moved = (layer._init_B0.double() @ layer._init_A0.double()) * layer.scaling
    w.copy_((w.to(torch.float64) + moved.to(w.device)).to(w.dtype))


def _at_start(layer: LoRALinear) -> bool | None:
    """True while A and B are exactly the directions the init took from W (B starts nonzero)."""
    a0, b0 = getattr(layer, "_init_A0", None), getattr(layer, "_init_B0", None)
    if a0 is None or b0 is None:
        return None
    return bool(torch.equal(layer.lora_A.detach(), a0)) and bool(
        torch.equal(layer.lora_B.detach(), b0)
    )


def singular_directions_init(name: str, display: str, summary: str, minor: bool) -> Init:
    """The record of an init that starts from W's top (PiSSA) or minor (MiLoRA) directions.

    lab.engine.batched reproduces it by subtracting each configuration's s B0 A0 from the shared W;
    add_lora puts W back if anything fails half way; removing the adapter unmerged restores W;
    the doctor compares A and B with their start.
    """
    return Init(
        name,
        functools.partial(singular_init, name=name, minor=minor),
        summary,
        batched=True,
        changes_base=True,
        check=functools.partial(_check, name, display),
        restore=_restore,
        at_start=_at_start,
        display=display,
    )


register_init(
    singular_directions_init(
        "pissa",
        "PiSSA",
        "PiSSA (Meng et al. 2024): A, B from W's top-r singular directions, W keeps the rest",
        minor=False,
    )
)
