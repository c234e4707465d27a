"""The LoRA doctor: the mistakes that fill LoRA issue trackers, found by looking at a model.

`doctor(model)` reads a model (and optionally an adapter file and the learning rate you mean
to use) and returns a list of `Finding`s: a short code, one sentence of advice (the fix) and
the measured evidence. A trained, healthy adapter gets an empty list. The doctor only reads:
it never runs the model, never changes a tensor or a requires_grad flag.

    findings = lab.doctor(model, "adapter.safetensors", lr=2e-2)
    print(lab.doctor_report(findings))  # "no findings: ..." or one numbered entry per finding

(The module is lab.diagnosis, not lab.doctor: `lab.doctor` is the function.)

Each check and its code is listed in `CODES`. What they catch, as PEFT, Unsloth and
LLMs-from-scratch users report them:
  - an adapter that never trained (lora_B still exactly zero: the optimizer was built before
    add_lora, lr 0, no optimizer.step()) or whose tensors do not require grad;
  - a base left trainable next to the adapters ("why did memory not drop?");
  - a scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) far from what trains;
  - attention-only targets, which LoRA Without Regret and QLoRA (section 4) find fall short;
  - a merged adapter, and ΔW counted twice (a merged model saved as a base, the adapter loaded
    again on top);
  - 4-bit weights that a parameter count over model.parameters() misses (packed two a byte);
  - an adapter file that is unreadable, empty, untrained or made for other settings;
  - a learning rate outside the range that trained in the lab's own shipped sweeps.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import (
    _adapter_config,
    _adapter_description,
    _read_adapter_file,
    _summary,
    load_adapter,
    lora_state_dict,
)
from .base import load_base_config, load_base_model
from .checks import check_path as _check_path
from .config import LoRAConfig
from .fileio import regular_file
from .frozen import is_frozen_linear
from .lora import LoRALinear
from .quant import Linear4bit
from .surgery import count_parameters, lora_layers
from .sweeps import SweepResult, load_grid_file
from .training import check_lr

__all__ = [
    "CODES",
    "GRID_DIR",
    "LR_TOLERANCE",
    "SCALING_RANGE",
    "Finding",
    "LrEvidence",
    "doctor",
    "lr_evidence",
    "report",
    "scaling_note",
]

# What each code means (one line each); `report` and notebook 08 show them.
CODES: dict[str, str] = {
    "no-adapter": "no LoRA layers, and nothing the model could train (or only a 4-bit base)",
    "adapter-frozen": "adapter tensors with requires_grad=False: training cannot move them",
    "untrained-adapter": "adapters still exactly at their initialisation (lora_B = 0)",
    "adapter-nonfinite": "nan or inf inside adapter tensors (a diverged run)",
    "base-trainable": "non-adapter parameters still trainable next to the adapters",
    "scaling-too-small": "the update scale alpha/r (or alpha/sqrt(r)) is far below what trains",
    "scaling-too-large": "the update scale alpha/r (or alpha/sqrt(r)) is far above what trains",
    "attention-only": "adapters on q/k/v/o only, none on the MLP",
    "merged": "adapters merged into the base: training or loading now would not act",
    "merged-twice": "the frozen base already holds this adapter's ΔW: it counts twice",
    "packed-4bit-count": "4-bit weights missing from a count over model.parameters()",
    "adapter-file-unreadable": "the adapter file cannot be read by lab.load_adapter",
    "adapter-file-empty": "the adapter file holds no lora_A / lora_B tensors",
    "adapter-file-nonfinite": "nan or inf inside the adapter file's tensors",
    "adapter-file-untrained": "the adapter file's lora_B tensors are all zero (saved untrained)",
    "adapter-file-mismatch": "the adapter file was saved for other LoRA settings than the model's",
    "lr-too-high": "lr above every learning rate that trained in the lab's sweeps",
    "lr-too-low": "lr below every learning rate that trained in the lab's sweeps",
}

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

# Learning rates: the shipped grids space lrs by factors of 2, so an lr up to LR_TOLERANCE
# times beyond the extremes that trained may still train (never at or past one that failed).
LR_TOLERANCE = 2.0
# A run "trained" when it did not diverge and reached at least this fraction of the best
# held-out accuracy that the same kind of run (LoRA, LoRA+, full fine-tuning) reached on the
# same task in the same grid file: a stalled run keeps the base's accuracy, near zero.
USEFUL_FRACTION = 0.5
GRID_DIR = Path(__file__).parent / "data"  # every *_grid.json here is read

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("up_proj", "down_proj", "gate_proj")
_CODE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a kebab-case `code`, one sentence of `advice`, the measured `detail`."""

    code: str  # e.g. "untrained-adapter"; CODES says what each means
    advice: str  # the fix, one sentence
    detail: str  # the evidence: numbers and layer names

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE.fullmatch(self.code):
            raise ValueError(f"code={self.code!r}: expected a kebab-case str such as 'merged'")
        for name in ("advice", "detail"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}={value!r}: expected a non-empty str")

    def __str__(self) -> str:
        return f"[{self.code}] {self.advice}\n    evidence: {self.detail}"


