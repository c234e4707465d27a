"""LoRA-FA (Zhang et al. 2023, arXiv:2308.03303): freeze A at its random start, train only B.

The layer is LoRA's, h = W x + (alpha/r) B A x, with A drawn as usual (Kaiming uniform) and then
never trained; B starts at zero and is the only trainable tensor (section 3 of the paper):

    trainable numbers: out * r instead of r * (in + out), half of LoRA's on a square layer

and the memory it saves is the activation: A's gradient, dL/dA = (dL/du)^T x, needs the layer's
input x kept from the forward pass; with A frozen, autograd keeps only the r-wide A x that B's
gradient needs. A fresh adapter changes nothing (B = 0).

A is still part of the adapter: saved, loaded and merged with B (adapter_parameters hands it out
detached, so that add_lora, which turns on requires_grad for every adapter tensor, leaves it
frozen). PEFT has LoRA-FA as an optimizer (peft.optimizers.create_lorafa_optimizer): it freezes
lora_A the same way, and also projects B's gradient by (A A^T)^-1 / scaling^2, a later
refinement that this layer does not make (B trains with the lab's plain AdamW, as in the paper).
"""

from __future__ import annotations

from torch import nn

from ..config import Variant, register_variant
from ..lora import LoRALinear
from .registry import BatchedForm

__all__ = ["LoRAFALinear"]


class LoRAFALinear(LoRALinear):
    """LoRALinear whose A keeps its random start: only B (out, r) trains."""

    variant_name = "lora-fa"

    def reset_variant_state(self) -> None:
        """Freeze A where it was drawn (add_lora would otherwise train it: see the module)."""
        self.lora_A.requires_grad_(False)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """lora_A (detached: saved and loaded, never trained) and lora_B (trained)."""
        return {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B}


register_variant(
    Variant(
        "lora-fa",
        LoRAFALinear,
        "LoRA-FA (Zhang et al. 2023): W + (alpha/r) B A, A frozen at its random start",
        # In a batched run: the stacked LoRA layer, A's learning rate 0 for its configurations.
        batched=BatchedForm(frozen=("lora_A",)),
        display="LoRA-FA",
    )
)
