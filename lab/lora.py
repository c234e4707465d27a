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
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .fileio import atomic_write_bytes

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

_CONFIG_KEY = "lora_lab_config"  # safetensors metadata key that holds the adapter's JSON config
_FORMAT, _VERSION = "lora-lab-adapter", 1


# ---------------------------------------------------------------------------------------------
# Validation. Every public function checks everything first and changes nothing on error.
# ---------------------------------------------------------------------------------------------


# The largest scaling (alpha / rank, or alpha / sqrt(rank) with rsLoRA) add_lora accepts. The
# scaling multiplies x A^T before B: with scaling = 1e300 that product overflows float32 to inf,
# and inf * (B = 0) = nan, so a fresh adapter would already output nan. Ordinary settings use
# scaling 0.25 to 64; 1e4 leaves ample room while keeping every intermediate far from overflow.
MAX_SCALING = 1e4


def _is_bool(value: object) -> bool:
    """True for True/False and numpy's bool scalars."""
    return isinstance(value, bool | np.bool_)


def _check_hparams(rank: object, alpha: object, dropout: object, rslora: object) -> None:
    """Raise TypeError/ValueError for a bad rank, alpha, dropout or rslora.

    Python and numpy numbers are accepted (np.int64(8), np.float64(16)); bools are not numbers
    here (rank=True is a mistake), and rslora must be a real bool, never a string like 'False'.
    The scaling alpha/rank (alpha/sqrt(rank) with rslora) must be at most MAX_SCALING.
    """
    if not isinstance(rank, numbers.Integral) or _is_bool(rank):
        raise TypeError(f"rank must be an int >= 1, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank}")
    if not isinstance(alpha, numbers.Real) or _is_bool(alpha):
        raise TypeError(f"alpha must be a real number > 0, got {alpha!r} ({type(alpha).__name__})")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(dropout, numbers.Real) or _is_bool(dropout):
        raise TypeError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not 0.0 <= dropout < 1.0:  # also rejects nan, for which every comparison is False
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if not _is_bool(rslora):
        raise TypeError(f"rslora must be True or False, got {rslora!r} ({type(rslora).__name__})")
    scaling = float(alpha) / (math.sqrt(int(rank)) if rslora else int(rank))
    if scaling > MAX_SCALING:
        rule = "alpha/sqrt(rank)" if rslora else "alpha/rank"
        raise ValueError(
            f"alpha={alpha!r} with rank={rank} gives scaling {rule} = {scaling:.3g}, above the "
            f"bound {MAX_SCALING:g}: the adapter's output would overflow to inf/nan; "
            "typical alpha is 1 to 4 times the rank"
        )


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


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update scaling * B @ A."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ) -> None:
        if isinstance(base, LoRALinear):
            raise TypeError("base already has LoRA (it is a LoRALinear); wrap a plain nn.Linear")
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_hparams(rank, alpha, dropout, rslora)
        _check_rank_fits(rank, base, "this layer")
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        rank = self.rank
        self.dropout_p = float(dropout)
        # rsLoRA (Kalajdzievski 2023) divides by sqrt(rank) so the update's size does not shrink
        # as the rank grows; classic LoRA divides by rank.
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.merged = False
        # While merged: the A, B and scaling that were folded into W, so unmerge subtracts the
        # very ΔW that merge added even if the adapter is edited meanwhile (non-persistent: not
        # in state_dict, but they move with .to()).
        self.register_buffer("_merged_A", None, persistent=False)
        self.register_buffer("_merged_B", None, persistent=False)
        self._merged_scaling = self.scaling
        # Adapters train in (at least) fp32 even on a bf16/fp16 base: tiny updates to small
        # matrices would be rounded away in half precision. A float64 base keeps float64.
        weight = base.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=dtype, device=weight.device)
        )
        # A is initialised like nn.Linear's weight; B = 0 makes the initial update exactly zero.
        # (On the meta device this is a no-op: there is no data to fill.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

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
        return delta.to(dtype=self.base.weight.dtype, device=self.base.weight.device)

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
        w = self.base.weight
        delta = (b @ a) * scaling
        return (w.to(delta.dtype) + sign * delta.to(w.device)).to(w.dtype)

    def _check_mergeable(self, name: str = "this layer") -> torch.Tensor:
        """The merged weight, or ValueError if it would contain inf/nan (e.g. fp16 overflow)."""
        new = self._folded_weight(+1)
        if not new.is_meta and not bool(torch.isfinite(new).all()):
            raise ValueError(
                f"merging would produce non-finite weights in {name} "
                f"(dtype {self.base.weight.dtype}); weights left unchanged"
            )
        return new

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into base.weight; forward then runs the base alone."""
        if self.merged:
            warnings.warn("LoRALinear is already merged; merge() did nothing", stacklevel=2)
            return
        self.base.weight.copy_(self._check_mergeable())
        self._merged_A = self.lora_A.detach().clone()
        self._merged_B = self.lora_B.detach().clone()
        self._merged_scaling = self.scaling
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

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract from base.weight the ΔW that merge() added (exact up to base-dtype rounding).

        The ΔW subtracted is the one merged, from the A, B and scaling recorded at merge time,
        so W comes back to what it was before merge() even if the adapter was edited while
        merged. In that case a UserWarning says so; the edited adapter is kept, and the
        unmerged layer then computes W x + (new ΔW) x.
        """
        if not self.merged:
            warnings.warn("LoRALinear is not merged; unmerge() did nothing", stacklevel=2)
            return
        changed = self.adapter_changed_since_merge()
        if self._merged_A is None:  # merged flag set by hand: fall back to the current ΔW
            self.base.weight.copy_(self._folded_weight(-1))
        else:
            self.base.weight.copy_(
                self._folded_weight(-1, self._merged_A, self._merged_B, self._merged_scaling)
            )
        self._merged_A = self._merged_B = None
        self.merged = False
        if changed:
            warnings.warn(
                "lora_A/lora_B changed while the layer was merged; unmerge() subtracted the "
                "ΔW that was merged, so W is restored, and the layer now uses the changed "
                "adapter",
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        """Summary shown by print(model)."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"dropout={self.dropout_p:g}, rslora={self.rslora}, merged={self.merged}"
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


def _normalize_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """A str or an iterable of non-empty str -> a non-empty tuple of str."""
    if isinstance(targets, str):
        targets = (targets,)
    elif not isinstance(targets, Iterable):
        raise TypeError(f"targets must be a str or an iterable of str, got {targets!r}")
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one layer, e.g. ('q_proj', 'v_proj')")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"every target must be a non-empty str, got {t!r} in {targets!r}")
    return targets


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


def add_lora(
    model: nn.Module,
    targets: str | Iterable[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Wrap every nn.Linear named like a target in a LoRALinear and freeze everything else.

    A target matches a module whose qualified name equals it or ends with "." + target, so
    "q_proj" matches "blocks.0.attn.q_proj" and "attn.q_proj" works too. Returns the replaced
    names in module order. Everything is validated first: on error the model is unchanged.
    """
    _check_model(model)
    targets = _normalize_targets(targets)
    _check_hparams(rank, alpha, dropout, rslora)

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
        if not isinstance(module, nn.Linear):
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

    # All checks passed: build every new layer, then swap them in, then freeze.
    new_layers = {n: LoRALinear(m, rank, alpha, dropout, rslora) for n, m in matches}
    for name, layer in new_layers.items():
        _replace_module(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():  # includes adapters added by earlier calls
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return list(new_layers)


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer; all-or-nothing: raises before any change if one would overflow."""
    todo = {n: layer for n, layer in _require_lora(model).items() if not layer.merged}
    if not todo:
        warnings.warn("all LoRA layers are already merged; merge_lora did nothing", stacklevel=2)
        return
    for name, layer in todo.items():  # first pass only checks; the second pass writes
        layer._check_mergeable(name)
    for layer in todo.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Unmerge every merged LoRA layer."""
    todo = [layer for layer in _require_lora(model).values() if layer.merged]
    if not todo:
        warnings.warn("no LoRA layer is merged; unmerge_lora did nothing", stacklevel=2)
    for layer in todo:
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every LoRALinear by its plain nn.Linear base, with ΔW merged in or dropped.

    The returned bases keep requires_grad=False (they stay frozen, as they were under LoRA).
    Returns the replaced names; a model without LoRA is left alone and [] is returned.
    """
    layers = lora_layers(model)
    if merge:
        for name, layer in layers.items():  # all-or-nothing, as in merge_lora
            if not layer.merged:
                layer._check_mergeable(name)
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _replace_module(model, name, layer.base)
    return list(layers)


# ---------------------------------------------------------------------------------------------
# Saving and loading adapters
# ---------------------------------------------------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, e.g. {"blocks.0.attn.q_proj.lora_A": (rank, in) tensor, ...}."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
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


def _adapter_config(layers: dict[str, LoRALinear]) -> dict:
    """The JSON-able description of a model's adapters, used both to save and to compare."""
    settings = {
        name: {"rank": m.rank, "alpha": m.alpha, "dropout": m.dropout_p, "rslora": m.rslora}
        for name, m in layers.items()
    }
    first = next(iter(settings.values()))
    uniform = all(s == first for s in settings.values())
    config = {"format": _FORMAT, "version": _VERSION}
    # With mixed settings (add_lora called twice with different ranks, say) the top-level
    # fields are null and the exact per-layer values are stored under "per_layer".
    config.update(first if uniform else dict.fromkeys(first))
    config["targets"] = sorted({name.rpartition(".")[2] for name in layers})
    config["layers"] = list(layers)
    if not uniform:
        config["per_layer"] = settings
    return config


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
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    metadata = {_CONFIG_KEY: json.dumps(_adapter_config(layers))}
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


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a file written by save_adapter into the model's LoRA layers; returns its config.

    The model must already have LoRA with the same settings: call add_lora(model, targets=...,
    rank=..., alpha=..., dropout=..., rslora=...) as when training, then load_adapter. Any
    mismatch raises ValueError and leaves the model unchanged.
    """
    _check_model(model)
    path = _check_path(path, "adapter file")
    if path.is_dir():
        raise IsADirectoryError(f"adapter file {path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable adapter file (truncated or corrupt?): {exc}"
        ) from exc
    if _CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {_CONFIG_KEY!r} metadata: not written by save_adapter?")
    try:
        config = json.loads(metadata[_CONFIG_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(
            f"{path}: the {_CONFIG_KEY!r} metadata is not valid JSON: {_describe(str(exc))}"
        ) from exc
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError(f"{path}: metadata is not a {_FORMAT!r} config")
    if config.get("version") != _VERSION:
        raise ValueError(
            f"{path}: adapter format version {config.get('version')!r} "
            f"is not supported (expected {_VERSION})"
        )
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"cannot load {path}: the model has no LoRA layers; first call add_lora(model, "
            f"targets={config.get('targets')}, rank={config.get('rank')}, "
            f"alpha={config.get('alpha')}, dropout={config.get('dropout')}, "
            f"rslora={config.get('rslora')})"
        )
    expected = _adapter_config(layers)
    differences = [
        f"{field}: file has {_describe(config.get(field))}, "
        f"model has {_describe(expected.get(field))}"
        for field in ("rank", "alpha", "dropout", "rslora", "targets", "layers", "per_layer")
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
    """Count unique parameters; works on the meta device since only shapes are needed."""
    _check_model(model)
    # model.parameters() yields each Parameter object once, so a tied weight counts once.
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParamCount(trainable=trainable, total=sum(p.numel() for p in params))