def report(findings: Iterable[Finding]) -> str:
    """The findings as text for a notebook: a clean bill, or one numbered entry each."""
    if isinstance(findings, Finding) or not isinstance(findings, Iterable):
        raise TypeError(f"findings must be a list of Finding (from doctor), got {findings!r}")
    findings = list(findings)
    bad = [f for f in findings if not isinstance(f, Finding)]
    if bad:
        raise TypeError(f"findings must be Finding objects (from doctor), got {bad[0]!r}")
    if not findings:
        return f"no findings: none of the doctor's {len(CODES)} checks fired"
    lines = [f"{len(findings)} finding{'s' if len(findings) > 1 else ''}:"]
    lines += [f"{i}. {finding}" for i, finding in enumerate(findings, 1)]
    return "\n".join(lines)


def doctor(
    model: nn.Module, adapter_path: str | os.PathLike | None = None, *, lr: float | None = None
) -> list[Finding]:
    """Diagnose `model`'s LoRA setup (and an adapter file, and an lr); [] means healthy.

    `adapter_path`: a file from lab.save_adapter to check against the model (it is read,
    never loaded into the model). `lr`: the learning rate you train (or trained) with,
    compared with those that trained in the lab's shipped sweeps. A bad file gives a finding,
    never an exception; a wrong argument type raises TypeError, a bad lr ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    path = None if adapter_path is None else _check_path(adapter_path, "adapter_path")
    if lr is not None:
        check_lr(lr)
    layers = lora_layers(model)
    with torch.no_grad():
        findings = _adapter_state(model, layers)
        findings += _base_trainable(model, layers)
        findings += _scaling(layers)
        findings += _attention_only(model, layers)
        findings += _merged(layers)
        findings += _merged_twice(model, layers)
        findings += _packed_4bit(model)
        if path is not None:
            findings += _adapter_file(model, layers, path)
        if lr is not None:
            findings += _learning_rate(layers, float(lr))
    return findings


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _names(names: list[str], limit: int = 3) -> str:
    """'a, b, c and 4 more': a list of layer names short enough for one line."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _span(low: float, high: float, prefix: str) -> str:
    """'between 0.005 and 0.04', or 'about 0.001' when only one value is known."""
    return f"about {prefix}{low:g}" if low == high else f"between {prefix}{low:g} and {high:g}"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.2f} MiB"


