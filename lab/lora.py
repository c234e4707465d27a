"""Low-Rank Adaptation (LoRA, Hu et al. 2021) written from scratch.

A frozen linear layer y = x W^T + b gets a trainable low-rank update:

    y = x W^T + b + scaling * (x A^T) B^T,    A: (rank, in),  B: (out, rank)

so only rank * (in + out) numbers are trained instead of in * out. B starts at zero, so a fresh
adapter leaves the model's outputs exactly unchanged. After training, ΔW = scaling * B A can be
folded ("merged") into W, and inference costs nothing extra.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .config import (
    ALL_LINEAR,
    INITS,
    VARIANTS,
    Init,
    LoRAConfig,
    Variant,
    check_hparams,
    register_init,
    register_variant,
)
from .fileio import atomic_write_bytes, regular_file
from .quant import dense_linear

__all__ = [
    "LoRALinear",
    "ParamCount",
    "add_lora",
    "check_trainable",
    "count_parameters",
    "load_adapter",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
]

# safetensors metadata of an adapter file: the format and version, the LoRAConfig's to_dict()
# as JSON, and the adapted layers' names (with mixed settings: each layer's own config).
_FORMAT_KEY, _VERSION_KEY = "lora_lab_format", "lora_lab_version"
_CONFIG_KEY, _LAYERS_KEY = "lora_lab_config", "lora_lab_layers"
_FORMAT, _VERSION = "lora-lab-adapter", 2


# ---------------------------------------------------------------------------------------------
# Validation. Every public function checks everything first and changes nothing on error.
# ---------------------------------------------------------------------------------------------


_check_hparams = check_hparams  # the one validation of rank, alpha, dropout and rslora


def _check_model(model: object, what: str = "model") -> None:
    """TypeError unless model is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch nn.Module, got {type(model).__name__}")


def _check_rank_fits(rank: int, linear: nn.Linear, where: str) -> None:
    """A rank above min(in, out) cannot add expressiveness: B A would already be full rank."""
    bound = min(linear.in_features, linear.out_features)
    if rank > bound:
        raise ValueError(
            f"rank={rank} is too large for {where} (in_features={linear.in_features}, "
            f"out_features={linear.out_features}): rank must be <= min(in, out) = {bound}"
        )


def _nonfinite(tensor: torch.Tensor) -> str | None:
    """'1 NaN', '2 inf', '1 NaN and 2 inf' for a tensor holding them; None if all finite."""
    if tensor.is_meta or not tensor.is_floating_point():
        return None
    t = tensor.detach()
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else ""]
    return " and ".join(p for p in parts if p) or None


def _check_finite_base(base: nn.Module, where: str) -> None:
    """ValueError naming the tensor if a frozen linear's weight or bias holds NaN or inf.

    An adapter on such a base outputs NaN from its first step, and the divergence guard would
    then blame the learning rate; PiSSA's SVD would fail on it. A 4-bit base is checked through
    its dequantised weight.
    """
    tensors = {"weight": frozen_weight(base), "bias": getattr(base, "bias", None)}
    for key, tensor in tensors.items():
        bad = None if tensor is None else _nonfinite(tensor)
        if bad:
            raise ValueError(
                f"{where}.{key} has {bad}: the frozen base is broken, so an adapter on it would "
                "output NaN; reload the base model (lab.load_base_model) before add_lora"
            )


# ---------------------------------------------------------------------------------------------
# The frozen base: any linear that can give its weight
# ---------------------------------------------------------------------------------------------


def is_frozen_linear(module: object) -> bool:
    """True for what LoRA can wrap: an nn.Linear, or a quantised linear that can dequantise.

    A quantised linear (lab.quant.Linear4bit) has in_features, out_features, bias and a
    `dequantize()` that returns its (out, in) weight; it has no `.weight` to write into.
    """
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Module)
        and callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def is_quantized(module: object) -> bool:
    """True for a frozen linear that stores its weight quantised (it has no `.weight`)."""
    return is_frozen_linear(module) and not isinstance(module, nn.Linear)


