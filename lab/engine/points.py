"""What to train: a sweep point (a LoRAConfig plus the training settings), grids of them, labels."""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..analysis import canonical_targets
from ..base import BASE_MODEL_PATH
from ..config import ALL_LINEAR, INITS, LoRAConfig
from ..forgetting import check_replay, with_replay
from ..quant import SCHEMES, quantize_base
from ..surgery import add_lora
from ..tasks import FINETUNE_TASKS, Task, get_task
from ..training import MAX_STEPS, check_count, check_lr, check_seed
from ..variants.registry import display_name, flavour_label
from .batched import AdapterSpec, batchable

__all__ = [
    "ALL_TARGETS",
    "DEFAULT_STEPS",
    "FORMAT",
    "POINT_FIELDS",
    "SHORT_TARGETS",
    "SweepPoint",
    "base_fingerprint",
    "describe",
    "expand_targets",
    "flavour_name",
    "full_point",
    "grid",
]

# Bump when results stop being comparable (training loop, tasks or the stored fields change):
# the tag is part of every key, so old cache files are simply never looked up again.
FORMAT = "lora-lab-sweep/1"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's choice
# The short names the explorer shows: q, k, v, o, up, down.
SHORT_TARGETS = {t.removesuffix("_proj"): t for t in ALL_TARGETS}
ALL_TARGETS_SORTED = tuple(sorted(ALL_TARGETS))  # what targets="all-linear" means for a point
DEFAULT_ALPHA = 16.0
LORA_LR = 2e-2  # adapters start at zero and are small: they want a larger step than full FT
FULL_LR = 1e-3  # full fine-tuning at 2e-2 would wreck the pretrained weights
DEFAULT_STEPS = 600  # enough for rank to matter on sort_desc, ~30 s a point on a laptop CPU

# A point's settings by name, in the order of its constructor, its JSON and its cache key:
# the adapter's (held in `point.lora`, read through properties) and the training run's.
ADAPTER_FIELDS = ("rank", "alpha", "dropout", "targets", "rslora", "variant", "init", "lr_ratio")
POINT_FIELDS = ("task", *ADAPTER_FIELDS[:5], "steps", "lr", "batch_size", "seed",
                *ADAPTER_FIELDS[5:], "quant", "replay")  # fmt: skip
# Full fine-tuning has no adapter: these fixed values stand for it, so that every spelling of
# "full fine-tuning" is the same point (and the same cache file).
NO_ADAPTER = {"rank": None, "alpha": 0.0, "dropout": 0.0, "targets": (), "rslora": False,
              "variant": "lora", "init": "default", "lr_ratio": 1.0}  # fmt: skip
# Fields left out of to_dict at these values, so a plain LoRA point keeps the key (and cache
# file) it had before they existed.
_FLAVOUR_DEFAULTS = {"variant": "lora", "init": "default", "lr_ratio": 1.0, "quant": None,
                     "replay": 0.0}  # fmt: skip
_UNSET = object()  # an adapter setting not given: taken from `lora`, else its default


