"""The doctor's checks of a model: the adapters' state, the base, the scaling, the targets, merges.

Each check reads the model (never runs it, never changes a tensor or a flag) and returns a list
of lab.diagnostics.findings.Finding; lab.diagnosis.doctor runs them in order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import load_base_config, load_base_model
from ..config import INITS
from ..frozen import is_frozen_linear
from ..lora import LoRALinear
from ..quant import Linear4bit
from ..surgery import count_parameters, lora_layers
from ..text import format_bytes
from ..variants.registry import adapter_at_start, display_name
from .findings import (
    Finding,
    _active_4bit,
    _denominator,
    _names,
    _other_rule_alpha,
    _settings,
)

__all__ = ["SCALING_RANGE", "scaling_note"]

# The update scale s (alpha/r, or alpha/sqrt(r) with rsLoRA) the lab trains well with. Under
# Adam each step moves A and B by about lr whatever their gradients' size, so ΔW = s·B·A moves
# about s times as far: s multiplies the adapters' learning rate. The lab's default is s = 2
# (alpha = 2r). Measured: the shipped default grid (sort_desc, q/v, lr 2e-2) trained from
# s = 1/8 (r=64, alpha=8: 0.90 exact match) to s = 32 (r=1, alpha=32: as good as alpha=8 at that
# rank); on "rotate" with all-linear targets (r=4, lr 2e-2, 150 steps) s = 1/32 to 2 reached
# 0.96 to 1.0, s = 8 only 0.74 and s = 16 to 64 nothing (0.0). Below 1/8 the update is scaled
# away unless lr rises to match; above 16 it needs a lower lr than the lab's. A scale outside is
# usually an alpha meant for the other rule, or one that did not follow a change of rank.
SCALING_RANGE = (1 / 8, 16.0)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("up_proj", "down_proj", "gate_proj")


# ---------------------------------------------------------------------------------------------
# The model's own checks
# ---------------------------------------------------------------------------------------------


def _adapter_state(model: nn.Module, layers: dict[str, LoRALinear]) -> list[Finding]:
    """no-adapter, adapter-frozen, untrained-adapter, adapter-nonfinite."""
    if not layers:
        params = list(model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        quantized = _active_4bit(model)
        if not trainable:
            return [
                Finding(
                    "no-adapter",
                    "call lab.add_lora(model, targets=..., rank=..., alpha=...) to give the "
                    "model adapters to train",
                    f"the model has no LoRA layers and none of its "
                    f"{sum(p.numel() for p in params):,} parameters requires grad, so "
                    "training would change nothing",
                )
            ]
        if quantized:
            return [
                Finding(
                    "no-adapter",
                    "call lab.add_lora(model, ...) on the 4-bit base: its packed weights are "
                    "frozen, so only adapters can learn the task (QLoRA)",
                    f"the model has {len(quantized)} 4-bit linears "
                    f"({_names([n for n, _ in quantized])}) and no LoRA layers: only "
                    f"{trainable:,} embedding and norm parameters would train",
                )
            ]
        return []  # full fine-tuning: the checks below are about adapters
    findings = []
    frozen = {
        # A tensor the layer hands out as a Parameter is meant to train; one it hands out
        # detached (LoRA-FA's A, saved with the adapter but kept at its start) is not.
        name: [
            key
            for key, p in layer.adapter_parameters().items()
            if isinstance(p, nn.Parameter) and not p.requires_grad
        ]  # fmt: skip
        for name, layer in layers.items()
    }
    frozen = {name: keys for name, keys in frozen.items() if keys}
    if frozen:
        n_tensors = sum(len(layer.adapter_parameters()) for layer in layers.values())
        first = next(iter(frozen))
        findings.append(
            Finding(
                "adapter-frozen",
                "make the adapters trainable: call add_lora after anything that freezes the "
                "model (it sets requires_grad on every adapter), or call "
                "requires_grad_(True) on each lora_A and lora_B",
                f"{sum(map(len, frozen.values()))} of {n_tensors} adapter tensors have "
                f"requires_grad=False, in {len(frozen)} of {len(layers)} LoRA layers (e.g. "
                f"{first}.{frozen[first][0]}): an optimizer skips them and training leaves "
                "them as they are",
            )
        )
    checked = {n: adapter_at_start(layer) for n, layer in layers.items() if n not in frozen}
    checked = {n: at_init for n, at_init in checked.items() if at_init is not None}
    untrained = [n for n, at_init in checked.items() if at_init]
    if untrained:
        inits = {layers[n].config.init for n in untrained}
        what = (
            "lora_B is exactly zero"
            if inits == {"default"}
            else f"A and B are still exactly {display_name(INITS[inits.pop()])}'s starting values"
            if len(inits) == 1
            else "the adapters are exactly at their initialisation"
        )
        if len(untrained) == len(checked):
            scope = f"in all {len(untrained)} trainable LoRA layers ({_names(untrained)})"
            effect = "so the adapters have not changed what the model computes"
        else:
            scope = (
                f"in {len(untrained)} of {len(checked)} trainable LoRA layers "
                f"({_names(untrained)}), while the others moved"
            )
            effect = "as if these adapters were added after the optimizer was built"
        findings.append(
            Finding(
                "untrained-adapter",
                "train the adapters (lab.train); if you did, no gradient reached them: build "
                "the optimizer after add_lora, give it lr > 0 and call optimizer.step()",
                f"{what} {scope}, {effect}",
            )
        )
    bad = [
        f"{name}.{key}"
        for name, layer in layers.items()
        for key, p in layer.adapter_parameters().items()
        if not p.is_meta and not bool(torch.isfinite(p).all())
    ]
    if bad:
        findings.append(
            Finding(
                "adapter-nonfinite",
                "start again from a fresh adapter (lab.remove_lora(model, merge=False), then "
                "add_lora) and train with a lower lr or a smaller alpha",
                f"{len(bad)} adapter tensors hold nan or inf ({_names(bad)}): training "
                "diverged, and every output through them is nan",
            )
        )
    return findings


def _base_trainable(model: nn.Module, layers: dict[str, LoRALinear]) -> list[Finding]:
    """base-trainable: what trains besides the adapters, and what it costs."""
    if not layers:
        return []
    adapter_ids = {id(p) for layer in layers.values() for p in layer.adapter_parameters().values()}
    extra = [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in adapter_ids
    ]
    if not extra:
        return []
    count = sum(p.numel() for _, p in extra)
    # Each trainable number costs its gradient and AdamW's two moments, in its own dtype
    # (4 + 8 bytes in fp32), on top of the weight it already occupies.
    cost = sum(3 * p.numel() * p.element_size() for _, p in extra)
    lora = sum(p.numel() for layer in layers.values() for p in layer.adapter_parameters().values())
    return [
        Finding(
            "base-trainable",
            "freeze the base: call add_lora last (it freezes every non-adapter parameter), or "
            "call requires_grad_(False) on the parameters listed",
            f"{count:,} base parameters in {len(extra)} tensors still require grad next to "
            f"{lora:,} adapter parameters ({_names([n for n, _ in extra])}); their gradients "
            f"and AdamW moments cost {format_bytes(cost)} ({cost // count} bytes each), which is "
            "why memory did not drop",
        )
    ]


def _scaling(layers: dict[str, LoRALinear]) -> list[Finding]:
    """scaling-too-small / scaling-too-large."""
    low, high = SCALING_RANGE
    findings = []
    for (rank, alpha, rslora), names in _settings(layers).items():
        config = layers[names[0]].config
        scale = config.scaling
        if low <= scale <= high:
            continue
        other = "alpha/r" if rslora else "alpha/sqrt(r)"
        usual = 2 * _denominator(rank, rslora)  # the lab's default scale 2 under this rule
        too_small = scale < low
        findings.append(
            Finding(
                "scaling-too-small" if too_small else "scaling-too-large",
                f"{'raise' if too_small else 'lower'} alpha to about {usual:g} (scale 2 under "
                f"{config.scaling_rule}, the lab's default), or keep the scale and "
                f"{'raise' if too_small else 'lower'} the learning rate to match",
                f"{config.scaling_rule} = {alpha:g}/"
                f"{f'sqrt({rank})' if rslora else rank} = {scale:.4g} in {len(names)} LoRA "
                f"layers, outside [{low:g}, {high:g}], the range the lab trains well with; the "
                f"same update scale under {other} would be alpha = {_other_rule_alpha(config):.4g}",
            )
        )
    return findings


def scaling_note(model: nn.Module) -> str:
    """The scaling rule, the update scale and the equivalent alpha under the other rule."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        return "no LoRA layers: the model has no adapter scaling (call lab.add_lora first)"
    low, high = SCALING_RANGE
    notes = []
    for (rank, alpha, rslora), names in _settings(layers).items():
        config = layers[names[0]].config
        other = "alpha/r" if rslora else "alpha/sqrt(r)"
        where = "inside" if low <= config.scaling <= high else "outside"
        notes.append(
            f"{len(names)} LoRA layer{'s' if len(names) > 1 else ''} with r={rank}, "
            f"alpha={alpha:g}: rule {config.scaling_rule}, update scale {config.scaling:.4g} "
            f"({where} [{low:g}, {high:g}]); the same scale under {other} takes "
            f"alpha={_other_rule_alpha(config):.4g}"
        )
    return "\n".join(notes)