def _active_4bit(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    """The 4-bit linears the forward uses (not the copies a merge keeps for unmerge)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, Linear4bit) and "_quantized_base" not in name.split(".")
    ]


def _denominator(rank: int, rslora: bool) -> float:
    return math.sqrt(rank) if rslora else float(rank)


def _other_rule_alpha(config: LoRAConfig) -> float:
    """The alpha giving the same scale under the other rule (alpha/r <-> alpha/sqrt(r))."""
    return config.scaling * _denominator(config.rank, not config.rslora)


def _settings(layers: dict[str, LoRALinear]) -> dict[tuple, list[str]]:
    """(rank, alpha, rslora) -> the layers using it, in module order."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault((layer.rank, layer.alpha, layer.rslora), []).append(name)
    return groups


# ---------------------------------------------------------------------------------------------
# The model's own checks
# ---------------------------------------------------------------------------------------------


def _at_init(layer: LoRALinear) -> bool | None:
    """True if the adapter is exactly as its init left it; None if that cannot be told."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    if b.is_meta:
        return None
    if layer.config.init == "default":  # A random, B = 0: only a gradient step moves B
        return not bool(b.any())
    a0, b0 = getattr(layer, "_pissa_A0", None), getattr(layer, "_pissa_B0", None)
    if layer.config.init == "pissa" and a0 is not None and b0 is not None:
        # PiSSA starts B non-zero (W's top singular directions), so compare with that start.
        return bool(torch.equal(a, a0)) and bool(torch.equal(b, b0))
    return None


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
        name: [key for key, p in layer.adapter_parameters().items() if not p.requires_grad]
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
    checked = {n: _at_init(layer) for n, layer in layers.items() if n not in frozen}
    checked = {n: at_init for n, at_init in checked.items() if at_init is not None}
    untrained = [n for n, at_init in checked.items() if at_init]
    if untrained:
        pissa = [n for n in untrained if layers[n].config.init == "pissa"]
        what = (
            "lora_B is exactly zero"
            if not pissa
            else "A and B are still exactly PiSSA's starting singular directions"
            if len(pissa) == len(untrained)
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
            f"and AdamW moments cost {_mib(cost)} ({cost // count} bytes each), which is why "
            "memory did not drop",
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
    (k = 2 once merged again): the model applies ΔW twice. Only plain LoRA with the default
    init is fitted: DoRA's change is not k·ΔW, and PiSSA rewrites W by design.
    """
    eligible = {
        name: layer
        for name, layer in layers.items()
        if layer.config.variant == "lora"
        and layer.config.init == "default"
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


# ---------------------------------------------------------------------------------------------
# An adapter file
# ---------------------------------------------------------------------------------------------


def _why(exc: Exception, path: Path) -> str:
    """An error's message for a finding's detail, which already starts with the path."""
    text = str(exc)
    prefixes = (f"cannot read adapter file {path}: ", f"adapter file {path} ", f"{path}: ")
    for prefix in (*prefixes, f"{path} "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    return text[:300]


def _file_finding(code: str, path: Path, why: str, advice: str | None = None) -> Finding:
    advice = (
        advice or "save the adapter again with lab.save_adapter(model, path) and check the path"
    )
    return Finding(code, advice, f"{path}: {why}")


def _adapter_file(model: nn.Module, layers: dict[str, LoRALinear], path: Path) -> list[Finding]:
    """adapter-file-*: the file read as load_adapter reads it, without loading it."""
    unreadable = "adapter-file-unreadable"
    try:  # a missing path, a folder, a FIFO or a device is named here, never opened
        metadata, tensors = _read_adapter_file(path)
    except (OSError, ValueError) as exc:
        return [_file_finding(unreadable, path, _why(exc, path))]
    adapter_keys = [k for k in tensors if k.rpartition(".")[2] in ("lora_A", "lora_B")]
    if not adapter_keys:
        held = (
            f"{_count(len(tensors), 'tensor')} ({_names(sorted(tensors))})"
            if tensors
            else "no tensors"
        )
        return [
            _file_finding(
                "adapter-file-empty",
                path,
                f"holds {held} and none is a lora_A or lora_B",
                "save the adapter itself with lab.save_adapter(model, path) after add_lora and "
                "training (a base model file or an empty state dict has no adapter tensors)",
            )
        ]
    try:  # the settings as load_adapter validates them: every field present and valid
        stored = _adapter_description(metadata, path)
    except (TypeError, ValueError) as exc:
        return [_file_finding(unreadable, path, _why(exc, path))]
    findings = []
    nonfinite = [
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if nonfinite:
        findings.append(
            _file_finding(
                "adapter-file-nonfinite",
                path,
                f"{len(nonfinite)} tensors hold nan or inf ({_names(nonfinite)})",
                "retrain with a lower lr or alpha and save again: this adapter came from a "
                "diverged run",
            )
        )
    inits = (
        {stored["config"]["init"]}
        if stored["config"] is not None
        else {c["init"] for c in stored["layers"].values()}
    )
    b_keys = [k for k in adapter_keys if k.endswith(".lora_B")]
    if inits == {"default"} and b_keys and not any(bool(tensors[k].any()) for k in b_keys):
        findings.append(
            _file_finding(
                "adapter-file-untrained",
                path,
                f"all {len(b_keys)} lora_B tensors are exactly zero: the adapter was saved "
                "before it trained, and loading it changes nothing",
                "train the adapter, then save it with lab.save_adapter (it was saved fresh)",
            )
        )
    findings += _file_mismatch(model, layers, path, stored, tensors, trial=not findings)
    return findings


def _file_mismatch(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    path: Path,
    stored: dict,
    tensors: dict[str, torch.Tensor],
    trial: bool,
) -> list[Finding]:
    """adapter-file-mismatch: the file's settings, layers and shapes against the model's.

    With `trial`, a file that matches in every way checked here is also loaded into a copy of
    the model, so whatever else lab.load_adapter would refuse is reported too.
    """
    config = _summary(stored)
    settings = ", ".join(
        f"{k}={config[k]!r}" for k in ("targets", "rank", "alpha", "rslora", "variant")
        if config.get(k) is not None
    )  # fmt: skip
    advice = (
        f"build the model as the file was trained (lab.add_lora(model, {settings}) on a "
        "fresh base) before lab.load_adapter"
    )
    if not layers:
        return [_file_finding("adapter-file-mismatch", path, "the model has no LoRA layers to "
                              "load it into", advice)]  # fmt: skip
    expected = _summary(_adapter_config(layers))
    differences = [
        f"{field}: file {config.get(field)!r}, model {expected.get(field)!r}"
        for field in (*LoRAConfig.__dataclass_fields__, "layers", "per_layer")
        if config.get(field) != expected.get(field)
    ]
    params = lora_state_dict(model)
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(p.shape)}"
        for k, p in params.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(p.shape)
    ]
    missing = sorted(params.keys() - tensors.keys())
    if missing and not differences:
        differences.append(f"tensors missing from the file: {_names(missing)}")
    differences += shapes
    if trial and not differences and not any(layer.merged for layer in layers.values()):
        # Everything matched: load a copy, so anything load_adapter refuses is found too.
        try:
            load_adapter(copy.deepcopy(model), path)
        except (TypeError, ValueError, OSError) as exc:
            differences.append(str(exc)[:200])
    if not differences:
        return []
    return [
        _file_finding(
            "adapter-file-mismatch",
            path,
            f"does not match the model's LoRA layers ({'; '.join(differences)[:600]})",
            advice,
        )
    ]


# ---------------------------------------------------------------------------------------------
# The learning rate, against the lab's shipped sweeps
# ---------------------------------------------------------------------------------------------


def _kind(point) -> str:
    if point.rank is None:
        return "full fine-tuning"
    return "LoRA+" if point.lr_ratio != 1 else "LoRA"


@dataclass(frozen=True)
class LrEvidence:
    """The learning rates that trained one kind of run in the lab's grid files."""

    kind: str  # "LoRA", "LoRA+" or "full fine-tuning"
    trained: tuple[float, ...]  # lrs at which some run trained (ascending)
    failed: tuple[float, ...]  # lrs at which every run diverged or stalled (ascending)
    runs: int  # results of this kind that the range comes from
    sources: tuple[str, ...]  # the grid files' names

    @property
    def low(self) -> float:
        return self.trained[0]

    @property
    def high(self) -> float:
        return self.trained[-1]


def _grid_results(directory: Path) -> list[tuple[str, SweepResult]]:
    out = []
    for path in sorted(directory.glob("*_grid.json")):
        try:  # a FIFO would block the read, a link to /dev/zero would never end it
            regular_file(path, "grid file")
        except OSError:
            continue
        with warnings.catch_warnings():  # a stale grid warns and gives []: nothing to use
            warnings.simplefilter("ignore")
            try:
                results = load_grid_file(path)
            except ValueError:
                continue
        out += [(path.name, r) for r in results]
    return out


def lr_evidence(kind: str, directory: str | os.PathLike | None = None) -> LrEvidence | None:
    """Which lrs trained runs of `kind` in every *_grid.json of `directory` (default: GRID_DIR).

    A run trained when it did not diverge and reached at least USEFUL_FRACTION of the best
    held-out accuracy of its kind on its task in its file. None when no run of that kind exists.
    """
    kinds = ("LoRA", "LoRA+", "full fine-tuning")
    if kind not in kinds:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(map(repr, kinds))}")
    if directory is None:
        directory = GRID_DIR
    else:  # a mistyped folder must not read as "no evidence"
        directory = _check_path(directory, "directory")
        if not directory.is_dir():
            raise NotADirectoryError(
                f"directory {directory} is not a folder (of the lab's *_grid.json sweep files)"
            )
    results = [(f, r) for f, r in _grid_results(directory) if _kind(r.point) == kind]
    if not results:
        return None

    def accuracy(r: SweepResult) -> float:
        acc = r.heldout.get("accuracy", math.nan)
        return math.nan if r.diverged or not math.isfinite(acc) else acc

    best: dict[tuple, float] = {}
    for f, r in results:
        acc = accuracy(r)
        if math.isfinite(acc):
            key = (f, r.point.task)
            best[key] = max(best.get(key, 0.0), acc)
    trained, tried = set(), set()
    for f, r in results:
        tried.add(r.point.lr)
        acc = accuracy(r)
        if math.isfinite(acc) and acc > 0 and acc >= USEFUL_FRACTION * best[(f, r.point.task)]:
            trained.add(r.point.lr)
    if not trained:
        return None
    return LrEvidence(
        kind,
        tuple(sorted(trained)),
        tuple(sorted(tried - trained)),
        len(results),
        tuple(sorted({f for f, _ in results})),
    )


def _learning_rate(layers: dict[str, LoRALinear], lr: float) -> list[Finding]:
    """lr-too-high / lr-too-low, against the runs of the model's kind in the shipped grids."""
    if not layers:
        kind = "full fine-tuning"
    else:
        kind = "LoRA+" if any(layer.lr_ratio != 1 for layer in layers.values()) else "LoRA"
    evidence = lr_evidence(kind)
    if evidence is None and kind == "LoRA+":
        kind, evidence = "LoRA", lr_evidence("LoRA")
    if evidence is None:
        return []  # no shipped run of this kind: nothing to compare with
    low, high = evidence.low, evidence.high
    failed_above = [f for f in evidence.failed if f > high]
    failed_below = [f for f in evidence.failed if f < low]
    too_high = lr > high * LR_TOLERANCE or any(f <= lr for f in failed_above)
    too_low = lr < low / LR_TOLERANCE or any(f >= lr for f in failed_below)
    if not (too_high or too_low):
        return []
    failed = failed_above if too_high else failed_below
    detail = (
        f"lr={lr:g} is {'above' if too_high else 'below'} every learning rate that trained "
        f"{kind} in the lab's grids: {_span(low, high, 'lr ')} trained (at least "
        f"{USEFUL_FRACTION:.0%} of the best held-out accuracy; {_count(evidence.runs, 'run')} in "
        f"{', '.join(evidence.sources)}; up to {LR_TOLERANCE:g}x beyond that is allowed)"
    )
    if failed:
        detail += f", and {', '.join(f'{f:g}' for f in failed)} failed (diverged or stalled)"
    other = lr_evidence("LoRA" if kind == "full fine-tuning" else "full fine-tuning")
    if other is not None and other.low <= lr <= other.high:
        detail += f"; {lr:g} is where {other.kind} trained, a different range"
    return [
        Finding(
            "lr-too-high" if too_high else "lr-too-low",
            f"{'lower' if too_high else 'raise'} lr to {_span(low, high, '')}, where {kind} "
            "trained in the lab's grids",
            detail,
        )
    ]
