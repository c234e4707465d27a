"""Checks made before the lab changes a layer or a model: each names the value and what is valid.

Every public function of the layer, surgery and adapter files validates everything first and
changes nothing on error; the checks they share live here. The hyperparameters' own rules
(rank, alpha, dropout, ...) belong to the config: lab.config.check_hparams.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import INITS, VARIANTS, LoRAConfig
from .frozen import frozen_weight, is_frozen_linear

__all__ = [
    "check_base",
    "check_finite_base",
    "check_model",
    "check_path",
    "check_rank_fits",
    "check_wrappable",
    "describe",
    "layer_config",
    "nonfinite",
]


def check_model(model: object, what: str = "model") -> None:
    """TypeError unless model is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch nn.Module, got {type(model).__name__}")


def check_path(path: object, what: str) -> Path:
    """Path(path), or a TypeError naming what a path may be."""
    if not isinstance(path, str | os.PathLike) or (isinstance(path, str) and not path):
        raise TypeError(f"{what} must be a non-empty str or os.PathLike, got {path!r}")
    return Path(path)


def describe(value: object, limit: int = 120) -> str:
    """repr(value), shortened so a long layer list cannot flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_rank_fits(rank: int, linear: nn.Module, where: str) -> None:
    """A rank above min(in, out) cannot add expressiveness: B A would already be full rank."""
    bound = min(linear.in_features, linear.out_features)
    if rank > bound:
        raise ValueError(
            f"rank={rank} is too large for {where} (in_features={linear.in_features}, "
            f"out_features={linear.out_features}): rank must be <= min(in, out) = {bound}"
        )


def nonfinite(tensor: torch.Tensor) -> str | None:
    """'1 NaN', '2 inf', '1 NaN and 2 inf' for a tensor holding them; None if all finite."""
    if tensor.is_meta or not tensor.is_floating_point():
        return None
    t = tensor.detach()
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else ""]
    return " and ".join(p for p in parts if p) or None


def check_finite_base(base: nn.Module, where: str) -> None:
    """ValueError naming the tensor if a frozen linear's weight or bias holds NaN or inf.

    An adapter on such a base outputs NaN from its first step, and the divergence guard would
    then blame the learning rate; PiSSA's SVD would fail on it. A 4-bit base is checked through
    its dequantised weight.
    """
    tensors = {"weight": frozen_weight(base), "bias": getattr(base, "bias", None)}
    for key, tensor in tensors.items():
        bad = None if tensor is None else nonfinite(tensor)
        if bad:
            raise ValueError(
                f"{where}.{key} has {bad}: the frozen base is broken, so an adapter on it would "
                "output NaN; reload the base model (lab.load_base_model) before add_lora"
            )


def layer_config(
    config: object, rank: object, alpha: object, dropout: object, rslora: object, variant: str
) -> LoRAConfig:
    """The LoRAConfig a layer is built from: `config`, or one made of the numbers given."""
    if config is None:
        defaults = LoRAConfig()
        return LoRAConfig(
            rank=defaults.rank if rank is None else rank,
            alpha=defaults.alpha if alpha is None else alpha,
            dropout=dropout,
            rslora=rslora,
            variant=variant,
        )
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lab.LoRAConfig, got {type(config).__name__}")
    if rank is not None or alpha is not None or dropout or rslora:
        raise TypeError("give either config=LoRAConfig(...) or rank/alpha/..., not both")
    return config


def check_wrappable(base: object, lora_cls: type) -> None:
    """TypeError unless `base` is a frozen linear without LoRA (lora_cls: lab.LoRALinear)."""
    if isinstance(base, lora_cls):
        raise TypeError("base already has LoRA (it is a LoRALinear); wrap a plain nn.Linear")
    if not is_frozen_linear(base):
        raise TypeError(
            f"base must be an nn.Linear, got {type(base).__name__} "
            "(or a quantised linear such as lab.Linear4bit)"
        )


def check_base(base: nn.Module, config: LoRAConfig, layer_cls: type) -> None:
    """What `layer_cls(base, config=config)` needs of its base and config, checked first."""
    check_rank_fits(config.rank, base, "this layer")
    check_finite_base(base, "base")
    variant_cls = VARIANTS[config.variant].layer
    if layer_cls is not variant_cls:
        raise TypeError(
            f"config.variant={config.variant!r} is built by {variant_cls.__name__}, "
            f"not {layer_cls.__name__}; use lab.surgery.build_layer(base, config)"
        )
    init = INITS[config.init]
    if init.check is not None:
        init.check(base, config)