def frozen_weight(base: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a frozen linear (a quantised one gives it dequantised)."""
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize()


def _weight_dtype_device(base: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype the base computes in and the device it lives on, without dequantising."""
    if isinstance(base, nn.Linear):
        return base.weight.dtype, base.weight.device
    tensors = [*base.buffers(), *base.parameters()]
    device = tensors[0].device if tensors else torch.device("cpu")
    return getattr(base, "compute_dtype", torch.float32), device


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update scaling * B @ A.

    Built from a LoRAConfig (`LoRALinear(base, config=cfg)`) or from its numbers
    (`LoRALinear(base, rank=4, alpha=8)`). The base is an nn.Linear or a quantised linear
    (lab.quant.Linear4bit); either way it stays frozen.
    """

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
        if isinstance(base, LoRALinear):
            raise TypeError("base already has LoRA (it is a LoRALinear); wrap a plain nn.Linear")
        if not is_frozen_linear(base):
            raise TypeError(
                f"base must be an nn.Linear, got {type(base).__name__} "
                "(or a quantised linear such as lab.Linear4bit)"
            )
        if config is None:
            defaults = LoRAConfig()
            config = LoRAConfig(
                rank=defaults.rank if rank is None else rank,
                alpha=defaults.alpha if alpha is None else alpha,
                dropout=dropout,
                rslora=rslora,
                variant=self.variant_name,
            )
        elif not isinstance(config, LoRAConfig):
            raise TypeError(f"config must be a lab.LoRAConfig, got {type(config).__name__}")
        elif rank is not None or alpha is not None or dropout or rslora:
            raise TypeError("give either config=LoRAConfig(...) or rank/alpha/..., not both")
        _check_rank_fits(config.rank, base, "this layer")
        _check_finite_base(base, "base")
        variant_cls = VARIANTS[config.variant].layer
        if type(self) is not variant_cls:
            raise TypeError(
                f"config.variant={config.variant!r} is built by {variant_cls.__name__}, "
                f"not {type(self).__name__}; use lab.lora.build_layer(base, config)"
            )
        init = INITS[config.init]
        if init.check is not None:
            init.check(base, config)
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = config.rank, config.alpha, config.rslora
        rank = self.rank
        self.dropout_p = config.dropout
        self.lr_ratio = config.lr_ratio
        # rsLoRA (Kalajdzievski 2023) divides by sqrt(rank) so the update's size does not shrink
        # as the rank grows; classic LoRA divides by rank.
        self.scaling = config.scaling
        self.merged = False
        # While merged: the A, B and scaling that were folded into W, so unmerge subtracts the
        # very ΔW that merge added even if the adapter is edited meanwhile (non-persistent: not
        # in state_dict, but they move with .to()).
        self.register_buffer("_merged_A", None, persistent=False)
        self.register_buffer("_merged_B", None, persistent=False)
        self._merged_scaling = self.scaling
        self._quantized_base: nn.Module | None = None  # the 4-bit base while merged into a copy
        # Adapters train in (at least) fp32 even on a bf16/fp16 base: tiny updates to small
        # matrices would be rounded away in half precision. A float64 base keeps float64.
        w_dtype, w_device = _weight_dtype_device(base)
        dtype = torch.promote_types(w_dtype, torch.float32)
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=dtype, device=w_device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=dtype, device=w_device)
        )
        # A is initialised like nn.Linear's weight; B = 0 makes the initial update exactly zero.
        # (On the meta device this is a no-op: there is no data to fill.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        INITS[config.init].apply(self)  # "default" keeps the above; PiSSA replaces A, B and W
        self.reset_variant_state()

    variant_name = "lora"

    def reset_variant_state(self) -> None:
        """Hook for variants with state of their own (DoRA's magnitude); plain LoRA has none."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The layer's trainable tensors by name: lora_A and lora_B (and a variant's own)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def base_weight(self) -> torch.Tensor:
        """The frozen (out, in) weight W, dequantised if the base is quantised."""
        return frozen_weight(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        out = self.base(x)
        if self.merged:  # ΔW already lives inside base.weight
            return out
        # Dropout touches only the adapter's input, never the frozen path.
        h = self.dropout(x.to(self.lora_A.dtype))
        # The scaling multiplies the narrow (..., rank) intermediate, not the wide (..., out)
        # update, and the second matmul adds straight into the base output (addmm): two fewer
        # passes over a (tokens, out) tensor than `out + B(A(h)) * scaling`, same algebra.
        u = F.linear(h, self.lora_A) * self.scaling  # (..., rank)
        if u.dtype != out.dtype:  # a half-precision base without autocast: add in its dtype
            return out + F.linear(u, self.lora_B).to(out.dtype)
        flat = torch.addmm(
            out.reshape(-1, self.out_features), u.reshape(-1, self.rank), self.lora_B.t()
        )
        return flat.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling * B @ A, shape (out_features, in_features), in the base weight's dtype."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # computed in the adapter's fp32
        dtype, device = _weight_dtype_device(self.base)
        return delta.to(dtype=dtype, device=device)

    def merged_weight(self) -> torch.Tensor:
        """The weight a merge writes: W + ΔW (in fp32, rounded once to W's dtype)."""
        return self._folded_weight(+1)

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
                if (bad := _nonfinite(p))
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
                    f"unmerging {name} would write NaN or inf into rows {_describe(rows)} of its "
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


register_variant(
    Variant(
        "lora",
        LoRALinear,
        "LoRA (Hu et al. 2021): W + (alpha/r) B A",
        batched=True,
    )
)
register_init(
    Init(
        "default",
        _default_init,
        "A random (Kaiming uniform), B = 0: B A = 0 at the start",
        batched=True,
    )  # fmt: skip
)


# ---------------------------------------------------------------------------------------------
# Whole-model helpers
# ---------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model: qualified name -> layer, in module order."""
    _check_model(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    """lora_layers(model), or a ValueError that says how to add some."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora(model, ...) first")
    return layers


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was (setattr on its parent; works for ModuleList)."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered in more than one place (tied weights, reused modules)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            (shared if id(p) in seen else seen).add(id(p))
    return shared


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is registered under (more than one if reused)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


# Modules that read a child linear's .weight directly instead of calling it, so a LoRALinear in
# its place would be bypassed (or break forward): nn.MultiheadAttention passes
# out_proj.weight to F.multi_head_attention_forward; the Transformer layers' fast path passes
# linear1.weight, linear2.weight and their attention's weights.
_WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def check_trainable(model: nn.Module, action: str = "training") -> None:
    """ValueError if any LoRA layer of `model` is merged: its W holds ΔW and A, B are unused.

    Training a merged model would update A and B without changing its output (forward runs the
    base alone), so the trainer refuses it: call unmerge_lora(model) first.
    """
    merged = [name for name, layer in lora_layers(model).items() if layer.merged]
    if merged:
        shown = _describe(merged)
        raise ValueError(
            f"the model is merged (LoRA layers {shown}); call unmerge_lora(model) before {action}"
        )


def build_layer(base: nn.Module, config: LoRAConfig) -> LoRALinear:
    """The layer of config.variant (LoRALinear, DoRALinear, ...) around a frozen base."""
    return VARIANTS[config.variant].layer(base, config=config)


_LEGACY_ORDER = ("targets", "rank", "alpha", "dropout", "rslora")


def as_config(config: object = None, *args: object, **fields: object) -> LoRAConfig:
    """A LoRAConfig from a config, or from fields given as keywords (or in the old positional
    order targets, rank, alpha, dropout, rslora); a config and fields together are refused."""
    if isinstance(config, LoRAConfig):
        if args or fields:
            given = sorted(fields) or [f"{len(args)} positional"]
            raise TypeError(
                f"give either a LoRAConfig or its fields, not both (got a config and {given}); "
                "use config.replace(...) to change a field"
            )
        return config
    if config is not None:  # add_lora(model, ("q_proj",), 4, 8): targets first, as before
        args = (config, *args)
    if len(args) > len(_LEGACY_ORDER):
        raise TypeError(f"too many positional arguments: {args!r}")
    for name, value in zip(_LEGACY_ORDER, args, strict=False):
        if name in fields:
            raise TypeError(f"{name} given twice (positionally and as a keyword)")
        fields[name] = value
    known = set(LoRAConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown LoRA settings {unknown}; settings are {sorted(known)}")
    return LoRAConfig(**fields)


# Output layers that "all-linear" leaves alone even when untied (PEFT does the same).
_OUTPUT_NAMES = ("head", "lm_head", "output", "classifier")


def all_linear_modules(
    model: nn.Module, candidates: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear that targets="all-linear" adapts, in module order.

    Every nn.Linear, 4-bit frozen linear or existing LoRA layer, except the output head (a
    module named head/lm_head/output/classifier, or any linear whose weight is tied to another
    module, such as the toy's head sharing the token embedding), as PEFT's "all-linear" does.
    """
    if candidates is None:
        candidates = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    shared = _shared_parameter_ids(model)
    out = []
    for name, module in candidates:
        if not (isinstance(module, LoRALinear) or is_frozen_linear(module)):
            continue
        if name.rpartition(".")[2] in _OUTPUT_NAMES:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and id(weight) in shared:
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, _WEIGHT_READING_PARENTS):  # bypassed: its parent reads .weight
            continue
        out.append((name, module))
    return out


def add_lora(model: nn.Module, config: LoRAConfig | None = None, *args, **fields) -> list[str]:
    """Wrap every frozen linear named like a target in a LoRA layer and freeze everything else.

    `config` is a LoRAConfig; or give its fields as keywords instead:
    `add_lora(model, targets=("q_proj", "v_proj"), rank=8, alpha=16)`. The layer class comes
    from config.variant (LoRALinear for "lora", DoRALinear for "dora", ...).

    A target matches a module whose qualified name equals it or ends with "." + target, so
    "q_proj" matches "blocks.0.attn.q_proj" and "attn.q_proj" works too; targets="all-linear"
    takes every linear of the blocks, attention and MLP, never the output head (see
    `all_linear_modules`). Returns the replaced names in module order. Everything is
    validated first: on error the model is unchanged.
    """
    _check_model(model)
    config = as_config(config, *args, **fields)
    targets, rank = config.targets, config.rank

    # Match by name among all modules, but not the insides of existing LoRALinears (their
    # `.base` is an implementation detail, not a layer of the user's model).
    existing = lora_layers(model).values()
    internal = {id(m) for layer in existing for m in layer.modules() if m is not layer}
    candidates = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)  # every place a module is used
        if n and id(m) not in internal
    ]

    def hits(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    if targets == (ALL_LINEAR,):
        matches = all_linear_modules(model, candidates)
        if not matches:
            raise ValueError(
                f"targets={ALL_LINEAR!r}: the model has no linear layer that can take LoRA "
                "(the output head and tied weights are never adapted)"
            )
        targets = ()
    else:
        matches = [(n, m) for n, m in candidates if any(hits(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(hits(n, t) for n, _ in candidates)]
    if unmatched:
        # Offer only names that would be valid targets: a linear whose weight is tied to
        # another module (the output head sharing the embedding) is refused below.
        shared = _shared_parameter_ids(model)
        linear_names = [
            n
            for n, m in candidates
            if isinstance(m, LoRALinear)
            or (isinstance(m, nn.Linear) and id(m.weight) not in shared)
            or is_quantized(m)
        ]
        leaves = sorted({n.rpartition(".")[2] for n in linear_names})
        raise ValueError(
            f"targets {unmatched} match no module. Linear layers that can take LoRA here are "
            f"named {leaves} (e.g. {linear_names[:4]})"
        )
    shared = _shared_parameter_ids(model)
    names_of = _module_names(model)
    for name, module in matches:
        if isinstance(module, LoRALinear):  # a state problem rather than a wrong type
            raise ValueError(  # noqa: TRY004
                f"{name} already has LoRA; call remove_lora(model) first to start again"
            )
        if not is_frozen_linear(module):
            raise TypeError(
                f"target {name} is a {type(module).__name__}, not an nn.Linear; "
                "LoRA here only wraps linear layers"
            )
        # One module reused at several places (nn.Sequential(lin, act, lin)): only one place
        # could be replaced, and merging would change the others behind the user's back.
        where = names_of.get(id(module), [name])
        if len(where) > 1:
            raise ValueError(
                f"{name} is one nn.Linear used at {len(where)} places in the model "
                f"({_describe(where)}); LoRA would wrap only one of them and merging would "
                "change the others, so give each place its own nn.Linear (copy.deepcopy)"
            )
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        if isinstance(parent, _WEIGHT_READING_PARENTS):
            raise ValueError(
                f"target {name} is inside a {type(parent).__name__} ({parent_name or 'model'}), "
                "which reads its .weight directly instead of calling it, so a LoRA layer there "
                "would be bypassed or break forward; choose another target"
            )
        # A tied weight (e.g. an output head sharing the embedding) would silently change the
        # other module too when ΔW is merged, so refuse rather than surprise.
        tied = [pname for pname, p in module.named_parameters(recurse=False) if id(p) in shared]
        if tied:
            raise ValueError(
                f"{name}.{tied[0]} is shared with another module (tied weights); "
                "merging LoRA into it would change both, so it cannot be a target"
            )
        _check_rank_fits(rank, module, name)
    init = INITS[config.init]
    for name, module in matches:
        if init.check is not None:  # PiSSA refuses a 4-bit base
            init.check(module, config)
        _check_finite_base(module, name)

    # All checks passed: build every new layer, then swap them in, then freeze. Building already
    # touches the targets (their requires_grad goes off; PiSSA writes its residual into W), so
    # what it changes is kept first and put back if anything stops the build or the swap half
    # way: an error, or Ctrl-C during PiSSA's SVDs. (The copies cost less than those SVDs.)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    weights = {n: m.weight.detach().clone() for n, m in matches if init.changes_base}
    try:
        new_layers = {}
        for name, module in matches:
            try:
                new_layers[name] = build_layer(module, config)
            except ValueError as exc:  # a layer's own refusal (PiSSA's rank): name the layer
                raise ValueError(f"{name}: {exc}") from exc
        for name, layer in new_layers.items():
            _replace_module(model, name, layer)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in lora_layers(model).values():  # includes adapters added by earlier calls
            for p in layer.adapter_parameters().values():
                p.requires_grad_(True)
    except BaseException:
        with torch.no_grad():
            for name, module in matches:
                _replace_module(model, name, module)
                if name in weights:
                    module.weight.copy_(weights[name])
            for p, flag in flags:
                p.requires_grad_(flag)
        raise
    return list(new_layers)


def parameter_groups(model: nn.Module) -> list[dict]:
    """The trainable parameters of `model` in optimizer groups, each with an "lr_scale".

    Plain LoRA and full fine-tuning: one group, lr_scale 1. LoRA+ (a layer's lr_ratio != 1):
    each layer's lora_B, and its one-dimensional trainable tensors such as DoRA's magnitude,
    train at lr_ratio times the rate of lora_A and everything else, as PEFT's
    create_loraplus_optimizer groups them.
    """
    scale_of: dict[int, float] = {}
    for layer in lora_layers(model).values():
        if layer.lr_ratio == 1:
            continue
        for name, p in layer.adapter_parameters().items():
            if name == "lora_B" or p.dim() == 1:
                scale_of[id(p)] = layer.lr_ratio
    groups: dict[float, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(scale_of.get(id(p), 1.0), []).append(p)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def merge_lora(model: nn.Module, requantize: bool = False) -> None:
    """Merge every LoRA layer; all-or-nothing: raises before any change if one would overflow.

    On a quantised (4-bit) base, W + ΔW is written into a full-precision copy by default
    (exact) and a warning says so; requantize=True quantises it back to 4 bits instead, which
    loses accuracy (notebook 08 measures how much).
    """
    if not isinstance(requantize, bool):
        raise TypeError(f"requantize must be True or False, got {requantize!r}")
    todo = {n: layer for n, layer in _require_lora(model).items() if not layer.merged}
    if not todo:
        warnings.warn("all LoRA layers are already merged; merge_lora did nothing", stacklevel=2)
        return
    quantized = [n for n, layer in todo.items() if is_quantized(layer.base)]
    if requantize and not quantized:
        raise ValueError("requantize=True is for a quantised base; this model's base is not")
    for name, layer in todo.items():  # first pass only checks; the second pass writes
        layer._check_mergeable(name)
    for layer in todo.values():
        layer.merge(requantize=requantize and is_quantized(layer.base))
    if quantized:
        if requantize:
            what = "quantised W + ΔW back to 4 bits (lossy: the merged model is not exact)"
        else:
            what = (
                "wrote W + ΔW into full-precision copies of the 4-bit weights (exact, but those "
                "layers now hold 32-bit weights; merge_lora(model, requantize=True) keeps 4 bits "
                "and loses accuracy)"
            )
        warnings.warn(f"{len(quantized)} LoRA layers sit on a 4-bit base: merge {what}",
                      stacklevel=2)  # fmt: skip


def unmerge_lora(model: nn.Module) -> None:
    """Unmerge every merged LoRA layer."""
    todo = {name: layer for name, layer in _require_lora(model).items() if layer.merged}
    if not todo:
        warnings.warn("no LoRA layer is merged; unmerge_lora did nothing", stacklevel=2)
    for name, layer in todo.items():  # all-or-nothing: check every layer before writing
        layer._check_unmergeable(name)
    for layer in todo.values():
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every LoRALinear by its plain nn.Linear base, with ΔW merged in or dropped.

    The returned bases keep requires_grad=False (they stay frozen, as they were under LoRA).
    Returns the replaced names; a model without LoRA is left alone and [] is returned.
    """
    if not isinstance(merge, bool):  # merge="False" is truthy: it would merge
        raise TypeError(f"merge must be True or False, got {merge!r}")
    layers = lora_layers(model)
    for name, layer in layers.items():  # all-or-nothing, as in merge_lora
        if merge and not layer.merged:
            layer._check_mergeable(name)
        elif not merge and layer.merged:
            layer._check_unmergeable(name)
    quantized = [n for n, layer in layers.items() if merge and is_quantized(layer.base)]
    if quantized:
        warnings.warn(
            f"{len(quantized)} LoRA layers sit on a 4-bit base: remove_lora(merge=True) replaces "
            "them by full-precision linears holding W + ΔW (exact, 32 bits per weight); "
            "merge_lora(model, requantize=True) keeps 4 bits instead and loses accuracy",
            stacklevel=2,
        )
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _replace_module(model, name, layer.removed_base(merged=merge))
    return list(layers)


# ---------------------------------------------------------------------------------------------
# Saving and loading adapters
# ---------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, e.g. {"blocks.0.attn.q_proj.lora_A": (rank, in) tensor, ...}."""
    state = {}
    for name, layer in lora_layers(model).items():
        for key, p in layer.adapter_parameters().items():
            state[f"{name}.{key}"] = p.detach()
    return state


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRA layers; strict, and all-or-nothing."""
    layers = _require_lora(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        # The merged weights contain the old ΔW; new A, B would leave them inconsistent.
        raise ValueError(f"LoRA layers {merged} are merged; call unmerge_lora(model) first")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of name -> tensor (as from lora_state_dict), "
            f"got {type(state_dict).__name__}"
        )
    params = lora_state_dict(model)
    missing = sorted(params.keys() - state_dict.keys(), key=str)
    unexpected = sorted(state_dict.keys() - params.keys(), key=str)
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not match: missing {_describe(missing)}, "
            f"unexpected {_describe(unexpected)}"
        )
    # First pass: check every value and make the exact tensor to copy (right dtype and device).
    # Nothing is written until every one of them is known to be good.
    ready: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{key}: expected a dense tensor, got layout {value.layout}")
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{key}: adapter tensors must be floating point (float32, bfloat16, ...), "
                f"got dtype {value.dtype}"
            )
        if value.shape != param.shape:
            raise ValueError(
                f"{key}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
            )
        if value.is_meta and not param.is_meta:
            raise ValueError(f"{key} is on the meta device: it has a shape but no values to load")
        try:
            converted = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"{key}: cannot move it from {value.device} to {param.device}: {exc}"
            ) from exc
        if not converted.is_meta and not bool(torch.isfinite(converted).all()):
            raise ValueError(f"{key} contains non-finite values (inf or nan) as {param.dtype}")
        ready[key] = converted
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(ready[key])


def _leaf_order(names: Iterable[str]) -> list[str]:
    """Leaf names (q_proj, ...) in order of first appearance."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in names))


def _adapter_config(layers: dict[str, LoRALinear]) -> dict:
    """The description of a model's adapters, used both to save and to compare.

    {"config": LoRAConfig.to_dict() or None, "layers": [names] or {name: to_dict()}}: one
    config when every layer shares its settings (its targets: the adapted leaf names), else
    each layer's own (add_lora called twice with different ranks, say).
    """
    configs = {name: layer.config.replace(targets=(name.rpartition(".")[2],))
               for name, layer in layers.items()}  # fmt: skip
    first = next(iter(configs.values()))
    if all(c.replace(targets=first.targets) == first for c in configs.values()):
        shared = first.replace(targets=tuple(_leaf_order(layers)))
        return {"config": shared.to_dict(), "layers": list(layers)}
    return {"config": None, "layers": {n: c.to_dict() for n, c in configs.items()}}


def _summary(description: dict) -> dict:
    """What load_adapter returns: the config's fields, "layers", and "per_layer" if mixed."""
    if description["config"] is not None:
        return {**description["config"], "layers": list(description["layers"])}
    fields = dict.fromkeys(LoRAConfig.__dataclass_fields__)
    layers = description["layers"]
    fields["targets"] = _leaf_order(layers)
    return {**fields, "layers": list(layers), "per_layer": dict(layers)}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters and their config to a .safetensors file, atomically; returns the path.

    The file holds only A and B for each layer (kilobytes to megabytes, not the whole model);
    the config is JSON in the safetensors metadata under "lora_lab_config".
    """
    path = _check_path(path, "adapter path")
    layers = _require_lora(model)
    state = lora_state_dict(model)
    if any(t.is_meta for t in state.values()):
        raise ValueError("the model is on the meta device: its adapters hold no values to save")
    broken = [f"{key} has {bad}" for key, t in state.items() if (bad := _nonfinite(t))]
    if broken:  # load_adapter would refuse the file: a diverged run is not kept as a result
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ValueError(
            f"not saved: {'; '.join(broken[:3])}{more} (a diverged run: retrain with a lower lr "
            "or alpha)"
        )
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    description = _adapter_config(layers)
    metadata = {
        _FORMAT_KEY: _FORMAT,
        _VERSION_KEY: str(_VERSION),
        _CONFIG_KEY: json.dumps(description["config"]),
        _LAYERS_KEY: json.dumps(description["layers"]),
    }
    data = safetensors_save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def _check_path(path: object, what: str) -> Path:
    """Path(path), or a TypeError naming what a path may be."""
    if not isinstance(path, str | os.PathLike) or (isinstance(path, str) and not path):
        raise TypeError(f"{what} must be a non-empty str or os.PathLike, got {path!r}")
    return Path(path)


def _describe(value: object, limit: int = 120) -> str:
    """repr(value), shortened so a long layer list cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a .safetensors file, read without touching any model.

    OSError (FileNotFoundError, IsADirectoryError, ...) for a path that is not an ordinary file
    (a FIFO or a device such as /dev/zero is refused before it is opened); ValueError for a
    file safetensors cannot read.
    """
    path = regular_file(_check_path(path, "adapter file"), "adapter file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable adapter file (truncated or corrupt?): {exc}"
        ) from exc
    return metadata, tensors


def _adapter_description(metadata: Mapping[str, str], path: str | os.PathLike) -> dict:
    """The adapter settings an adapter file's metadata states, each validated.

    {"config": LoRAConfig.to_dict() or None, "layers": [names] or {name: to_dict()}}, as
    _adapter_config describes a model. ValueError (or TypeError) naming what is wrong: a
    missing or foreign format, a missing field ("adapter file a.safetensors has no 'alpha'"),
    a field of the wrong type or value.
    """
    for key in (_CONFIG_KEY, _LAYERS_KEY):
        if key not in metadata:
            raise ValueError(f"{path} has no {key!r} metadata: not written by save_adapter?")
    if metadata.get(_FORMAT_KEY) != _FORMAT:
        raise ValueError(f"{path}: metadata is not a {_FORMAT!r} file")
    if metadata.get(_VERSION_KEY) != str(_VERSION):
        raise ValueError(
            f"{path}: adapter format version {metadata.get(_VERSION_KEY)!r} "
            f"is not supported (expected {_VERSION})"
        )
    raw = {}
    for key in (_CONFIG_KEY, _LAYERS_KEY):
        try:
            raw[key] = json.loads(metadata[key])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(
                f"{path}: the {key!r} metadata is not valid JSON: {_describe(str(exc))}"
            ) from exc
    # Every config in the file is validated by LoRAConfig.from_dict: all fields, each checked.
    layer_names, what = raw[_LAYERS_KEY], f"adapter file {path}"
    if raw[_CONFIG_KEY] is not None:
        config = LoRAConfig.from_dict(raw[_CONFIG_KEY], what).to_dict()
        if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
            raise ValueError(f"{what}: {_LAYERS_KEY} must be a list of layer names")
        return {"config": config, "layers": layer_names}
    if not isinstance(layer_names, dict) or not layer_names:
        raise ValueError(f"{what}: {_LAYERS_KEY} must map layer names to configs")
    per_layer = {
        name: LoRAConfig.from_dict(c, f"{what}, layer {name},").to_dict()
        for name, c in layer_names.items()
    }
    return {"config": None, "layers": per_layer}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a file written by save_adapter into the model's LoRA layers; returns its config.

    The model must already have LoRA with the same settings: call add_lora(model, targets=...,
    rank=..., alpha=..., dropout=..., rslora=...) as when training, then load_adapter. Any
    mismatch raises ValueError and leaves the model unchanged.
    """
    _check_model(model)
    metadata, tensors = _read_adapter_file(path)
    path = Path(path)
    try:
        stored = _adapter_description(metadata, path)
    except TypeError as exc:  # a field of the wrong type: a bad file, not a bad call
        raise ValueError(str(exc)) from exc
    layers = lora_layers(model)
    if not layers:
        hint = stored["config"] or {}
        shown = ", ".join(f"{k}={hint[k]!r}" for k in ("targets", "rank", "alpha") if k in hint)
        raise ValueError(
            f"cannot load {path}: the model has no LoRA layers; first call "
            f"add_lora(model, LoRAConfig({shown}, ...)) with the settings the file was saved with"
        )
    config = _summary(stored)
    expected = _summary(_adapter_config(layers))
    differences = [
        f"{field}: file has {_describe(config.get(field))}, "
        f"model has {_describe(expected.get(field))}"
        for field in (*LoRAConfig.__dataclass_fields__, "layers", "per_layer")
        if config.get(field) != expected.get(field)
    ]
    if differences:
        raise ValueError(
            f"{path} does not match the model's LoRA layers: " + "; ".join(differences)
        )
    try:
        load_lora_state_dict(model, tensors)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"cannot load {path}: {exc}") from exc
    return config


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


class ParamCount(NamedTuple):
    """Trainable and total parameter counts (tied weights counted once)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """trainable / total (0.0 for a model without parameters)."""
        return self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParamCount:
    """Count unique parameters; works on the meta device since only shapes are needed.

    A 4-bit frozen linear (lab.Linear4bit) keeps its weight as packed uint8 buffers, two
    weights per byte, not as a Parameter: it counts as in_features x out_features frozen
    weights (what `sum(p.numel() for p in model.parameters())` misses, as PEFT users see
    with bitsandbytes' 4-bit layers).
    """
    _check_model(model)
    # model.parameters() yields each Parameter object once, so a tied weight counts once.
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    packed = {id(m): m for m in model.modules() if is_quantized(m)}
    frozen_4bit = sum(m.in_features * m.out_features for m in packed.values())
    return ParamCount(trainable=trainable, total=sum(p.numel() for p in params) + frozen_4bit)