def _attention_only(model: nn.Module, layers: dict[str, LoRALinear]) -> list[Finding]:
    """attention-only: adapters on q/k/v/o while MLP linears exist without one."""
    leaves = list(dict.fromkeys(name.rpartition(".")[2] for name in layers))
    if not layers or not set(leaves) <= set(_ATTENTION):
        return []
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if id(m) not in inside and is_frozen_linear(m)
    ]
    mlp = [(name, m) for name, m in linears if name.rpartition(".")[2] in _MLP]
    if not mlp:
        return []
    weights = {name: m.in_features * m.out_features for name, m in linears}
    weights.update({name: layer.in_features * layer.out_features for name, layer in layers.items()})
    mlp_weights = sum(weights[name] for name, _ in mlp)
    block_weights = sum(
        w for name, w in weights.items() if name.rpartition(".")[2] in (*_ATTENTION, *_MLP)
    )
    mlp_leaves = sorted({name.rpartition(".")[2] for name, _ in mlp})
    return [
        Finding(
            "attention-only",
            "adapt the MLP too: add_lora(model, targets='all-linear', ...) (LoRA Without Regret "
            "and QLoRA section 4 find attention-only LoRA falls short of full fine-tuning)",
            f"LoRA sits on {'/'.join(leaves)} only ({len(layers)} layers); the "
            f"{len(mlp)} MLP linears ({'/'.join(mlp_leaves)}) hold "
            f"{mlp_weights / block_weights:.0%} of the blocks' linear weights and have no adapter",
        )
    ]