@dataclass(frozen=True, init=False, repr=False)
class SweepPoint:
    """One training run's settings: an adapter (a LoRAConfig; None: full fine-tuning) and how
    it trains.

    Built as always, SweepPoint("sort_desc", 8, alpha=16.0, ...) (rank None: full fine-tuning),
    or from a config, SweepPoint("sort_desc", lora=LoRAConfig(rank=8)). The adapter's settings
    read as point.rank, point.alpha, ... (full fine-tuning: rank None, alpha 0.0, targets ()).
    """

    task: str
    lora: LoRAConfig | None  # the adapter; None for full fine-tuning
    steps: int
    lr: float  # given as None: LORA_LR for LoRA, FULL_LR for full fine-tuning
    batch_size: int
    seed: int
    quant: str | None  # a 4-bit frozen base: "nf4", "fp4" or "int4" (None: fp32)
    replay: float  # fraction of training examples from the pretraining mix (lab.forgetting)

    def __init__(
        self,
        task: str,
        rank: int | None = _UNSET,
        alpha: float = _UNSET,
        dropout: float = _UNSET,
        targets: Sequence[str] = _UNSET,  # leaf names or short names, stored sorted
        rslora: bool = _UNSET,  # scaling alpha/sqrt(r) instead of alpha/r
        steps: int = DEFAULT_STEPS,
        lr: float | None = None,
        batch_size: int = 64,
        seed: int = 0,
        variant: str = _UNSET,  # the LoRA flavour (lab.VARIANTS)
        init: str = _UNSET,  # A, B initialisation (lab.INITS)
        lr_ratio: float = _UNSET,  # LoRA+: B's learning rate over A's (1: plain LoRA)
        quant: str | None = None,
        replay: float = 0.0,
        *,
        lora: LoRAConfig | None = _UNSET,
    ) -> None:
        given = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora,
                     variant=variant, init=init, lr_ratio=lr_ratio)  # fmt: skip
        if lora is _UNSET:  # the plain constructor: defaults are plain LoRA's
            if rank is _UNSET:
                raise TypeError("SweepPoint needs a rank (None: full fine-tuning) or a lora=")
            base = {**LoRAConfig().to_dict(), "alpha": DEFAULT_ALPHA, "targets": DEFAULT_TARGETS}
        elif lora is None:  # full fine-tuning (as dataclasses.replace passes it back)
            base = NO_ADAPTER
        elif isinstance(lora, LoRAConfig):
            base = {name: getattr(lora, name) for name in ADAPTER_FIELDS}
        else:
            raise TypeError(f"lora={lora!r}: expected a lab.LoRAConfig, or None for full FT")
        adapter = {k: base[k] if v is _UNSET else v for k, v in given.items()}
        _build(self, task, adapter, steps, lr, batch_size, seed, quant, replay)

    # The adapter's settings, read from the config it holds (full fine-tuning: NO_ADAPTER).
    def _adapter_field(name: str):  # noqa: N805 - a helper that builds properties
        def read(self: SweepPoint):
            return NO_ADAPTER[name] if self.lora is None else getattr(self.lora, name)

        return property(read, doc=f"The adapter's {name} (LoRAConfig.{name}).")

    rank = _adapter_field("rank")
    alpha = _adapter_field("alpha")
    dropout = _adapter_field("dropout")
    targets = _adapter_field("targets")
    rslora = _adapter_field("rslora")
    variant = _adapter_field("variant")
    init = _adapter_field("init")
    lr_ratio = _adapter_field("lr_ratio")
    del _adapter_field

    def __repr__(self) -> str:
        return f"SweepPoint({', '.join(f'{n}={getattr(self, n)!r}' for n in POINT_FIELDS)})"

    @property
    def adapter(self) -> LoRAConfig:
        """The point's adapter as a LoRAConfig (LoRA points only)."""
        if self.lora is None:
            raise ValueError("full fine-tuning has no adapter, so no LoRAConfig")
        return self.lora

    @property
    def batchable(self) -> bool:
        """True if the batched engine trains this point exactly (else it trains alone)."""
        return not self.is_full and self.quant is None and batchable(self.lora)

    def prepare(self, model: nn.Module) -> list[str]:
        """Give `model` this point's adapter (and 4-bit base) exactly as a run of it starts.

        Seeds the global generator with `seed` first: LoRA's A initialisation and the adapter
        dropout masks come from it. Full fine-tuning: nothing to add.
        """
        if self.is_full:
            return []
        if self.quant is not None:
            quantize_base(model, scheme=self.quant)
        torch.manual_seed(self.seed)
        return add_lora(model, self.lora)

    def spec(self) -> AdapterSpec:
        """The point's adapter and optimizer settings, for lab.engine.batched (LoRA points only)."""
        if self.is_full:
            raise ValueError("full fine-tuning has no adapter, so no AdapterSpec")
        if self.quant is not None:
            raise ValueError(f"{describe(self)}: a 4-bit base trains alone, not batched")
        return AdapterSpec(self.lora, self.lr, self.seed)

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning (no adapter)."""
        return self.lora is None

    def training_task(self) -> Task:
        """The task the run trains on: the point's task, with its replay mixed in (if any)."""
        return with_replay(get_task(self.task), self.replay)

    def to_dict(self) -> dict:
        """The settings as plain JSON values, flat, by name (POINT_FIELDS).

        The flavour fields (variant, init, lr_ratio, quant, replay) are left out at their
        defaults, so a plain LoRA point keeps the key (and cache file) it had before they existed.
        """
        data = {name: getattr(self, name) for name in POINT_FIELDS}
        data["targets"] = list(self.targets)
        for name, default in _FLAVOUR_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SweepPoint:
        """Inverse of to_dict (validates like the constructor)."""
        if not isinstance(data, dict):
            raise TypeError(f"a point is a dict of its fields, got {type(data).__name__}")
        targets = data.get("targets", DEFAULT_TARGETS)
        if not isinstance(targets, list | tuple):
            raise TypeError(f"targets={targets!r}: expected a list of layer names")
        return cls(**{**data, "targets": tuple(targets)})

    @property
    def key(self) -> str:
        """Stable cache key: a hash of the format tag, the base model and the settings."""
        canonical = json.dumps(
            {"format": FORMAT, "base": base_fingerprint(), **self.to_dict()}, sort_keys=True
        )
        return hashlib.sha1(canonical.encode()).hexdigest()[:20]


