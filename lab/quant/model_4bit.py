"""Whole models in 4 bits: frozen linears swapped for Linear4bit and back, and the error made."""

from __future__ import annotations

import torch
from torch import nn

from .blockwise import _decode, _encode
from .formats import (
    _check_block_size,
    _check_double_quant,
    _check_scheme,
    _check_weight,
)
from .linear4bit import Linear4bit

__all__ = [
    "dequantize_base",
    "quantization_error",
    "quantize_base",
]


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

# Modules that read a child linear's .weight directly instead of calling it (see lab.surgery).
_WEIGHT_READING_PARENTS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters registered by more than one module (tied weights)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def quantize_base(
    model: nn.Module, scheme: str = "nf4", block_size: int = 64, double_quant: bool = True
) -> list[str]:
    """Replace the frozen nn.Linear layers of the transformer blocks by Linear4bit layers.

    With `model.blocks` (a ToyTransformer) every nn.Linear inside the blocks is quantised: the
    embedding, layer norms and the head (tied to the embedding) stay as they are. A model
    without `.blocks` has every nn.Linear quantised whose weight is not tied to another module.
    Returns the replaced names in module order. Everything is validated first (on error the
    model is unchanged); call it before add_lora. A model that already holds a Linear4bit
    anywhere (quantised, or half of it by hand) is refused, naming those layers and their
    format: quantising the rest would mix schemes in one model without a word.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_double_quant(double_quant)
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"the model already has LoRA layers ({', '.join(lora[:3])}"
            f"{', ...' if len(lora) > 3 else ''}): quantize the base before add_lora "
            "(or call remove_lora first)"
        )
    already = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if already:
        listed = ", ".join(
            f"{n or 'the model itself'} ({m.scheme}, block_size {m.block_size}"
            f"{', double quant' if m.double_quant else ''})"
            for n, m in list(already.items())[:3]
        )
        raise ValueError(
            f"the model is already quantised: {len(already)} Linear4bit "
            f"layer{'s' * (len(already) != 1)} ({listed}"
            f"{', ...' if len(already) > 3 else ''}); quantising the rest would mix formats. "
            "Load a fresh base (lab.load_base_model()) and quantise it once, or call "
            "lab.quant.dequantize_base(model) first"
        )
    blocks = getattr(model, "blocks", None)
    root, prefix = (blocks, "blocks.") if isinstance(blocks, nn.Module) else (model, "")
    shared = _shared_parameter_ids(model)
    places = [(prefix + n, m) for n, m in root.named_modules(remove_duplicate=False) if n]
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in places:
        if not isinstance(module, nn.Linear) or id(module.weight) in shared:
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name), _WEIGHT_READING_PARENTS):
            continue  # the parent reads .weight itself: a Linear4bit there would break forward
        _check_weight(module.weight, f"{name}.weight")
        if module.bias is not None:
            _check_weight(module.bias, f"{name}.bias")
        chosen.append((name, module))
    if not chosen:
        where = "inside model.blocks" if prefix else "in the model"
        raise ValueError(
            f"nothing to quantise: no nn.Linear {where} whose weight is not tied to another module"
        )
    # Build every new layer first, then swap them all in: nothing changes if a build fails.
    # One nn.Linear used at several places becomes one Linear4bit at all of them.
    built: dict[int, Linear4bit] = {}
    for _, module in chosen:
        if id(module) not in built:
            built[id(module)] = Linear4bit.from_linear(module, scheme, block_size, double_quant)
    for name, module in chosen:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, built[id(module)])
    return [name for name, _ in chosen]


def dequantize_base(model: nn.Module) -> list[str]:
    """Replace every Linear4bit of `model` by a frozen nn.Linear holding its dequantised weight.

    The undo of quantize_base as far as 4 bits allow: the weights are the 4-bit ones, W-hat,
    not the originals. A model with LoRA layers is refused (remove_lora first). Returns the
    replaced names in module order; a layer used at several places stays one layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"the model has LoRA layers ({', '.join(lora[:3])}{', ...' if len(lora) > 3 else ''})"
            ": call lab.remove_lora(model) first (it merges or drops each adapter)"
        )
    places = [
        (n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, Linear4bit)
    ]
    if not places:
        raise ValueError("the model has no Linear4bit layers: nothing to dequantise")
    if any(not n for n, _ in places):
        raise ValueError("model is itself a Linear4bit: call model.to_linear() instead")
    built: dict[int, nn.Linear] = {}
    for _, module in places:  # every dense copy first: nothing changes if one fails
        if id(module) not in built:
            if module.packed_weight.is_meta:
                raise ValueError("the 4-bit layers are on the meta device (no codes to decode)")
            built[id(module)] = module.to_linear()
    for name, module in places:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, built[id(module)])
    return [name for name, _ in places]


def quantization_error(
    linear_or_weight: nn.Linear | torch.Tensor,
    scheme: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
) -> dict[str, float]:
    """How far the 4-bit weight is from the original: relative error ‖W − Ŵ‖/‖W‖, MSE, max.

    Takes an nn.Linear (its weight) or a weight tensor; quantises a copy, changes nothing.
    """
    if isinstance(linear_or_weight, nn.Linear):
        w = linear_or_weight.weight
    elif isinstance(linear_or_weight, torch.Tensor):
        w = linear_or_weight
    else:
        raise TypeError(
            f"expected an nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}"
        )
    _check_weight(w)
    _check_scheme(scheme)
    _check_block_size(block_size)
    _check_double_quant(double_quant)
    ref = w.detach().to(torch.float64)
    buffers = _encode(w, scheme, block_size, double_quant)
    approx = _decode(buffers, scheme, block_size, tuple(w.shape), torch.float64)
    diff = ref - approx
    norm = ref.norm().item()
    return {
        "relative_error": diff.norm().item() / norm if norm > 0 else 0.0,
        "mse": (diff**2).mean().item(),
        "max_abs_error": diff.abs().max().item(),
    }
