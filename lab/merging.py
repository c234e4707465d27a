"""Merging: fold a LoRA layer's update into its frozen weight, and take exactly that back out.

After training, W <- W + ΔW (ΔW = scaling * B A, the layer's `delta_weight()`) makes inference
cost one ordinary matmul (Hu et al. 2021, Section 4.1: "no additional inference latency").
`MergeMixin` gives lab.LoRALinear (and every flavour built on it) its `merge()` and `unmerge()`:
each is all-or-nothing (a merge that would overflow W writes nothing), unmerge subtracts the ΔW
that was merged even if the adapter changed meanwhile, and a 4-bit base is merged into a
full-precision copy (or, asked to, quantised again) and put back whole on unmerge.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .checks import describe, nonfinite
from .config import INITS
from .frozen import is_quantized
from .quant import dense_linear

__all__ = ["MergeMixin"]


class MergeMixin:
    """merge() and unmerge() for a LoRA layer (it has base, lora_A, lora_B, scaling, merged).

    The layer calls `self._init_merge_state()` in its __init__. While merged it keeps the A, B
    and scaling that were folded into W, so unmerge subtracts the very ΔW that merge added
    (non-persistent buffers: not in state_dict, but they move with .to()).
    """

    def _init_merge_state(self) -> None:
        self.merged = False
        self.register_buffer("_merged_A", None, persistent=False)
        self.register_buffer("_merged_B", None, persistent=False)
        self._merged_scaling = self.scaling
        self._quantized_base: nn.Module | None = None  # the 4-bit base while merged into a copy

    @torch.no_grad()
    def _folded_weight(
        self,
        sign: int,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> torch.Tensor:
        """W ± ΔW computed in fp32 (rounding once, at the end), cast to the base weight's dtype.

        ΔW = scaling * b @ a, by default from the current lora_A, lora_B and scaling.
        """
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        scaling = self.scaling if scaling is None else scaling
        w = self.base_weight()
        delta = (b @ a) * scaling
        return (w.to(delta.dtype) + sign * delta.to(w.device)).to(w.dtype)

    def _check_mergeable(self, name: str = "this layer") -> torch.Tensor:
        """The merged weight, or ValueError if it would contain inf/nan (e.g. fp16 overflow)."""
        new = self.merged_weight()
        if not new.is_meta and not bool(torch.isfinite(new).all()):
            broken = [
                f"{key} has {bad}"
                for key, p in self.adapter_parameters().items()
                if (bad := nonfinite(p))
            ]
            why = (
                f"{'; '.join(broken)} (a diverged run: retrain with a lower lr)"
                if broken
                else f"W + ΔW overflows {new.dtype}"
            )
            raise ValueError(
                f"merging would produce non-finite weights in {name}: {why}; weights left unchanged"
            )
        return new

    def _record_merge(self) -> None:
        """Remember what is being folded in, so unmerge can take out exactly that."""
        self._merged_A = self.lora_A.detach().clone()
        self._merged_B = self.lora_B.detach().clone()
        self._merged_scaling = self.scaling

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold ΔW into the base weight; forward then runs the base alone.

        On a quantised base W + ΔW cannot be written into 4-bit codes exactly. By default the
        base is replaced by a full-precision nn.Linear holding dequantised W + ΔW (exact; the
        4-bit original is kept for unmerge); requantize=True quantises W + ΔW back to 4 bits
        instead (small, lossy: the merge trap). Either way unmerge restores the 4-bit base.
        """
        if self.merged:
            warnings.warn("LoRALinear is already merged; merge() did nothing", stacklevel=2)
            return
        if not isinstance(requantize, bool):
            raise TypeError(f"requantize must be True or False, got {requantize!r}")
        new = self._check_mergeable()
        if is_quantized(self.base):
            self._quantized_base = self.base
            dense = dense_linear(self.base, new)
            if requantize:
                from .quant import Linear4bit

                q = self.base
                dense = Linear4bit.from_linear(
                    dense, scheme=q.scheme, block_size=q.block_size, double_quant=q.double_quant
                )
            self.base = dense
        elif requantize:
            raise ValueError("requantize=True is for a quantised base; this base is an nn.Linear")
        else:
            self.base.weight.copy_(new)
        self._record_merge()
        self.merged = True

    def adapter_changed_since_merge(self) -> bool:
        """True if lora_A, lora_B or the scaling differ from what merge() folded into W."""
        if not self.merged or self._merged_A is None or self.lora_A.is_meta:
            return False
        return not (
            self._merged_scaling == self.scaling
            and self._merged_A.shape == self.lora_A.shape
            and self._merged_B.shape == self.lora_B.shape
            and bool(torch.equal(self._merged_A, self.lora_A.detach()))
            and bool(torch.equal(self._merged_B, self.lora_B.detach()))
        )

    def _unfolded_weight(self) -> torch.Tensor:
        """W recovered from the merged weight (the inverse of merged_weight, from the record)."""
        if self._merged_A is None:  # merged flag set by hand: fall back to the current ΔW
            return self._folded_weight(-1)
        return self._folded_weight(-1, self._merged_A, self._merged_B, self._merged_scaling)

    def _check_unmergeable(self, name: str = "this layer") -> torch.Tensor | None:
        """The W that unmerge writes back (None on a 4-bit base, which was kept whole), or a
        ValueError naming the rows if it would hold NaN or inf: a merged weight edited by hand,
        say. Nothing is written either way."""
        if self._quantized_base is not None:
            return None
        restored = self._unfolded_weight()
        if not restored.is_meta:
            rows = (~torch.isfinite(restored)).any(dim=1).nonzero().flatten().tolist()
            if rows:
                raise ValueError(
                    f"unmerging {name} would write NaN or inf into rows {describe(rows)} of its "
                    "frozen weight (was the merged weight edited?); W is left unchanged and "
                    "the layer stays merged"
                )
        return restored

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract from the base weight the ΔW that merge() added (exact up to rounding).

        The ΔW subtracted is the one merged, from the A, B and scaling recorded at merge time,
        so W comes back to what it was before merge() even if the adapter was edited while
        merged. In that case a UserWarning says so; the edited adapter is kept, and the
        unmerged layer then computes W x + (new ΔW) x. A quantised base is put back as it was.
        """
        if not self.merged:
            warnings.warn("LoRALinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        restored = self._check_unmergeable()
        changed = self.adapter_changed_since_merge()
        if self._quantized_base is not None:
            self.base, self._quantized_base = self._quantized_base, None
        else:
            self.base.weight.copy_(restored)
        self._merged_A = self._merged_B = None
        self.merged = False
        if changed:
            warnings.warn(
                "lora_A/lora_B changed while the layer was merged; unmerge() subtracted the "
                "ΔW that was merged, so W is restored, and the layer now uses the changed "
                "adapter",
                stacklevel=2,
            )

    def removed_base(self, merged: bool) -> nn.Module:
        """The module that takes this layer's place when LoRA is removed.

        The base itself; an init that changed the base (PiSSA) gives it back as it was when
        the adapter is dropped unmerged.
        """
        restore = INITS[self.config.init].restore
        if not merged and restore is not None:
            restore(self)
        return self.base