def _build(point, task, adapter: dict, steps, lr, batch_size, seed, quant, replay) -> None:
    """Validate and normalise a point's settings, then set its fields (the point is frozen)."""

    def put(name: str, value: object) -> None:
        object.__setattr__(point, name, value)

    # Points that compare equal must share one cache key, which hashes the fields' JSON:
    # so whole numbers are plain ints (numpy's int64 from np.arange is not JSON) and
    # -0.0 becomes 0.0 (equal, but written "-0.0"); see `key`.
    def plain(value: object) -> object:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return int(value) if integral else value

    rank, steps, batch_size, seed = map(plain, (adapter["rank"], steps, batch_size, seed))
    replay = check_replay(replay) + 0.0
    if quant is not None and (not isinstance(quant, str) or quant not in SCHEMES):
        raise ValueError(
            f"quant={quant!r}: expected None (full-precision base) or one of {', '.join(SCHEMES)}"
        )
    if not isinstance(task, str) or task not in FINETUNE_TASKS:
        raise ValueError(f"task={task!r}: expected one of {', '.join(FINETUNE_TASKS)}")
    check_count("steps", steps, MAX_STEPS)
    check_count("batch_size", batch_size)
    check_seed(seed)
    if not isinstance(adapter["rslora"], bool):  # 'False' is a non-empty string, i.e. true
        raise TypeError(f"rslora={adapter['rslora']!r}: expected True or False")
    if lr is None:
        lr = FULL_LR if rank is None else LORA_LR
    check_lr(lr)
    lora = None
    if rank is None:
        if quant is not None:
            raise ValueError(
                f"quant={quant!r} needs an adapter: a 4-bit base is frozen, so full "
                "fine-tuning (rank None) cannot train it; give a rank"
            )
    else:
        targets = expand_targets(adapter["targets"])
        try:  # validated by the one adapter config
            lora = LoRAConfig(**{**adapter, "rank": rank, "targets": targets})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (rank None means full fine-tuning)") from None
        if INITS[lora.init].changes_base and quant is not None:  # PiSSA, MiLoRA: W is rewritten
            name = display_name(INITS[lora.init])
            raise ValueError(
                f"init={lora.init!r} with quant={quant!r}: {name} needs the full-precision W; "
                "use init='default' on a 4-bit base"
            )
    for name, value in (("task", task), ("lora", lora), ("steps", steps), ("lr", float(lr)),
                        ("batch_size", batch_size), ("seed", seed), ("quant", quant),
                        ("replay", replay)):  # fmt: skip
        put(name, value)


def expand_targets(targets: object) -> tuple[str, ...]:
    """The layer names a point adapts: short names (q, k, v, o, up, down) and 'all-linear'
    spelled out as full names, sorted.

    A bare string is one name, never its characters; an unknown name is refused with the list.
    (LoRAConfig keeps its own targets as given: names or suffixes, and 'all-linear' as is.)
    """
    if isinstance(targets, str):
        targets = (targets,)
    elif not isinstance(targets, Iterable) or isinstance(targets, bytes | dict):
        raise TypeError(f"targets={targets!r}: expected layer names, e.g. ('q_proj', 'v_proj')")
    targets = tuple(targets)
    bad = [t for t in targets if not isinstance(t, str)]
    if bad:
        raise TypeError(f"targets={targets!r}: every target must be a str, got {bad[0]!r}")
    if ALL_LINEAR in targets:
        if len(set(targets)) > 1:
            raise ValueError(
                f"targets={targets!r}: {ALL_LINEAR!r} already names every linear of the blocks; "
                "give it alone or name the layers instead"
            )
        return ALL_TARGETS_SORTED
    full = tuple(SHORT_TARGETS.get(t, t) for t in targets)
    unknown = sorted(set(full) - set(ALL_TARGETS))
    if not full or unknown:
        raise ValueError(
            f"targets={targets!r}: expected some of {', '.join(ALL_TARGETS)} "
            f"(or {', '.join(SHORT_TARGETS)}), or {ALL_LINEAR!r} for all of them"
        )
    return tuple(sorted(set(full)))


@functools.cache
def _fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def base_fingerprint(path: Path = BASE_MODEL_PATH) -> str:
    """A short hash of the base model file: results of another base are other cache entries."""
    try:
        info = path.stat()
    except OSError:
        return "missing"
    return _fingerprint(str(path), info.st_mtime_ns, info.st_size)


