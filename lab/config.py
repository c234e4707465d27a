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
    "MIN_SCALING",
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
# The smallest: below it the update x A^T B^T * scaling is rounded away next to the base output
# (alpha = 1e-320 makes it exactly 0 in float32), so the adapter would train without effect.
MIN_SCALING = 1e-4
# LoRA+'s ratio of B's learning rate to A's: the paper uses 2 to 2^8 (16 by default).
MAX_LR_RATIO = 1e4


@dataclass(frozen=True)
class Variant:
    """A LoRA flavour: how its layer is built, and its batched form if it has one.

    lab.variants.registry reads these records for everything else that names a flavour: its
    display name, the batched engine's form of it, the explorer's and the CLI's choices.
    """

    name: str
    layer: type  # a lab.lora.LoRALinear subclass, built as layer(base, config=config)
    summary: str  # one line for menus and errors: "DoRA (Liu et al. 2024): ..."
    # The batched sweep engine's form of it: a lab.variants.registry.BatchedForm; True for a
    # layer that computes exactly what LoRALinear computes; None: it trains one run at a time.
    batched: object = None
    display: str = ""  # the name as the lab writes it ("DoRA"); "": the summary's first words


@dataclass(frozen=True)
class Init:
    """An initialisation of A and B (and possibly of the frozen base)."""

    name: str
    apply: Callable  # apply(layer) -> None, called once when the layer is built
    summary: str
    batched: bool = False  # the batched sweep engine reproduces it exactly
    # True: the init moves its starting adapter out of W (W_res = W - scaling * B0 A0, as PiSSA
    # does), so base + adapter together keep the outputs, not the base alone; lab.engine.batched
    # reproduces it by subtracting each configuration's scaling * B0 A0 from the shared W.
    changes_base: bool = False
    check: Callable | None = None  # check(base, config): raise for a base it cannot start from
    restore: Callable | None = None  # restore(layer): undo a change to the base (changes_base)
    # at_start(layer) -> bool | None: is the adapter still exactly as this init left it (None:
    # cannot tell)? The doctor asks it to tell an untrained adapter from a trained one.
    at_start: Callable | None = None
    display: str = ""  # the name as the lab writes it ("PiSSA"); "": the summary's first words


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


def _short(value: object, limit: int = 40) -> str:
    """repr(value), cut short: a 400-digit int must not flood an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_float(name: str, value: numbers.Real, valid: str) -> float:
    """float(value), or a ValueError naming the field for an int too large for a float."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}={_short(value)} is too large; expected {valid}") from None


def check_hparams(rank: object, alpha: object, dropout: object, rslora: object) -> None:
    """Raise TypeError/ValueError for a bad rank, alpha, dropout or rslora.

    Python and numpy numbers are accepted (np.int64(8), np.float64(16)); bools are not numbers
    here (rank=True is a mistake), and rslora must be a real bool, never a string like 'False'.
    The scaling alpha/rank (alpha/sqrt(rank) with rslora) must lie in [MIN_SCALING, MAX_SCALING].
    """
    if not isinstance(rank, numbers.Integral) or _is_bool(rank):
        raise TypeError(f"rank must be an int >= 1, got {_short(rank)} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {_short(rank)}")
    if not isinstance(alpha, numbers.Real) or _is_bool(alpha):
        raise TypeError(
            f"alpha must be a real number > 0, got {_short(alpha)} ({type(alpha).__name__})"
        )
    alpha_f = _as_float("alpha", alpha, "a finite number > 0, typically 1 to 4 times the rank")
    if not math.isfinite(alpha_f) or alpha_f <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {_short(alpha)}")
    if not isinstance(dropout, numbers.Real) or _is_bool(dropout):
        raise TypeError(f"dropout must be a number in [0, 1), got {_short(dropout)}")
    if not 0.0 <= dropout < 1.0:  # also rejects nan, for which every comparison is False
        raise ValueError(f"dropout must be a number in [0, 1), got {_short(dropout)}")
    if not _is_bool(rslora):
        raise TypeError(f"rslora must be True or False, got {rslora!r} ({type(rslora).__name__})")
    try:
        scaling = alpha_f / (math.sqrt(int(rank)) if rslora else int(rank))
    except OverflowError:  # a rank beyond float range (10**400): the scaling is 0 in effect
        scaling = 0.0
    if not MIN_SCALING <= scaling <= MAX_SCALING:
        rule = "alpha/sqrt(rank)" if rslora else "alpha/rank"
        why = (
            "the adapter's output would overflow to inf/nan"
            if scaling > MAX_SCALING
            else "the update would be rounded away and the adapter would train without effect"
        )
        raise ValueError(
            f"alpha={_short(alpha)} with rank={_short(rank)} gives scaling {rule} = "
            f"{scaling:.3g}, outside the bounds [{MIN_SCALING:g}, {MAX_SCALING:g}]: {why}; "
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
        put("dropout", float(self.dropout) + 0.0)  # + 0.0 turns -0.0 into 0.0
        put("rslora", bool(self.rslora))
        put("targets", normalize_targets(self.targets))
        _choice("variant", self.variant, VARIANTS)
        _choice("init", self.init, INITS)
        ratio = self.lr_ratio
        if not isinstance(ratio, numbers.Real) or _is_bool(ratio):
            raise TypeError(f"lr_ratio must be a number > 0 (LoRA+'s lambda), got {_short(ratio)}")
        ratio = _as_float("lr_ratio", ratio, f"a number in (0, {MAX_LR_RATIO:g}]")
        if not math.isfinite(ratio) or not 0 < ratio <= MAX_LR_RATIO:
            raise ValueError(
                f"lr_ratio={_short(ratio)}: expected a number in (0, {MAX_LR_RATIO:g}]; "
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
    def from_dict(cls, data: object, what: str = "the LoRAConfig dict") -> LoRAConfig:
        """Inverse of to_dict: exactly the fields, each of its JSON type, validated as usual.

        A stored config (an adapter file's) states every field: a missing one is an error, never
        a default, since a default alpha would load the adapter at the wrong scale. `what` names
        the source in messages ("adapter file a.safetensors").
        """
        if not isinstance(data, Mapping):
            raise TypeError(
                f"{what} must be a dict of LoRAConfig fields, got {type(data).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(map(repr, set(data) - set(names)))
        if unknown:
            raise ValueError(f"{what} has unknown fields {', '.join(unknown)}; fields are {names}")
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(
                f"{what} has no {', '.join(map(repr, missing))}: a stored config states every "
                f"field ({', '.join(names)})"
            )
        # The JSON type of each field, as to_dict writes it; bools are not numbers here.
        for name, kinds, valid in (
            ("rank", (int,), "an int"),
            ("alpha", (int, float), "a number"),
            ("dropout", (int, float), "a number"),
            ("targets", (list,), "a list of layer names"),
            ("rslora", (bool,), "true or false"),
            ("variant", (str,), "a str"),
            ("init", (str,), "a str"),
            ("lr_ratio", (int, float), "a number"),
        ):
            value = data[name]
            if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
                raise TypeError(
                    f"{what}: {name} must be {valid}, got {_short(value)} ({type(value).__name__})"
                )
        try:
            return cls(**{**data, "targets": tuple(data["targets"])})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None

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