def _merged(layers: dict[str, LoRALinear]) -> list[Finding]:
    """merged: ΔW already inside W, A and B unused by the forward."""
    merged = [name for name, layer in layers.items() if layer.merged]
    if not merged:
        return []
    edited = [name for name in merged if layers[name].adapter_changed_since_merge()]
    requantized = [name for name in merged if isinstance(layers[name].base, Linear4bit)]
    notes = ""
    if edited:
        notes += f"; {len(edited)} adapters were changed after the merge ({_names(edited)})"
    if requantized:
        notes += (
            f"; {len(requantized)} layers were quantised back to 4 bits on merge "
            "(lossy: not W + ΔW exactly)"
        )
    return [
        Finding(
            "merged",
            "call lab.unmerge_lora(model) before training it or loading an adapter into it "
            "(lab.train refuses a merged model), and keep the adapter with lab.save_adapter "
            "instead of saving the merged model as a base",
            f"{len(merged)} of {len(layers)} LoRA layers are merged ({_names(merged)}): their "
            f"forward runs W + ΔW alone, so a gradient step on A and B changes nothing{notes}",
        )
    ]


def _shipped_base(model: nn.Module) -> nn.Module | None:
    """The lab's shipped base when `model` has its architecture, else None."""
    try:
        if getattr(model, "config", None) != load_base_config():
            return None
        return load_base_model("cpu")
    except (OSError, ValueError):  # no readable base file: the check cannot be made
        return None


