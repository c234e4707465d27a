"""PiSSA (Meng et al. 2024): start the adapter on W's principal singular directions.

With W = U S V^T and r the rank, A and B take the top r singular triplets and the frozen base
keeps the residual:

    B = U_r sqrt(S_r / scaling),  A = sqrt(S_r / scaling) V_r^T,  W_res = W - scaling * B A

so base + adapter compute exactly W at the start (up to rounding), but the base alone does
not: PiSSA's "fresh adapter" property is about the pair. Training then moves the directions
that matter most instead of a random subspace. Dropping the adapter unmerged gives W back.
"""

from __future__ import annotations

import torch

from ..config import Init, register_init
from ..frozen import is_quantized
from ..lora import LoRALinear

__all__ = ["pissa_init"]


def _check(base, config) -> None:
    if is_quantized(base):
        raise ValueError(
            "init='pissa' rewrites W as its residual W - scaling * B A and needs the "
            "full-precision W to take its singular directions; on a 4-bit base use "
            "init='default' (or apply PiSSA before lab.quantize_base)"
        )


@torch.no_grad()
def pissa_init(layer: LoRALinear) -> None:
    """Replace A, B with W's top-rank singular directions and W with the residual."""
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
            "init='pissa' on an all-zero weight: it has no singular direction to start from, "
            "and A and B would both start at zero and never train; use init='default'"
        )
    if k < r:
        raise ValueError(
            f"init='pissa' with rank={r}: this weight has only {k} nonzero singular values, so "
            f"{r - k} of PiSSA's directions would start with A and B both zero and never train; "
            f"use rank <= {k} here, or init='default'"
        )
    root = (s[:r] / scaling).sqrt()
    b = u[:, :r] * root  # (out, r)
    a = root[:, None] * vh[:r]  # (r, in)
    layer.lora_A.copy_(a.to(layer.lora_A.dtype))
    layer.lora_B.copy_(b.to(layer.lora_B.dtype))
    residual = w.to(torch.float64) - scaling * (b @ a)
    w.copy_(residual.to(w.dtype))
    # What was moved out of W, kept (not saved) so that removing the adapter restores W.
    layer.register_buffer("_pissa_A0", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("_pissa_B0", layer.lora_B.detach().clone(), persistent=False)


@torch.no_grad()
def _restore(layer: LoRALinear) -> None:
    w = layer.base.weight
    moved = (layer._pissa_B0.double() @ layer._pissa_A0.double()) * layer.scaling
    w.copy_((w.to(torch.float64) + moved.to(w.device)).to(w.dtype))


register_init(
    Init(
        "pissa",
        pissa_init,
        "PiSSA (Meng et al. 2024): A, B from W's top-r singular directions, W keeps the rest",
        batched=True,  # lab.batched subtracts each configuration's s B0 A0 from the shared W
        changes_base=True,
        check=_check,
        restore=_restore,
    )
)
