"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

The adapted weight is split into a direction and a magnitude:

    W' = m * (W + ΔW) / ||W + ΔW||,   ΔW = scaling * B A,   norms per output row

m (one number per output feature) is trained next to A and B; it starts at ||W|| (B = 0), so a
fresh DoRA layer computes exactly W. As in the paper (section 4.3) and PEFT, the norm is treated
as a constant in the backward pass (detached): it saves memory and barely changes training.

A row whose W + ΔW is all zero has no direction to rescale: m / ||W + ΔW|| would be 0/0. There
the layer uses a scale of 1 (the row computes W + ΔW, zero; m gets no gradient from it), so a
fresh layer on a weight with a zero row, common after 4-bit quantisation, still computes exactly
W. (PEFT 0.21 divides regardless and outputs NaN there.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Variant, register_variant
from ..frozen import is_quantized
from ..lora import LoRALinear
from .registry import BatchedForm

__all__ = ["DoRALinear", "batched_output", "row_scale"]


def row_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||W + ΔW|| per output row, and 1 where the row's norm is 0 (no direction to scale)."""
    zero = norm == 0
    one = torch.ones_like(norm)
    # The divisor is made safe too: where() would otherwise send 0 * inf = NaN back as m's grad.
    return torch.where(zero, one, magnitude / torch.where(zero, one, norm))


class DoRALinear(LoRALinear):
    """LoRALinear plus a trainable magnitude vector (out_features,)."""

    variant_name = "dora"

    def reset_variant_state(self) -> None:
        """m = ||W + ΔW|| per output row, so the layer starts out computing W + ΔW."""
        with torch.no_grad():
            norm = self.weight_norm()
        rows = (~torch.isfinite(norm)).nonzero().flatten().tolist() if not norm.is_meta else []
        if rows:  # finite entries whose squares overflow: m / ||W|| would be inf / inf
            raise ValueError(
                f"DoRA: row {rows[0]} of W has norm inf in {norm.dtype} ({len(rows)} rows in "
                "all): its entries are too large to take a norm of; rescale the base or use "
                "variant='lora'"
            )
        self.magnitude = nn.Parameter(norm.clone())
        self.register_buffer("_merged_m", None, persistent=False)
        # W as it was before merge(): see merge() for why it is kept.
        self.register_buffer("_pre_merge_weight", None, persistent=False)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_parameters(), "magnitude": self.magnitude}

    def weight_norm(self) -> torch.Tensor:
        """||W + scaling * B A|| over the input dimension: one norm per output feature (fp32)."""
        w = self.base_weight().to(self.lora_A.dtype)
        return (w + (self.lora_B @ self.lora_A) * self.scaling).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): m / ||W + ΔW|| * (x W^T + x ΔW^T) + bias."""
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x.to(self.lora_A.dtype))
        scale = row_scale(self.magnitude, self.weight_norm().detach())  # (out,)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        if self.training and isinstance(self.dropout, nn.Dropout):
            # The base part of the rescaling sees the same dropped input as the adapter.
            base_part = F.linear(h, self.base_weight().to(h.dtype))
        else:
            bias = self.base.bias
            base_part = out if bias is None else out - bias
        extra = (scale - 1) * base_part.to(scale.dtype) + scale * lora
        return out + extra.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The change merge() makes to W: m / ||W + ΔW|| * (W + ΔW) - W."""
        w = self.base_weight()
        return (self.merged_weight().to(torch.float32) - w.to(torch.float32)).to(w.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = self.base_weight()
        folded = w.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A) * self.scaling
        scale = row_scale(self.magnitude, folded.norm(dim=1))
        return (scale[:, None] * folded).to(w.dtype)

    def _record_merge(self) -> None:
        super()._record_merge()
        self._merged_m = self.magnitude.detach().clone()

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Write m / ||W + ΔW|| * (W + ΔW) into W, keeping a copy of W for unmerge.

        Unlike LoRA's W + ΔW, this cannot always be undone by arithmetic: a row with m = 0 is
        written as zeros (W's row is gone, and dividing by the scale gives 0/0), and a tiny m
        leaves too few digits to divide back. So the W from before the merge is kept, and
        unmerge puts it back bit for bit (a 4-bit base is kept whole in any case).
        """
        keep = not self.merged and not is_quantized(self.base)
        before = self.base.weight.detach().clone() if keep else None
        super().merge(requantize)
        if keep and self.merged:
            self._pre_merge_weight = before

    def adapter_changed_since_merge(self) -> bool:
        changed = super().adapter_changed_since_merge()
        if not self.merged or self._merged_m is None:
            return changed
        return changed or not bool(torch.equal(self._merged_m, self.magnitude.detach()))

    @torch.no_grad()
    def _unfolded_weight(self) -> torch.Tensor:
        """The W kept by merge()."""
        if self._pre_merge_weight is None:  # merged flag set by hand: nothing recorded
            raise RuntimeError("this DoRA layer has no record of its merge; cannot unmerge")
        return self._pre_merge_weight

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        if not self.merged:
            self._pre_merge_weight = self._merged_m = None


def batched_output(layer, out, h, u, a, b, which) -> torch.Tensor:
    """DoRA's rows in the batched engine's stacked layer (lab.engine.batched_layer), as DoRALinear.

    result = out + (m/n - 1) * base_part + (m/n) * lora, n = ||W_k + ΔW_k|| per row
    (detached); base_part is x W_k^T (the dropped input's, for DoRA with dropout). The
    configurations not in `which` get a scale of 1: plain LoRA's out + lora.
    """
    k, n_out = layer.n_configs, layer.out_features
    w_k = layer.frozen_weights()  # (K or 1, out, in)
    norm = (w_k + layer.scaling * (b @ a)).norm(dim=2).detach()  # (K, out)
    # m / n, and 1 on a row with no direction (n = 0), as DoRALinear does: never 0/0.
    scale = torch.where(which[:, None], row_scale(layer.magnitude, norm), torch.ones_like(norm))
    scale = scale[:, None, :]  # (K, 1, out)
    out3 = out.reshape(k, -1, n_out)
    bias = layer.base.bias
    base_part = out3.to(scale.dtype) if bias is None else (out3 - bias).to(scale.dtype)
    dropped = [bool(w) and p > 0 for w, p in zip(which.tolist(), layer.dropouts, strict=True)]
    if layer.training and any(dropped):
        x_w = torch.matmul(h, w_k.transpose(1, 2))  # (K, N, out): x_dropped W_k^T
        use = torch.tensor(dropped, device=out.device)[:, None, None]
        base_part = torch.where(use, x_w, base_part)
    lora = torch.bmm(u, b.transpose(1, 2))  # (K, N, out)
    extra = (scale - 1) * base_part + scale * lora
    return (out3 + extra.to(out.dtype)).view(out.shape)


register_variant(
    Variant(
        "dora",
        DoRALinear,
        "DoRA (Liu et al. 2024): m * (W + (alpha/r) B A) / ||W + (alpha/r) B A||",
        # In a batched run: a stacked magnitude (K, out) and per-configuration norms.
        batched=BatchedForm(extra=("magnitude",), output=batched_output),
        display="DoRA",
    )
)