def _merged_twice(model: nn.Module, layers: dict[str, LoRALinear]) -> list[Finding]:
    """merged-twice: W_model - W_shipped ≈ k·ΔW with k one more than the merge state says.

    An unmerged layer should hold W_shipped (k = 0), a merged one W_shipped + ΔW (k = 1). A
    merged model saved as a base with the adapter loaded again on top gives k = 1 unmerged
    (k = 2 once merged again): the model applies ΔW twice. Only a layer whose merge folds
    LoRA's s·B·A into W (LoRA, LoRA-FA) from an init that left W as it was is fitted: DoRA's
    change is not k·ΔW, and PiSSA or MiLoRA rewrite W by design.
    """
    eligible = {
        name: layer
        for name, layer in layers.items()
        if type(layer).merged_weight is LoRALinear.merged_weight
        and not INITS[layer.config.init].changes_base
        and not layer.lora_B.is_meta
        and bool(layer.lora_B.detach().any())
    }
    if not eligible:
        return []
    shipped = _shipped_base(model)
    if shipped is None:
        return []
    hits = []
    for name, layer in eligible.items():
        try:
            original = shipped.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(original, nn.Linear):
            continue
        w0 = original.weight.detach().double()
        w = layer.base_weight().detach().to("cpu", torch.float64)
        delta = (layer.lora_B.detach().double() @ layer.lora_A.detach().double()).cpu()
        delta = delta * layer.scaling
        if w.shape != w0.shape or not bool(torch.isfinite(w).all()):
            continue
        diff = w - w0
        delta_sq = float((delta * delta).sum())
        if delta_sq <= 1e-12 * float((w0 * w0).sum()) or float(diff.norm()) == 0.0:
            continue
        k = float((diff * delta).sum()) / delta_sq
        residual = float((diff - k * delta).norm() / diff.norm())
        expected = 1 if layer.merged else 0
        # The difference must be ΔW's own shape (residual under 10%), one ΔW too many.
        if residual < 0.1 and abs(k - (expected + 1)) < 0.25:
            hits.append((name, k, residual, layer.merged))
    if not hits:
        return []
    ks = [k for _, k, _, _ in hits]
    merged = sum(m for *_, m in hits)
    state = (
        "and the adapter is merged again on top"
        if merged == len(hits)
        else "while the adapter is still active"
        if not merged
        else f"({merged} of them merged again)"
    )
    return [
        Finding(
            "merged-twice",
            "load the adapter onto the original base (lab.load_base_model()), or use this "
            "model without it (lab.remove_lora(model, merge=False)): its base already holds ΔW",
            f"in {len(hits)} of {len(eligible)} LoRA layers ({_names([n for n, *_ in hits])}) "
            f"the frozen weight minus the shipped base's is k·ΔW of this very adapter with k = "
            f"{min(ks):.2f} to {max(ks):.2f} (residual under "
            f"{max(r for _, _, r, _ in hits):.1%}), {state}: the model applies ΔW "
            f"{round(max(ks)) + (0 if merged else 1)} times",
        )
    ]


def _packed_4bit(model: nn.Module) -> list[Finding]:
    """packed-4bit-count: what model.parameters() misses on a 4-bit base."""
    quantized = _active_4bit(model)
    if not quantized:
        return []
    params = list(model.parameters())
    naive = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    hidden = sum(m.in_features * m.out_features for _, m in quantized)
    packed = sum(m.packed_weight.numel() for _, m in quantized)
    storage = sum(m.storage_bytes() for _, m in quantized)
    true_total = naive + hidden
    counted = count_parameters(model).total  # counts each 4-bit layer as in x out weights
    return [
        Finding(
            "packed-4bit-count",
            "count with lab.count_parameters, which includes the 4-bit weights; the trainable "
            "count is right either way",
            f"model.parameters() sums to {naive:,} (lab.count_parameters: total {counted:,}), "
            f"but the model holds {true_total:,} weights: {hidden:,} frozen 4-bit weights of "
            f"{len(quantized)} Linear4bit layers are {packed:,} packed uint8 bytes (two codes a "
            f"byte; {storage:,} bytes with their scales), buffers rather than parameters; "
            f"trainable share {trainable / true_total:.2%}, not {trainable / naive:.2%}",
        )
    ]