def grid(
    task: str,
    ranks: Iterable[int],
    alphas: Iterable[float] = (DEFAULT_ALPHA,),
    dropouts: Iterable[float] = (0.0,),
    targets: Sequence[str] = DEFAULT_TARGETS,
    rslora: bool = False,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    variant: str = "lora",
    init: str = "default",
    lr_ratio: float = 1.0,
    quant: str | None = None,
    lrs: Iterable[float] | None = None,
    replay: float = 0.0,
) -> list[SweepPoint]:
    """The cartesian product ranks x alphas x dropouts x lrs (in that order), duplicates removed.

    `lrs` makes the learning rate an axis (give `lr` or `lrs`, not both; neither: LORA_LR).
    variant, init, lr_ratio and quant choose the LoRA flavour of every point, replay the
    fraction of pretraining data mixed into fine-tuning (see SweepPoint).

    Each of ranks, alphas, dropouts (and lrs) must be a non-empty list (a bare number is refused).
    """
    examples = {"ranks": "[4, 8]", "alphas": "[16.0]", "dropouts": "[0.0, 0.1]",
                "lrs": "[1e-3, 3e-3, 1e-2]"}  # fmt: skip
    if lrs is not None and lr is not None:
        raise TypeError(f"give lr={lr!r} or lrs={lrs!r}, not both")
    axes = [("ranks", ranks), ("alphas", alphas), ("dropouts", dropouts)]
    if lrs is not None:
        axes.append(("lrs", lrs))
    for name, values in axes:
        if isinstance(values, str | bytes | numbers.Number) or not isinstance(values, Iterable):
            raise TypeError(
                f"{name}={values!r}: expected a list of numbers, e.g. {name}={examples[name]}"
            )
    ranks, alphas, dropouts = list(ranks), list(alphas), list(dropouts)
    lr_axis = [lr] if lrs is None else list(lrs)
    named = (("ranks", ranks), ("alphas", alphas), ("dropouts", dropouts), ("lrs", lr_axis))
    empty = [n for n, v in named if not v]
    if empty:
        raise ValueError(f"{empty[0]} is empty: the grid would have no points")
    targets = expand_targets(targets)
    points = [
        SweepPoint(
            task,
            r,
            a,
            d,
            targets,
            rslora,
            steps,
            lr,
            batch_size,
            seed,
            variant,
            init,
            lr_ratio,
            quant,
            replay,
        )  # fmt: skip
        for r in ranks
        for a in alphas
        for d in dropouts
        for lr in lr_axis
    ]
    return list(dict.fromkeys(points))


def full_point(
    task: str,
    steps: int = DEFAULT_STEPS,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    replay: float = 0.0,
) -> SweepPoint:
    """The full fine-tuning reference for a task (lr None: FULL_LR)."""
    return SweepPoint(task, None, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      replay=replay)  # fmt: skip


def describe(point) -> str:
    """A short label: 'r8 α16 p0.1' (plus targets and scaling when not the defaults).

    Given a result (anything with a .point), a diverged run is labelled as such:
    'r8 α16 (diverged)'.
    """
    if not isinstance(point, SweepPoint):
        return describe(point.point) + (" (diverged)" if point.diverged else "")
    if point.is_full:
        return "full fine-tuning" + (f" replay {point.replay:.0%}" if point.replay else "")
    text = f"r{point.rank} α{point.alpha:g}"
    if point.dropout:
        text += f" p{point.dropout:g}"
    if point.targets == ALL_TARGETS_SORTED:
        text += " " + ALL_LINEAR
    elif point.targets != DEFAULT_TARGETS:
        text += " " + ",".join(t.removesuffix("_proj") for t in canonical_targets(point.targets))
    if point.rslora:
        text += " rsLoRA"
    flavour = flavour_name(point)
    if flavour != "LoRA":
        text += " " + flavour
    if point.replay:
        text += f" replay {point.replay:.0%}"
    return text


def flavour_name(point: SweepPoint) -> str:
    """'LoRA', or the flavour's name: 'DoRA', 'PiSSA', 'LoRA+ λ16', 'NF4 base', combined."""
    parts = []
    if (point.variant, point.init) != ("lora", "default"):  # the registry's names for them
        parts.append(flavour_label(point.variant, point.init))
    if point.lr_ratio != 1:
        parts.append(f"LoRA+ λ{point.lr_ratio:g}")
    if point.quant is not None:
        parts.append(f"{point.quant.upper()} base")
    return " ".join(parts) or "LoRA"
