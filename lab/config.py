"""One adapter configuration for the whole lab, and the registry of LoRA flavours.

`LoRAConfig` is the single description of an adapter: `add_lora`, the batched sweep engine,
sweep points, the explorer and adapter files all use it, and all validate through its
constructor. A LoRA flavour (DoRA, ...) is a *variant*: its own layer class, registered here
by name with `register_variant`; an initialisation (PiSSA, ...) is an *init*, registered with
`register_init`. The modules in `lab/variants/` register themselves when `lab` is imported.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALL_LINEAR",
    "INITS",
    "MAX_LR_RATIO",
    "MAX_SCALING",
    "VARIANTS",
    "Init",
    "LoRAConfig",
    "Variant",
    "check_hparams",
    "register_init",
    "register_variant",
]

# The largest scaling (alpha / rank, or alpha / sqrt(rank) with rsLoRA) accepted. The scaling
# multiplies x A^T before B: with scaling = 1e300 that product overflows float32 to inf, and
# inf * (B = 0) = nan, so a fresh adapter would already output nan. Ordinary settings use
# scaling 0.25 to 64; 1e4 leaves ample room while keeping every intermediate far from overflow.
MAX_SCALING = 1e4
# LoRA+'s ratio of B's learning rate to A's: the paper uses 2 to 2^8 (16 by default).
MAX_LR_RATIO = 1e4


@dataclass(frozen=True)
class Variant:
    """A LoRA flavour: how its layer is built (and, if it has one, its batched form)."""

    name: str
    layer: type  # a lab.lora.LoRALinear subclass, built as layer(base, config=config)
    summary: str  # one line for menus and errors
    batched: bool = False  # the batched sweep engine trains it exactly; else one by one
    fresh_is_identity: bool = True  # a fresh adapter leaves the layer's output unchanged


@dataclass(frozen=True)
class Init:
    """An initialisation of A and B (and possibly of the frozen base)."""

    name: str
    apply: Callable  # apply(layer) -> None, called once when the layer is built
    summary: str
    batched: bool = False  # the batched sweep engine reproduces it exactly
    # True: the init moves its starting adapter out of W (W_res = W - scaling * B0 A0, as PiSSA
    # does), so base + adapter together keep the outputs, not the base alone; lab.batched
    # reproduces it by subtracting each configuration's scaling * B0 A0 from the shared W.
    changes_base: bool = False
    check: Callable | None = None  # check(base, config): raise for a base it cannot start from
    restore: Callable | None = None  # restore(layer): undo a change to the base (changes_base)


# targets=ALL_LINEAR adapts every linear layer of the transformer blocks (attention and MLP),
# never the output head: PEFT's target_modules="all-linear" convention.
ALL_LINEAR = "all-linear"

VARIANTS: dict[str, Variant] = {}
INITS: dict[str, Init] = {}


def register_variant(variant: Variant) -> Variant:
    """Add a flavour to the registry (its module calls this at import)."""
    VARIANTS[variant.name] = variant
    return variant


def register_init(init: Init) -> Init:
    """Add an initialisation to the registry (its module calls this at import)."""
    INITS[init.name] = init
    return init


def _is_bool(value: object) -> bool:
    """True for True/False and numpy's bool scalars."""
    return isinstance(value, bool | np.bool_)


def check_hparams(rank: object, alpha: object, dropout: object, rslora: object) -> None:
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


def normalize_targets(targets: object) -> tuple[str, ...]:
    """A str or an iterable of non-empty str -> a non-empty tuple of str (order kept)."""
    if isinstance(targets, str):
        targets = (targets,)
    elif not isinstance(targets, Iterable) or isinstance(targets, bytes | Mapping):
        raise TypeError(f"targets must be a str or an iterable of str, got {targets!r}")
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one layer, e.g. ('q_proj', 'v_proj')")
    for t in targets:
        if not isinstance(t, str) or not t:
            raise TypeError(f"targets={targets!r}: every target must be a non-empty str, got {t!r}")
    if ALL_LINEAR in targets and len(set(targets)) > 1:
        raise ValueError(
            f"targets={targets!r}: {ALL_LINEAR!r} already means every linear layer of the blocks; "
            f"give it alone (targets={ALL_LINEAR!r}) or name the layers instead"
        )
    return tuple(dict.fromkeys(targets)) if ALL_LINEAR in targets else targets


def _choice(field: str, value: object, registry: Mapping[str, object]) -> str:
    if not isinstance(value, str) or value not in registry:
        raise ValueError(f"{field}={value!r}: expected one of {', '.join(map(repr, registry))}")
    return value


@dataclass(frozen=True)
class LoRAConfig:
    """Everything that defines an adapter. Validated on construction; immutable after.

    >>> LoRAConfig(rank=4, alpha=8).scaling
    2.0
    """

    rank: int = 8  # r: A is (r x in), B is (out x r); 4 or 8 is often enough
    alpha: float = 16  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input only; regularises small data sets
    # layer names (or name suffixes) to adapt; "all-linear": every linear of the blocks, no head
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    variant: str = "lora"  # the layer: "lora" (Hu et al. 2021) or "dora" (Liu et al. 2024)
    init: str = "default"  # A random, B = 0 ("default"), or "pissa" (Meng et al. 2024)
    lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B's learning rate / A's; 1 is plain LoRA

    def __post_init__(self) -> None:
        check_hparams(self.rank, self.alpha, self.dropout, self.rslora)

        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # normalising a frozen dataclass

        put("rank", int(self.rank))
        put("alpha", float(self.alpha))
        put("dropout", float(self.dropout))
        put("rslora", bool(self.rslora))
        put("targets", normalize_targets(self.targets))
        _choice("variant", self.variant, VARIANTS)
        _choice("init", self.init, INITS)
        ratio = self.lr_ratio
        if not isinstance(ratio, numbers.Real) or _is_bool(ratio):
            raise TypeError(f"lr_ratio must be a number > 0 (LoRA+'s lambda), got {ratio!r}")
        if not math.isfinite(ratio) or not 0 < ratio <= MAX_LR_RATIO:
            raise ValueError(
                f"lr_ratio={ratio!r}: expected a number in (0, {MAX_LR_RATIO:g}]; "
                "1 is plain LoRA, LoRA+ uses 16"
            )
        put("lr_ratio", float(ratio))

    @property
    def scaling(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def scaling_rule(self) -> str:
        """The rule as text: 'alpha/r' or 'alpha/sqrt(r)'."""
        return "alpha/sqrt(r)" if self.rslora else "alpha/r"

    def replace(self, **changes) -> LoRAConfig:
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as plain JSON values (targets as a list)."""
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: object) -> LoRAConfig:
        """Inverse of to_dict: exactly the fields, each validated by the constructor."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a LoRAConfig is a dict of its fields, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(map(str, set(data) - set(names)))
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown}; fields are {names}")
        fields = dict(data)
        if isinstance(fields.get("targets"), list):
            fields["targets"] = tuple(fields["targets"])
        return cls(**fields)

    def describe(self) -> str:
        """A short human-readable summary, e.g. 'r=8, alpha=16 (alpha/r), q_proj+v_proj'."""
        extras = [
            f"dropout {self.dropout:g}" if self.dropout else "",
            self.variant if self.variant != "lora" else "",
            self.init if self.init != "default" else "",
            f"LoRA+ lambda={self.lr_ratio:g}" if self.lr_ratio != 1 else "",
        ]
        text = (
            f"r={self.rank}, alpha={self.alpha:g} ({self.scaling_rule}), {'+'.join(self.targets)}"
        )
        return ", ".join([text, *(e for e in extras if e)])
