"""What the rest of the lab asks about a flavour, answered from the registry.

A flavour's module (lab/variants/<name>.py) registers one record, a lab.config.Variant (its own
layer) or a lab.config.Init (its own start for A, B and perhaps W). Everything else that names
or trains a flavour reads it through here, never through a list of its own:

- `display_name` / `flavour_label`: how sweeps, the explorer and notebooks write it ("DoRA");
- `choices_help`: the CLI's help for --variant and --init;
- `batched_form`: how the batched engine trains it (lab.engine.batched_layer), or None: it then
  trains one run at a time, and the engine says so;
- `adapter_at_start`: whether a layer's adapter is still as its init left it (the doctor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..config import INITS, VARIANTS, Init, LoRAConfig, Variant
from ..lora import LoRALinear

__all__ = [
    "PLAIN",
    "BatchedForm",
    "adapter_at_start",
    "batched_form",
    "choices_help",
    "display_name",
    "flavour_label",
]


@dataclass(frozen=True)
class BatchedForm:
    """How the batched engine trains a flavour's configurations inside one stacked layer.

    Plain LoRA needs nothing (`PLAIN`). A flavour says what it adds:

    extra:  its own adapter tensors beyond lora_A and lora_B (DoRA's "magnitude"), stacked per
            configuration and copied from, and back into, its layer's adapter_parameters();
    frozen: adapter tensors that keep their start (LoRA-FA's "lora_A"): learning rate 0;
    output: output(layer, out, h, u, a, b, which) -> y, the stacked layer's output when some of
            its configurations (the bool mask `which`, shape (K,)) use this flavour; the others
            must come out as plain LoRA's out + u b^T. See BatchedLoRALinear.forward for h, u, a, b.
    """

    extra: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    output: Callable | None = None


PLAIN = BatchedForm()

# The methods through which a LoRALinear subclass could compute something else than LoRA: a
# flavour that overrides one of them is not plain LoRA, whatever its record says.
_COMPUTING = (
    "forward", "merged_weight", "delta_weight", "adapter_parameters", "reset_variant_state",
    "merge", "unmerge",
)  # fmt: skip


def _computes_as_plain(layer: type) -> bool:
    """True if `layer` is LoRALinear or a subclass that overrides none of its computations."""
    return all(getattr(layer, m) is getattr(LoRALinear, m) for m in _COMPUTING)


def batched_form(config: LoRAConfig) -> BatchedForm | None:
    """The batched engine's form of `config`'s flavour, or None: train it one run at a time.

    A record's `batched=True` is believed only for a layer that computes exactly as LoRALinear
    does; a flavour with a layer of its own must give a BatchedForm saying what it adds, so it
    is never trained as plain LoRA by mistake. The init must be marked batched too (the engine
    checks, as it builds each configuration, that the init changed W only as it says).
    """
    variant = VARIANTS[config.variant]
    form = variant.batched
    if form is True and _computes_as_plain(variant.layer):
        form = PLAIN
    if not isinstance(form, BatchedForm) or INITS[config.init].batched is not True:
        return None
    return form


def display_name(record: Variant | Init) -> str:
    """The flavour's name as the lab writes it: its `display`, else its summary's first words."""
    return record.display or record.summary.partition(" (")[0]


def flavour_label(variant: str, init: str) -> str:
    """'LoRA', or the names of a config's flavours: 'DoRA', 'PiSSA', 'DoRA PiSSA'."""
    parts = [display_name(VARIANTS[variant])] if variant != "lora" else []
    if init != "default":
        parts.append(display_name(INITS[init]))
    return " ".join(parts) or display_name(VARIANTS["lora"])


def choices_help(registry: Mapping[str, Variant | Init]) -> str:
    """One line naming every registered choice and its source, for the CLI's --help.

    'lora: LoRA (Hu et al. 2021); dora: DoRA (Liu et al. 2024)'
    """
    return "; ".join(f"{name}: {record.summary.partition(':')[0]}"
                     for name, record in registry.items())  # fmt: skip


def adapter_at_start(layer: LoRALinear) -> bool | None:
    """True if the layer's adapter is exactly as its init left it; None if that cannot be told."""
    if layer.lora_B.is_meta:
        return None
    hook = INITS[layer.config.init].at_start
    return None if hook is None else hook(layer)
