"""LoRA, the layer: a frozen linear plus a trainable low-rank update (notebook 03, written out).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685,
Section 4.1: keep the pretrained weight W frozen and learn its change as a product of two
thin matrices, ΔW = B A of rank r, scaled by alpha / r:

    h = W x + (alpha / r) B A x

                      x  (..., in)
                      |
         +------------+------------+
         |                         |
         |                      dropout            (the adapter path only)
         v                         v
   +------------+          +---------------+
   |     W      |          |  A  (r, in)   |       random (Kaiming uniform), trains
   |  (out, in) |          +---------------+
   |   frozen   |                  |  (..., r)
   +------------+          +---------------+
         |                 |  B  (out, r)  |       zeros, trains
         |                 +---------------+
         |                         |  * alpha / r
         v                         v
     pretrained        +         lora          =  h  (..., out)

Only r * (in + out) numbers train instead of in * out. B starts at zero, so a fresh adapter
leaves the model's outputs exactly unchanged. After training ΔW can be folded into W
(`merge()`, from lab/merging.py) and inference costs nothing extra.

Where the rest lives: putting layers into a model (add_lora, merge_lora, counts) in
lab/surgery.py; adapter files in lab/adapters.py; the checks made before building in
lab/checks.py; a 4-bit base's weight in lab/frozen.py; flavours (DoRA, PiSSA) in lab/variants/.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_base, check_wrappable, layer_config
from .config import INITS, Init, LoRAConfig, Variant, register_init, register_variant
from .frozen import frozen_weight, weight_dtype_device
from .merging import MergeMixin

__all__ = ["LoRALinear"]


class LoRALinear(MergeMixin, nn.Module):
    """A frozen linear plus a trainable low-rank update scaling * B @ A.

    Built from a LoRAConfig (`LoRALinear(base, config=cfg)`) or from its numbers
    (`LoRALinear(base, rank=4, alpha=8)`). The base is an nn.Linear or a quantised linear
    (lab.quant.Linear4bit); either way it stays frozen.
    """

    variant_name = "lora"

    def __init__(
        self,
        base: nn.Module,
        rank: int | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        *,
        config: LoRAConfig | None = None,
    ) -> None:
        # Everything is checked before anything changes: a refused base keeps requires_grad.
        check_wrappable(base, LoRALinear)
        config = layer_config(config, rank, alpha, dropout, rslora, self.variant_name)
        check_base(base, config, type(self))
        super().__init__()
        self.base = base
        trains = [(p, p.requires_grad) for p in base.parameters()]
        for p, _ in trains:
            p.requires_grad_(False)
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = config.rank, config.alpha, config.rslora
        self.dropout_p = config.dropout
        self.lr_ratio = config.lr_ratio  # LoRA+: B trains at lr_ratio times A's rate
        # alpha / r; rsLoRA (Kalajdzievski 2023) divides by sqrt(r) instead, so the update's
        # size does not shrink as the rank grows.
        self.scaling = config.scaling
        self._init_merge_state()  # merged = False, and what a merge will record
        # Adapters train in (at least) fp32 even on a bf16/fp16 base: tiny updates to small
        # matrices would be rounded away in half precision. A float64 base keeps float64.
        w_dtype, device = weight_dtype_device(base)
        like = {"dtype": torch.promote_types(w_dtype, torch.float32), "device": device}
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, **like))  # (out, r)
        # A is initialised like nn.Linear's weight; B = 0 makes the initial update exactly zero.
        # (On the meta device this is a no-op: there is no data to fill.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        try:
            INITS[config.init].apply(self)  # "default" keeps the above; PiSSA replaces A, B and W
            self.reset_variant_state()
        except BaseException:  # an init that refuses this W leaves the base as it found it
            for p, grad in trains:
                p.requires_grad_(grad)
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x + (alpha / r) B A dropout(x): (..., in_features) -> (..., out_features)."""
        pretrained = self.base(x)
        if self.merged:  # ΔW already lives inside the base weight
            return pretrained
        # Dropout touches only the adapter's input, never the frozen path. The scaling multiplies
        # the narrow (..., r) intermediate, not the wide (..., out) update: same algebra.
        h = self.dropout(x.to(self.lora_A.dtype))
        lora = F.linear(F.linear(h, self.lora_A) * self.scaling, self.lora_B)
        return pretrained + lora.to(pretrained.dtype)  # a half-precision base adds in its dtype

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A, shape (out_features, in_features), in the base weight's dtype."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # computed in the adapter's fp32
        dtype, device = weight_dtype_device(self.base)
        return delta.to(dtype=dtype, device=device)

    def merged_weight(self) -> torch.Tensor:
        """The weight a merge writes: W + ΔW (in fp32, rounded once to W's dtype)."""
        return self._folded_weight(+1)

    def base_weight(self) -> torch.Tensor:
        """The frozen (out, in) weight W, dequantised if the base is quantised."""
        return frozen_weight(self.base)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The layer's trainable tensors by name: lora_A and lora_B (and a variant's own)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def reset_variant_state(self) -> None:
        """Hook for variants with state of their own (DoRA's magnitude); plain LoRA has none."""

    def extra_repr(self) -> str:
        """Summary shown by print(model)."""
        extra = ""
        if self.config.variant != "lora":
            extra += f", variant={self.config.variant}"
        if self.config.init != "default":
            extra += f", init={self.config.init}"
        if self.lr_ratio != 1:
            extra += f", lr_ratio={self.lr_ratio:g}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"dropout={self.dropout_p:g}, rslora={self.rslora}{extra}, merged={self.merged}"
        )


def _default_init(layer: LoRALinear) -> None:
    """Hu et al. 2021: A random (as built), B = 0, so B A = 0 and the model is unchanged."""


def _b_is_zero(layer: LoRALinear) -> bool:
    """Still at the 2021 start? Only a gradient step moves B off zero."""
    return not bool(layer.lora_B.detach().any())


register_variant(
    Variant(
        "lora",
        LoRALinear,
        "LoRA (Hu et al. 2021): W + (alpha/r) B A",
        batched=True,
        display="LoRA",
    )
)
register_init(
    Init(
        "default",
        _default_init,
        "A random (Kaiming uniform), B = 0: B A = 0 at the start",
        batched=True,
        at_start=_b_is_zero,
    )  # fmt: skip
)
