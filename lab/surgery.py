"""Model surgery: put LoRA layers into a model, merge or remove them, count what trains.

`add_lora` finds the frozen linears named like the config's targets (PEFT's names: q_proj,
v_proj, ... or "all-linear"), wraps each in the config's layer (lab.lora.LoRALinear or a
flavour's) and freezes everything else; `merge_lora`, `unmerge_lora` and `remove_lora` act on
every LoRA layer at once, all-or-nothing; `parameter_groups` gives the optimizer its groups
(LoRA+) and `count_parameters` the trainable share.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn

from .checks import check_finite_base, check_model, check_rank_fits, describe
from .config import ALL_LINEAR, INITS, VARIANTS, LoRAConfig
from .frozen import is_frozen_linear, is_quantized
from .lora import LoRALinear

__all__ = [
    "ParamCount",
    "add_lora",
    "all_linear_modules",
    "as_config",
    "build_layer",
    "check_trainable",
    "count_parameters",
    "lora_layers",
    "merge_lora",
    "parameter_groups",
    "remove_lora",
    "unmerge_lora",
]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model: qualified name -> layer, in module order."""
    check_model(model)
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
        shown = describe(merged)
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
    check_model(model)
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
                f"({describe(where)}); LoRA would wrap only one of them and merging would "
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
        check_rank_fits(rank, module, name)
    init = INITS[config.init]
    for name, module in matches:
        if init.check is not None:  # PiSSA refuses a 4-bit base
            init.check(module, config)
        check_finite_base(module, name)

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
    check_model(model)
    # model.parameters() yields each Parameter object once, so a tied weight counts once.
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    packed = {id(m): m for m in model.modules() if is_quantized(m)}
    frozen_4bit = sum(m.in_features * m.out_features for m in packed.values())
    return ParamCount(trainable=trainable, total=sum(p.numel() for p in params) + frozen_4bit)
