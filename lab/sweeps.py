"""Sweeps: train a grid of LoRA settings once, cache every result on disk, summarise the cache.

Data flows one way: a `SweepPoint` says what to train, `run_point` trains it (tasks -> model +
LoRA -> train) and returns a `SweepResult`, and `SweepCache` keeps one JSON file per point so a
point already run is never trained again, even after a kernel restart. The summary helpers at the
end turn cached results into the plain lists that `lab.plots` draws. Nothing here imports plots or
widgets.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import errno
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import socket
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import threads
from .analysis import canonical_targets, count_full, count_lora
from .base import BASE_MODEL_PATH, load_base_config, load_base_model
from .batched import (
    CPU_ROWS_PER_STEP,
    AdapterSpec,
    batchable,
    bytes_per_config,
    default_max_configs,
    max_configs_for_memory,
    train_batched,
)
from .calibrate import calibrated_chunk_size, remove_non_file
from .config import ALL_LINEAR, LoRAConfig
from .executors import RaySession, check_executor, task_error
from .fileio import atomic_write_bytes, regular_file, user_cache_root
from .forgetting import check_replay, forgetting, with_replay
from .lora import add_lora, count_parameters
from .memory import CATEGORIES as MEMORY_CATEGORIES
from .memory import measure_step_memory
from .model import ModelConfig, ToyTransformer, default_device
from .quant import SCHEMES, quantize_base
from .step import autocast_dtype, make_optimizer
from .tasks import FINETUNE_TASKS, PRETRAIN_TASKS, Task, get_task
from .training import (
    MAX_STEPS,
    TrainingDiverged,
    check_count,
    check_fits,
    check_lr,
    check_seed,
    run_bytes,
    train,
)

__all__ = [
    "ALL_TARGETS",
    "DEFAULT_GRID_PATH",
    "DEFAULT_STEPS",
    "FORMAT",
    "SHORT_TARGETS",
    "SweepCache",
    "SweepCacheError",
    "SweepFailed",
    "SweepPoint",
    "SweepResult",
    "accuracy_table",
    "by_rank",
    "cache_dir",
    "default_cache_dir",
    "describe",
    "dropout_series",
    "full_point",
    "grid",
    "keep_torch_cache_at_home",
    "load_grid_file",
    "chunk_size",
    "plan_chunks",
    "run_chunk",
    "run_group",
    "run_point",
    "select",
    "sweep",
    "trainable_counts",
    "user_cache_root",
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
# SweepPoint fields that describe the LoRA flavour, with the values plain LoRA has.
_FLAVOUR_DEFAULTS = {
    "variant": "lora",
    "init": "default",
    "lr_ratio": 1.0,
    "quant": None,
    "replay": 0.0,
}
LORA_LR = 2e-2  # adapters start at zero and are small: they want a larger step than full FT
FULL_LR = 1e-3  # full fine-tuning at 2e-2 would wreck the pretrained weights
DEFAULT_GRID_PATH = Path(__file__).parent / "data" / "default_grid.json"
DEFAULT_STEPS = 600  # enough for rank to matter on sort_desc, ~30 s a point on a laptop CPU
MAX_RESULT_BYTES = 64 << 20  # a result is tens of KiB; a bigger *.json is not one
MAX_GRID_BYTES = 256 << 20  # the shipped grids are under 200 KiB
# A sweep waiting for points another sweep trains says so after this long (a lock held from
# another machine is never judged stale: only its own host can tell whether it still runs).
WAIT_NOTICE_SECONDS = 10.0
SMALL_DATA_LIMIT = 1000  # tasks with at most this many training examples also get a train eval


# ---------------------------------------------------------------------------------------------
# What to train
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One training run's settings; rank None means full fine-tuning (no adapter)."""

    task: str
    rank: int | None
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # leaf names, stored sorted
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    steps: int = DEFAULT_STEPS
    lr: float | None = None  # None: LORA_LR for LoRA, FULL_LR for full fine-tuning
    batch_size: int = 64
    seed: int = 0
    variant: str = "lora"  # the LoRA flavour (lab.VARIANTS): "lora" or "dora"
    init: str = "default"  # A, B initialisation (lab.INITS): "default" or "pissa"
    lr_ratio: float = 1.0  # LoRA+: B's learning rate over A's (1: plain LoRA)
    quant: str | None = None  # a 4-bit frozen base: "nf4", "fp4" or "int4" (None: fp32)
    replay: float = 0.0  # fraction of training examples from the pretraining mix (lab.forgetting)

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # normalising a frozen dataclass

        # Points that compare equal must share one cache key, which hashes the fields' JSON:
        # so whole numbers are plain ints (numpy's int64 from np.arange is not JSON) and
        # -0.0 becomes 0.0 (equal, but written "-0.0"); see `key`.
        for name in ("rank", "steps", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                put(name, int(value))
        put("replay", check_replay(self.replay) + 0.0)

        if self.quant is not None and (
            not isinstance(self.quant, str) or self.quant not in SCHEMES
        ):
            raise ValueError(
                f"quant={self.quant!r}: expected None (full-precision base) or one of "
                f"{', '.join(SCHEMES)}"
            )

        if not isinstance(self.task, str) or self.task not in FINETUNE_TASKS:
            raise ValueError(f"task={self.task!r}: expected one of {', '.join(FINETUNE_TASKS)}")
        check_count("steps", self.steps, MAX_STEPS)
        check_count("batch_size", self.batch_size)
        check_seed(self.seed)
        if not isinstance(self.rslora, bool):  # 'False' is a non-empty string, i.e. true
            raise TypeError(f"rslora={self.rslora!r}: expected True or False")
        if self.lr is None:
            put("lr", FULL_LR if self.rank is None else LORA_LR)
        check_lr(self.lr)
        put("lr", float(self.lr))  # > 0, so never -0.0
        if self.rank is None:
            # Full fine-tuning has no adapter: its adapter settings are fixed so that every
            # spelling of "full fine-tuning" is the same point (and the same cache file).
            if self.quant is not None:
                raise ValueError(
                    f"quant={self.quant!r} needs an adapter: a 4-bit base is frozen, so full "
                    "fine-tuning (rank None) cannot train it; give a rank"
                )
            for name, value in (
                ("alpha", 0.0),
                ("dropout", 0.0),
                ("targets", ()),
                ("rslora", False),
                ("variant", "lora"),
                ("init", "default"),
                ("lr_ratio", 1.0),
            ):
                put(name, value)
            return
        targets = normalize_targets(self.targets)
        try:  # validated by the one adapter config
            config = LoRAConfig(
                rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=targets,
                rslora=self.rslora, variant=self.variant, init=self.init, lr_ratio=self.lr_ratio,
            )  # fmt: skip
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (rank None means full fine-tuning)") from None
        if config.init == "pissa" and self.quant is not None:
            raise ValueError(
                f"init='pissa' with quant={self.quant!r}: PiSSA needs the full-precision W; "
                "use init='default' on a 4-bit base"
            )
        for name in ("alpha", "rslora", "lr_ratio"):
            put(name, getattr(config, name))
        put("dropout", config.dropout + 0.0)  # -0.0 + 0.0 is 0.0
        put("targets", tuple(sorted(set(targets))))

    @property
    def adapter(self) -> LoRAConfig:
        """The point's adapter as a LoRAConfig (LoRA points only)."""
        if self.is_full:
            raise ValueError("full fine-tuning has no adapter, so no LoRAConfig")
        return LoRAConfig(
            rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
            rslora=self.rslora, variant=self.variant, init=self.init, lr_ratio=self.lr_ratio,
        )  # fmt: skip

    @property
    def batchable(self) -> bool:
        """True if the batched engine trains this point exactly (else it trains alone)."""
        return not self.is_full and self.quant is None and batchable(self.adapter)

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
        return add_lora(model, self.adapter)

    def spec(self) -> AdapterSpec:
        """The point's adapter and optimizer settings, for lab.batched (LoRA points only)."""
        if self.is_full:
            raise ValueError("full fine-tuning has no adapter, so no AdapterSpec")
        if self.quant is not None:
            raise ValueError(f"{describe(self)}: a 4-bit base trains alone, not batched")
        return AdapterSpec(self.adapter, self.lr, self.seed)

    @property
    def is_full(self) -> bool:
        """True for full fine-tuning (no adapter)."""
        return self.rank is None

    def training_task(self) -> Task:
        """The task the run trains on: the point's task, with its replay mixed in (if any)."""
        return with_replay(get_task(self.task), self.replay)

    def to_dict(self) -> dict:
        """The fields as plain JSON values.

        The flavour fields (variant, init, lr_ratio, quant, replay) are left out at their
        defaults, so a plain LoRA point keeps the key (and cache file) it had before they existed.
        """
        data = {**dataclasses.asdict(self), "targets": list(self.targets)}
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


def normalize_targets(targets: object) -> tuple[str, ...]:
    """Layer names (or the short names q, k, v, o, up, down), sorted, as full names.

    A bare string is one name, never its characters; an unknown name is refused with the list.
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
    targets = normalize_targets(targets)
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


def describe(point: SweepPoint | SweepResult) -> str:
    """A short label: 'r8 α16 p0.1' (plus targets and scaling when not the defaults).

    Given a result, a diverged run is labelled as such: 'r8 α16 (diverged)'.
    """
    if isinstance(point, SweepResult):
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
    flavour = _flavour(point)
    if flavour != "LoRA":
        text += " " + flavour
    if point.replay:
        text += f" replay {point.replay:.0%}"
    return text


def _flavour(point: SweepPoint) -> str:
    """'LoRA', or the flavour's name: 'DoRA', 'PiSSA', 'LoRA+ λ16', 'NF4 base', combined."""
    parts = []
    if point.variant != "lora":
        parts.append({"dora": "DoRA"}.get(point.variant, point.variant))
    if point.init != "default":
        parts.append({"pissa": "PiSSA"}.get(point.init, point.init))
    if point.lr_ratio != 1:
        parts.append(f"LoRA+ λ{point.lr_ratio:g}")
    if point.quant is not None:
        parts.append(f"{point.quant.upper()} base")
    return " ".join(parts) or "LoRA"


# ---------------------------------------------------------------------------------------------
# What a run measured
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """What training one SweepPoint measured (JSON round-trip with to_dict/from_dict)."""

    point: SweepPoint
    losses: list[float]  # training loss per step
    heldout: dict[str, float]  # loss, accuracy (exact match), n
    train_eval: dict[str, float] | None  # same on the train split; small-data tasks only
    trainable_parameters: int
    total_parameters: int
    memory: dict | None  # MemoryBreakdown.to_dict() of the first step
    wall_seconds: float
    tokens_per_second: float
    device: str
    date: str
    extra: dict = field(default_factory=dict)
    # The loss became nan/inf: losses stop before that step, heldout's loss is nan, and
    # extra["diverged"] holds lab.train's message. Summaries leave diverged results out.
    diverged: bool = False
    # The pretraining skills after fine-tuning, held out: {"copy": {"accuracy", "loss"}, ...}
    # (lab.forgetting). None for a diverged run and for results cached before it was measured.
    forgetting: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-friendly dict (strict JSON: nan is written as null), tagged with the key."""
        out = dataclasses.asdict(self)
        out["point"] = self.point.to_dict()
        out["heldout"] = {k: _json_number(v) for k, v in self.heldout.items()}
        if self.train_eval is not None:
            out["train_eval"] = {k: _json_number(v) for k, v in self.train_eval.items()}
        out["losses"] = [_json_number(x) for x in self.losses]
        return {"format": FORMAT, "key": self.point.key, **out}

    @classmethod
    def from_dict(cls, data: dict) -> SweepResult:
        """Inverse of to_dict; raises ValueError if the data is not a valid result."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} result")
        names = [f.name for f in dataclasses.fields(cls)]
        required = {"point", "losses", "heldout", "trainable_parameters", "total_parameters"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"malformed result: missing {', '.join(missing)}")
        try:
            fields = {n: data[n] for n in names if n in data}
            fields["point"] = SweepPoint.from_dict(data["point"])
            fields.setdefault("train_eval", None)
            fields.setdefault("memory", None)
            for name, default in (("wall_seconds", 0.0), ("tokens_per_second", 0.0),
                                  ("device", "?"), ("date", "")):  # fmt: skip
                fields.setdefault(name, default)
            result = cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed result: {exc}") from exc
        problem = _result_problem(result)
        if problem:
            raise ValueError(f"malformed result: {problem}")
        if result.diverged:  # strict JSON wrote its nan as null
            result.heldout = {k: math.nan if v is None else v for k, v in result.heldout.items()}
        return result


def _json_number(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_number(value: object, finite: bool = True) -> bool:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return ok and (not finite or math.isfinite(value))


def _result_problem(r: SweepResult) -> str | None:
    """What is wrong with a result read from disk (None: nothing)."""
    if not isinstance(r.diverged, bool):
        return f"diverged={r.diverged!r} is not true/false"
    if not isinstance(r.losses, list) or not all(_is_number(x) for x in r.losses):
        return "losses must be a list of finite numbers"
    if len(r.losses) > r.point.steps:  # one loss per step, fewer if it diverged
        return f"{len(r.losses):,} losses for a run of {r.point.steps:,} steps"
    for name in ("heldout", "train_eval"):
        value = getattr(r, name)
        if value is None and name == "train_eval":
            continue
        if not isinstance(value, dict) or not {"loss", "accuracy"} <= set(value):
            return f"{name} must be a dict with loss and accuracy"
        if r.diverged:
            if not (value["loss"] is None or _is_number(value["loss"], finite=False)):
                return f"{name} loss {value['loss']!r} is not a number"
        elif not all(_is_number(value[k]) for k in ("loss", "accuracy")):
            return f"{name} loss/accuracy {value['loss']!r}/{value['accuracy']!r} not finite"
        if not (_is_number(value["accuracy"]) and 0 <= value["accuracy"] <= 1):
            return f"{name} accuracy {value['accuracy']!r} is not in [0, 1]"
        if _is_number(value["loss"]) and value["loss"] < 0:  # a cross-entropy is never negative
            return f"{name} loss {value['loss']!r} is negative"
        n = value.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return f"{name} n={n!r} is not a count of examples"
    for name in ("trainable_parameters", "total_parameters"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name}={value!r} is not a count"
    if r.trainable_parameters > r.total_parameters:
        return f"{r.trainable_parameters:,} trainable of only {r.total_parameters:,} parameters"
    for name in ("wall_seconds", "tokens_per_second"):
        if not (_is_number(getattr(r, name)) and getattr(r, name) >= 0):
            return f"{name}={getattr(r, name)!r} is not a finite number >= 0"
    if r.memory is not None:
        if not isinstance(r.memory, dict):
            return "memory must be a dict or null"
        for name in (*MEMORY_CATEGORIES, "peak", "total"):  # what the memory plots add up
            if name in r.memory and not (_is_number(r.memory[name]) and r.memory[name] >= 0):
                return f"memory[{name!r}]={r.memory[name]!r} is not a byte count"
    if r.forgetting is not None:
        if not isinstance(r.forgetting, dict) or set(r.forgetting) != set(PRETRAIN_TASKS):
            return f"forgetting must be null or a dict of the skills {', '.join(PRETRAIN_TASKS)}"
        for name, value in r.forgetting.items():
            if not isinstance(value, dict) or set(value) != {"accuracy", "loss"}:
                return f"forgetting[{name!r}] must be a dict with accuracy and loss"
            if not (_is_number(value["accuracy"]) and 0 <= value["accuracy"] <= 1):
                return f"forgetting[{name!r}] accuracy {value['accuracy']!r} is not in [0, 1]"
            if not (_is_number(value["loss"]) and value["loss"] >= 0):
                return f"forgetting[{name!r}] loss {value['loss']!r} is not a finite loss >= 0"
    if not isinstance(r.extra, dict):
        return "extra must be a dict"
    if not isinstance(r.device, str) or not isinstance(r.date, str):
        return "device and date must be strings"
    return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def group_key(point: SweepPoint) -> tuple:
    """Points with equal keys can train together in one batched run (LoRA points only)."""
    return (point.task, point.steps, point.batch_size, point.replay)


def _first_step_memory(point: SweepPoint, base: ToyTransformer, device: torch.device) -> dict:
    """The memory of the point's first training step, measured as run_point measures it.

    A scratch copy of `base` with a fresh adapter runs one tracked step on the same first
    batch the point trains on; the trained models are not touched.
    """
    task = point.training_task()
    with torch.random.fork_rng(devices=[]):
        model = copy.deepcopy(base).to(device)
        point.prepare(model)
        model.train()
        idx = torch.randint(task.n_train, (point.batch_size,),
                            generator=torch.Generator().manual_seed(point.seed))  # fmt: skip
        optimizer = make_optimizer(model, point.lr)
        x, y = task.train_inputs[idx].to(device), task.train_targets[idx].to(device)
        return measure_step_memory(model, x, y, optimizer, autocast_dtype(device)).to_dict()


def run_group(
    points: Sequence[SweepPoint],
    device: torch.device | str | None = None,
    progress: bool = True,
    max_configs: int | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Train LoRA points that share task, steps and batch size together (lab.batched).

    Each point trains exactly as `run_point` would train it alone (same data order, adapter
    initialisation, dropout masks and optimizer; see tests/test_batched.py) and is measured the
    same way: held-out (and, for small data sets, train) evaluation and the first step's memory.
    A group larger than `max_configs` trains in chunks (default `lab.batched.default_max_configs`:
    what fits in half the free memory, and on a CPU about 128 sequences per step, where it ran
    fastest); if a chunk still runs out of memory it is split in half and retried. Each result's
    wall_seconds is its share of its chunk's training time; extra["batched"] says how it ran.
    """
    points = list(dict.fromkeys(points))
    if not points:
        return []
    full = [p for p in points if p.is_full]
    if full:
        raise ValueError(f"{describe(full[0])} has no adapter to batch; train it with run_point")
    alone = [p for p in points if not p.batchable]
    if alone:
        raise ValueError(
            f"{describe(alone[0])} has no exact batched form; train it with run_point "
            "(sweep() does that for you)"
        )
    keys = {group_key(p) for p in points}
    if len(keys) > 1:
        raise ValueError(
            f"points differ in (task, steps, batch_size, replay): {sorted(keys)}; "
            "a batched group shares all four (sweep() groups them for you)"
        )
    if max_configs is not None:
        check_count("max_configs", max_configs)
    device = torch.device(device) if device is not None else default_device()
    base = load_base_model("cpu")
    if max_configs is None:
        max_configs = chunk_size(points, device)
    results: list[SweepResult] = []
    pending = [points[i : i + max_configs] for i in range(0, len(points), max_configs)]
    while pending:
        chunk = pending.pop(0)
        try:
            results += _run_chunk(chunk, base, device, progress, on_result)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if len(chunk) == 1 or not _out_of_memory(exc):
                raise
            half = len(chunk) // 2
            warnings.warn(
                f"{len(chunk)} configurations did not fit in memory; retrying as "
                f"{half} + {len(chunk) - half}",
                stacklevel=2,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pending[:0] = [chunk[:half], chunk[half:]]
    return results


def _out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's "can't allocate memory"."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def _run_chunk(
    chunk: list[SweepPoint],
    base: ToyTransformer,
    device: torch.device,
    progress: bool,
    on_result: Callable[[SweepResult], None] | None,
) -> list[SweepResult]:
    first = chunk[0]
    task = get_task(first.task)
    specs = [p.spec() for p in chunk]
    run = train_batched(
        base, first.training_task(), specs, first.steps, first.batch_size, device, progress
    )
    share = run.wall_seconds / len(chunk)
    tokens = first.steps * first.batch_size * task.train_inputs.shape[1]
    results = []
    for k, (point, model) in enumerate(zip(chunk, run.models, strict=True)):
        counts = count_parameters(model)
        small = task.n_train <= SMALL_DATA_LIMIT
        if run.diverged and run.diverged[k]:
            losses = run.losses[k].tolist()
            first = next((i for i, x in enumerate(losses) if not math.isfinite(x)), len(losses))
            result = _diverged_result(point, task, counts, losses[:first], run.diverged[k],
                                      str(device))  # fmt: skip
            results.append(result)
            if on_result is not None:
                on_result(result)
            continue
        result = SweepResult(
            point=point,
            losses=[float(x) for x in run.losses[k]],
            heldout=task.evaluate(model),
            train_eval=task.evaluate(model, split="train") if small else None,
            forgetting=forgetting(model),
            trainable_parameters=counts.trainable,
            total_parameters=counts.total,
            memory=_first_step_memory(point, base, device),
            wall_seconds=share,
            tokens_per_second=tokens / share,
            device=str(device),
            date=_now(),
            extra={"batched": {"configs": len(chunk), "chunk_seconds": run.wall_seconds}},
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _diverged_result(point, task, counts, losses, message: str, device: str) -> SweepResult:
    """The record of a run stopped because its loss became nan/inf."""
    warnings.warn(f"{describe(point)} on {point.task}: {message}", stacklevel=3)
    n = len(task.heldout_inputs)
    return SweepResult(
        point=point,
        losses=[float(x) for x in losses if math.isfinite(x)],
        heldout={"loss": math.nan, "accuracy": 0.0, "n": n},
        train_eval=None,
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        memory=None,
        wall_seconds=0.0,
        tokens_per_second=0.0,
        device=device,
        date=_now(),
        extra={"diverged": message},
        diverged=True,
    )


def run_point(
    point: SweepPoint, device: torch.device | str | None = None, progress: bool = True
) -> SweepResult:
    """Train one point from the shipped base and measure it (no caching here)."""
    task = get_task(point.task)
    model = load_base_model(device)
    point.prepare(model)  # seeds LoRA's A init and adapter dropout; 4-bit base if asked
    counts = count_parameters(model)
    try:
        run = train(model, point.training_task(), point.steps, point.lr, point.batch_size,
                    point.seed, device, progress)  # fmt: skip
    except TrainingDiverged as exc:
        return _diverged_result(point, task, counts, exc.losses, str(exc), str(device or ""))
    # Overfitting only shows on a small train set; evaluating 20,000 examples would cost more
    # than it tells.
    train_eval = task.evaluate(model, split="train") if task.n_train <= SMALL_DATA_LIMIT else None
    return SweepResult(
        point=point,
        losses=[float(x) for x in run.losses],
        heldout=dict(run.heldout),  # the task's own held-out split (replay leaves it alone)
        train_eval=train_eval,
        forgetting=forgetting(model),
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        memory=None if run.memory is None else run.memory.to_dict(),
        wall_seconds=run.wall_seconds,
        tokens_per_second=run.tokens_per_second,
        device=run.device,
        date=_now(),
    )


# ---------------------------------------------------------------------------------------------
# The cache: one JSON file per point
# ---------------------------------------------------------------------------------------------


CACHE_VAR = "LORA_LAB_CACHE"


def default_cache_dir() -> Path:
    """$LORA_LAB_CACHE if set, else the user's cache folder (~/.cache/lora-lab/sweeps).

    An empty (or blank) $LORA_LAB_CACHE counts as unset, as the shell's `LORA_LAB_CACHE=`
    means: never the current folder.
    """
    value = os.environ.get(CACHE_VAR, "")
    if value.strip():
        return _expand(value, f"${CACHE_VAR}")
    return user_cache_root() / "sweeps"


def _expand(text: str, what: str) -> Path:
    """Path(text) with a leading ~ or ~user expanded; ValueError if that home is unknown."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise ValueError(
            f"{what} {text!r}: {text.split('/')[0]!r} names no home folder here"
        ) from None


def cache_dir(directory: str | os.PathLike | None) -> Path:
    """The sweep cache folder `directory` names (None: default_cache_dir()), `~` expanded.

    An empty or blank name is refused (ValueError): Path("") is the current folder, where a
    sweep's files do not belong.
    """
    if directory is None:
        return default_cache_dir()
    text = os.fspath(directory) if isinstance(directory, str | os.PathLike) else None
    if not isinstance(text, str):
        raise TypeError(
            f"cache folder {directory!r}: expected a path (str or Path), or None for the default"
        )
    if not text.strip():
        raise ValueError(
            f"cache folder {text!r} is empty; name a folder, or give None for the default "
            f"(${CACHE_VAR}, else {user_cache_root() / 'sweeps'})"
        )
    if "\0" in text:
        raise ValueError(f"cache folder {text!r} holds a NUL character, which no path may")
    return _expand(text, "cache folder")


TORCH_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"


def keep_torch_cache_at_home() -> str | None:
    """Point torch's compiler cache into the user's cache folder, unless it is chosen already.

    torch makes that folder on the first optimizer step even when nothing is compiled, by
    default as /tmp/torchinductor_<user>: on a shared host one folder per student left in /tmp,
    and a file another user puts at that name stops training. `import lab` sets
    $TORCHINDUCTOR_CACHE_DIR to user_cache_root()/torchinductor instead, unless the variable is
    set or that folder could not be made (no writable home: torch's default is kept). Returns
    the folder chosen, or None when the lab left the variable alone.
    """
    if os.environ.get(TORCH_CACHE_VAR):
        return None
    try:
        target = user_cache_root() / "torchinductor"
    except RuntimeError:  # no home to be found
        return None
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return None
    os.environ[TORCH_CACHE_VAR] = str(target)
    return str(target)


class SweepCacheError(OSError):
    """The cache folder cannot be used (not a folder, not writable, disk full)."""


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def check_writable_dir(d: Path, what: str, hint: str, probe_bytes: int = 64 << 10) -> None:
    """SweepCacheError unless files can be written in folder `d` (created if missing)."""
    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        if d.is_symlink() and not d.exists():
            raise SweepCacheError(
                f"{what} {d} is a symlink to {os.readlink(d)}, which does not exist or loops; "
                f"{hint}"
            ) from None
        raise SweepCacheError(f"{what} {d} is a file, not a folder; {hint}") from None
    except OSError as exc:
        raise SweepCacheError(f"cannot create {what} {d}: {exc.strerror}; {hint}") from None
    if not d.is_dir():
        raise SweepCacheError(f"{what} {d} is not a folder; {hint}")
    probe = d / f".probe-{os.getpid()}-{time.monotonic_ns()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * probe_bytes)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise SweepCacheError(f"cannot write to {what} {d}: {why}; {hint}") from None


class SweepCache:
    """Results on disk, one `<key>.json` per point, written atomically; survives restarts.

    While a sweep trains a point it holds `<key>.lock` (created exclusively, holding its pid and
    host), so a second sweep into the same folder waits for that point instead of training it
    again. A lock whose process is gone is stale and taken over.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = cache_dir(directory)
        self.unsaved: list[SweepPoint] = []  # points of the last sweep() whose write failed
        # Parsed files by path, reused while (mtime, size) are unchanged: redraws stay fast.
        self._memo: dict[Path, tuple[tuple[int, int], SweepResult | None]] = {}

    def __repr__(self) -> str:
        return f"SweepCache({str(self.directory)!r})"

    def path(self, point: SweepPoint) -> Path:
        """Where the point's result lives (whether or not it exists)."""
        return self.directory / f"{point.key}.json"

    def _read(self, path: Path) -> SweepResult | None:
        """The result in `path`, or None (with a warning) if it is unreadable or not a result."""
        try:
            info = path.stat()
        except OSError:
            return None
        stamp = (info.st_mtime_ns, info.st_size)
        if path in self._memo and self._memo[path][0] == stamp:
            return self._memo[path][1]
        try:
            # A FIFO would block the read for ever and /dev/zero never end: only a regular
            # file is opened, and no more of it than a result can take.
            regular_file(path, "sweep cache file")
            with open(path, "rb") as f:
                raw = f.read(MAX_RESULT_BYTES + 1)
            if len(raw) > MAX_RESULT_BYTES:
                raise ValueError(f"over {MAX_RESULT_BYTES:,} bytes, more than a result takes")
            data = json.loads(raw.decode("utf-8"))
            result = SweepResult.from_dict(data)
            if result.point.key != path.stem:
                if data.get("key") != path.stem:  # copied or renamed from another point's
                    raise ValueError(f"it holds the result of {describe(result.point)}")
                # Written by another format version or for another base model: stale, not
                # corrupt; it is never looked up, so skip it quietly.
                result = None
        except (OSError, ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
            why = why.removeprefix(f"sweep cache file {path} ")
            warnings.warn(
                f"ignoring unreadable sweep cache file {path} (it will be retrained): {why}",
                stacklevel=3,
            )
            result = None
        self._memo[path] = (stamp, result)
        return result

    def get(self, point: SweepPoint) -> SweepResult | None:
        """The cached result of `point`, or None."""
        return self._read(self.path(point))

    def __contains__(self, point: object) -> bool:
        return isinstance(point, SweepPoint) and self.get(point) is not None

    def put(self, result: SweepResult) -> Path:
        """Store a result (replacing any earlier one for the same point); returns its path."""
        data = json.dumps(result.to_dict(), indent=1, allow_nan=False).encode("utf-8")
        path = self.path(result.point)
        remove_non_file(path)
        return atomic_write_bytes(path, data)

    def check_writable(self, probe_bytes: int = 64 << 10) -> None:
        """SweepCacheError unless results can be written here (creating the folder if needed).

        Writes and removes a probe file about the size of a few results, so a read-only folder,
        a file in the folder's place or a full disk are found before anything is trained.
        """
        check_writable_dir(
            self.directory,
            "sweep cache",
            "choose another folder with LORA_LAB_CACHE or --cache",
            probe_bytes,
        )

    def _lock_path(self, point: SweepPoint) -> Path:
        return self.directory / f"{point.key}.lock"

    def claim(self, point: SweepPoint) -> bool:
        """Take the point's lock (True), or False while another live process holds it.

        A stale lock (its process gone, or junk) is taken over; SweepCacheError if it cannot
        be removed (a folder in its place).
        """
        path = self._lock_path(point)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._holder_alive(path):
                    return False
                try:
                    path.unlink(missing_ok=True)  # stale: its process is gone
                except OSError as exc:
                    raise SweepCacheError(
                        f"cannot take over the stale lock {path} ({exc.strerror}); remove it, "
                        "or choose another folder with LORA_LAB_CACHE or --cache"
                    ) from None
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            return True
        return False

    def release(self, point: SweepPoint) -> None:
        """Drop the point's lock if this process holds it."""
        path = self._lock_path(point)
        if self._holder(path) == (os.getpid(), socket.gethostname()):
            path.unlink(missing_ok=True)

    def claimed(self, point: SweepPoint) -> bool:
        """True while another live process holds the point's lock."""
        path = self._lock_path(point)
        return (
            os.path.lexists(path)
            and self._holder(path) != (os.getpid(), socket.gethostname())
            and (self._holder_alive(path))
        )

    def holder(self, point: SweepPoint) -> str:
        """Who holds the point's lock, in words ('pid 123 on host h'), for a waiting sweep."""
        holder = self._holder(self._lock_path(point))
        return "an unreadable lock" if holder is None else f"pid {holder[0]} on {holder[1]}"

    @staticmethod
    def _holder(path: Path) -> tuple[int, str] | None:
        """(pid, host) in a lock this lab wrote; None for anything else (junk, a FIFO, ...)."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a FIFO or a device
                return None
            with open(path, "rb") as f:
                pid, host = f.read(256).decode("utf-8").split()[:2]
            pid = int(pid)
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        # 0 and negative pids name process groups (os.kill(0, 0) always succeeds): junk.
        return (pid, host) if 0 < pid < 2**31 else None

    def _holder_alive(self, path: Path) -> bool:
        holder = self._holder(path)
        if holder is None:  # empty: being written this instant, or junk once a minute old
            try:
                info = os.lstat(path)
            except OSError:
                return False
            fresh = time.time() - info.st_mtime < 60
            return stat.S_ISREG(info.st_mode) and info.st_size == 0 and fresh
        pid, host = holder
        return host != socket.gethostname() or _pid_alive(pid)

    def results(self, **filters: object) -> list[SweepResult]:
        """Every valid cached result whose point matches `filters` (field=value), by file name."""
        if not self.directory.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.directory.glob("*.json")))
        return select([r for r in found if r is not None], **filters)

    def __len__(self) -> int:
        return len(self.results())

    def seed_from(self, path: str | os.PathLike = DEFAULT_GRID_PATH) -> int:
        """Copy a grid file's results into the cache, never overwriting; returns how many."""
        added = 0
        for result in load_grid_file(path):
            if result.point not in self:
                self.put(result)
                added += 1
        return added


def write_grid_file(
    path: str | os.PathLike, results: Sequence[SweepResult], description: str, **header: object
) -> Path:
    """Write results as a grid file (load_grid_file's input), atomically; returns the path.

    The header holds the format, `description`, the newest result's date, the machine, the base
    model's fingerprint, the summed training seconds and any `header` fields; then one result
    per line (losses rounded to 3 significant digits), so a regenerated grid diffs line by line.
    """
    results = list(results)
    if not results:
        raise ValueError("no results to write: a grid file holds at least one")
    rows = []
    for r in results:
        row = r.to_dict()
        row["losses"] = [float(f"{x:.3g}") for x in r.losses]
        rows.append(row)
    head = {
        "format": FORMAT,
        "description": description,
        "date": max(r.date for r in results),  # when the newest run was measured
        "machine": grid_machine(),
        "base": base_fingerprint(),
        **header,
        # training loops only, summed over points (a resumed run still reports the whole grid)
        "train_seconds": round(sum(r.wall_seconds for r in results), 1),
    }
    text = json.dumps(head, indent=1)[:-2] + ',\n "results": [\n'
    text += ",\n".join(json.dumps(row, separators=(",", ":"), allow_nan=False) for row in rows)
    text += "\n ]\n}\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, text.encode("utf-8"))  # never a truncated grid file


def grid_machine() -> dict:
    """What a grid file's results were measured on (its "machine" header, read by notebook 05)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def load_grid_file(path: str | os.PathLike = DEFAULT_GRID_PATH) -> list[SweepResult]:
    """The results in a grid file (written by scripts/make_default_grid.py and its kin).

    A file that cannot be read or is not a grid file raises ValueError naming it; an entry
    that is not a valid result is skipped with a warning (the others are kept).
    """
    try:
        regular_file(path, "grid file")  # never a FIFO (blocks) or /dev/zero (never ends)
        with open(path, "rb") as f:
            raw = f.read(MAX_GRID_BYTES + 1)
        if len(raw) > MAX_GRID_BYTES:
            raise ValueError(f"over {MAX_GRID_BYTES:,} bytes, more than a grid file takes")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        why = why.removeprefix(f"grid file {path} ")
        raise ValueError(f"{path}: cannot read the grid file ({why})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if data.get("base") != base_fingerprint():
        warnings.warn(
            f"{path} was computed on another base model ({data.get('base')}, this one is "
            f"{base_fingerprint()}); rebuild it with its script "
            f"(scripts/make_{Path(path).stem}.py)",
            stacklevel=2,
        )
        return []
    items = data.get("results")
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'results' is {type(items).__name__}, expected a list")
    out, bad = [], []
    for i, item in enumerate(items):
        try:
            out.append(SweepResult.from_dict(item))
        except (ValueError, TypeError) as exc:
            bad.append(f"#{i}: {str(exc)[:120]}")
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} malformed {'entry' if len(bad) == 1 else 'entries'} "
            f"({bad[0]})",
            stacklevel=2,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Training a grid
# ---------------------------------------------------------------------------------------------


def sweep(
    points: Iterable[SweepPoint],
    cache: SweepCache | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    *,
    run_fn: Callable[..., SweepResult] | None = None,
    on_result: Callable[[SweepResult], None] | None = None,
    batched: bool = True,
    max_configs: int | None = None,
    executor: str | RaySession = "local",
    address: str | None = None,
) -> list[SweepResult]:
    """Results for `points` in order: cached ones are read, the others trained and cached.

    By default the LoRA points still to train are grouped by (task, steps, batch_size) and each
    group trains in one batched run (`run_group`; `max_configs` caps a chunk); full fine-tuning
    points train one by one with `run_point`. `batched=False` trains every point alone.
    `cache` defaults to `SweepCache()` (the user's cache folder or $LORA_LAB_CACHE). A `run_fn`
    replaces run_point and turns batching off: it is called as run_fn(point, device=...,
    progress=...), so tests and widgets can pass a fake trainer. `on_result` is called after
    each newly trained point.

    Before anything trains, the cache folder is checked (SweepCacheError if it cannot be
    written) and each point's memory estimated (MemoryError if it cannot fit). A point another
    sweep is training into the same cache is waited for, not trained twice. A result whose
    write fails later is still returned, with a warning (its points in `cache.unsaved`). A run
    whose loss became nan/inf is returned and cached as diverged. What a `run_fn` returns is
    kept only if it is a valid SweepResult of the point it was asked for: anything else (None,
    another point's result, NaN where a number must be) is never cached, its point fails with
    the reason, and SweepFailed is raised at the end, after every other point is cached.

    `executor="ray"` trains each unit of `plan_chunks` (a batched chunk, or one point) as a Ray
    task (lab.executors): on a local Ray started for the sweep, or on the cluster at `address`
    ('HOST:PORT' of `ray start --head`); a `lab.executors.RaySession` gives more control
    (workers, temp dir, retries). Each task asks for one GPU when the cluster has GPUs (device
    None or 'cuda'), else one CPU; a worker chooses the chunk size (chunk_size on its device:
    its memory, its calibration). This process stays the only writer of the cache: each result
    is validated and cached as its task returns, so an interrupted sweep keeps every finished
    point. A task whose worker dies is rerun by Ray; one that fails for good raises SweepFailed
    at the end, naming each of its points with the error, after every other point is cached.
    """
    cache = SweepCache() if cache is None else cache
    if not isinstance(cache, SweepCache):
        raise TypeError(f"cache must be a SweepCache or None, got {type(cache).__name__}")
    if isinstance(points, SweepPoint):
        points = [points]
    points = list(dict.fromkeys(points))
    wrong = [p for p in points if not isinstance(p, SweepPoint)]
    if wrong:
        raise TypeError(f"points must be SweepPoints (lab.grid builds them), got {wrong[0]!r}")
    if max_configs is not None:
        check_count("max_configs", max_configs)
    on_ray = isinstance(executor, RaySession) or check_executor(executor) == "ray"
    if address is not None and not (on_ray and isinstance(executor, str)):
        raise ValueError(f"address={address!r} is for executor='ray' (a RaySession has its own)")
    # On Ray the device is the workers' (a GPU per task, or CPUs), not necessarily one here.
    device = ray_device(device) if on_ray else resolve_device(device)
    results: dict[SweepPoint, SweepResult | None] = {p: cache.get(p) for p in points}
    todo = [p for p in points if results[p] is None]
    cache.unsaved = []
    if todo:
        cache.check_writable()  # before anything is trained
        config = load_base_config()
        for p in [] if on_ray else todo:  # Ray workers check their own device's memory
            what = f"{describe(p)} with batch_size={p.batch_size:,} for steps={p.steps:,}"
            check_fits(run_bytes(config, p.batch_size, p.steps), device, what)
        if not on_ray:  # trains here: the lab's thread rule, before chunk sizes are measured
            threads.training_threads()
    bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress or not todo)
    held: set[SweepPoint] = set()
    errors: list[OSError] = []
    failures: dict[SweepPoint, str] = {}
    stack = contextlib.ExitStack()
    ray_run: RaySession | None = None

    def done(result: SweepResult, point: SweepPoint | None = None) -> None:
        """Cache a newly trained result; one that is not a valid result of `point` fails it."""
        point = result.point if point is None and isinstance(result, SweepResult) else point
        problem = _refusal(result, point)
        if problem is not None:
            failures[point] = problem
            cache.release(point)
            held.discard(point)
            tqdm.write(f"failed: {describe(point)}: {problem}")
            return
        results[result.point] = result
        try:
            cache.put(result)
        except OSError as exc:  # kept in memory and returned; reported at the end
            cache.unsaved.append(result.point)
            errors.append(exc)
        finally:
            cache.release(result.point)
            held.discard(result.point)
        bar.update(1)
        if on_result is not None:
            on_result(result)

    def train_these(mine: list[SweepPoint]) -> None:
        nonlocal ray_run
        if on_ray:
            if ray_run is None:
                session = executor if isinstance(executor, RaySession) else RaySession(address)
                ray_run = stack.enter_context(session)
            failures.update(_train_on_ray(ray_run, mine, device, run_fn, batched, max_configs,
                                          bar, done))  # fmt: skip
            for point in failures:
                cache.release(point)
                held.discard(point)
            return
        if run_fn is not None or not batched:
            fn = run_point if run_fn is None else run_fn
            for point in mine:
                done(fn(point, device=device, progress=progress), point)
            return
        _say_alone(mine)
        for unit in plan_chunks(mine, device, max_configs):
            run_chunk(unit, device, progress, on_result=done)

    try:
        pending = todo
        while pending:
            mine, waiting = [], []
            for point in pending:
                if not cache.claim(point):
                    waiting.append(point)
                    continue
                held.add(point)
                found = cache.get(point)  # finished by another sweep just before the claim?
                if found is None:
                    mine.append(point)
                else:
                    results[point] = found
                    cache.release(point)
                    held.discard(point)
                    bar.update(1)
            train_these(mine)
            since = time.monotonic()
            while waiting and all(cache.claimed(p) for p in waiting):
                time.sleep(0.5)  # another sweep is training these: wait for its results
                if since is not None and time.monotonic() - since > WAIT_NOTICE_SECONDS:
                    since = None  # said once: a lock whose sweep died elsewhere stays
                    tqdm.write(
                        f"waiting for {_plural(len(waiting), 'point')} that another sweep is "
                        f"training into {cache.directory} ({describe(waiting[0])}: "
                        f"{cache.holder(waiting[0])}); if that sweep is gone, delete "
                        f"{cache.directory / '*.lock'} and run again"
                    )
            pending = []
            for point in waiting:
                found = cache.get(point)
                if found is not None:
                    results[point] = found
                    bar.update(1)
                else:
                    pending.append(point)
    finally:
        stack.close()  # a local Ray started for this sweep stops here
        for point in list(held):
            cache.release(point)
        bar.close()
        if errors:
            n = len(cache.unsaved)
            warnings.warn(
                f"could not save {_plural(n, 'result')} to the sweep cache {cache.directory} "
                f"({errors[0].strerror or errors[0]}); {'it is' if n == 1 else 'they are'} "
                "returned but not cached",
                stacklevel=2,
            )
    if failures:
        raise SweepFailed(failures, [results[p] for p in points])
    return [results[p] for p in points]


def _refusal(result: object, point: SweepPoint) -> str | None:
    """Why `result` cannot be kept as the result of `point` (None: it can).

    A run_fn is the caller's code: it may return None, another type, another point's result,
    or a result with NaN or impossible numbers. Only what would read back from the cache as
    this point's valid result is kept.
    """
    if not isinstance(result, SweepResult):
        return f"the trainer returned {type(result).__name__}, not a SweepResult"
    if not isinstance(result.point, SweepPoint):
        return f"the trainer returned a result whose point is {type(result.point).__name__}"
    if result.point != point:
        return f"the trainer returned the result of another point ({describe(result.point)})"
    try:
        text = json.dumps(result.to_dict(), allow_nan=False)
        SweepResult.from_dict(json.loads(text))
    except (AttributeError, TypeError, ValueError, RecursionError) as exc:
        return f"the trainer returned an invalid result ({str(exc)[:160]})"
    return None


class SweepFailed(RuntimeError):
    """Points that failed for good (on Ray workers, or a trainer's invalid result); every
    other point was trained and cached.

    `failures` maps each failed point to its error; `results` is sweep()'s list with None
    for the failed points.
    """

    def __init__(self, failures: dict[SweepPoint, str], results: list[SweepResult | None]):
        self.failures, self.results = dict(failures), list(results)
        kept = sum(r is not None for r in results)
        first = next(iter(self.failures.items()))
        super().__init__(
            f"{_plural(len(failures), 'point')} failed ({describe(first[0])}: {first[1]}); "
            f"{kept:,} of {len(results):,} trained and kept"
        )


def ray_device(device: object) -> torch.device | None:
    """The device Ray tasks should use: None (a GPU each if there are any, else CPUs), cpu, cuda.

    Not checked against this machine: the workers' GPUs need not be here.
    """
    if device is None:
        return None
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device={device!r}: expected 'cpu', 'cuda' or None")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device; try 'cpu' or 'cuda'") from None
    if parsed.type not in ("cpu", "cuda") or parsed.index not in (None, 0):
        raise ValueError(
            f"device={device!r}: Ray tasks train on 'cpu' or 'cuda' (one GPU each, which Ray "
            "chooses)"
        )
    return torch.device(parsed.type)


def _remote_chunk_size(items: list[dict], device: str) -> int:
    """A Ray task's work: chunk_size on this worker, for its device, threads and memory."""
    return chunk_size([SweepPoint.from_dict(d) for d in items], device)


def _remote_unit(items: list[dict], device: str, run_fn: Callable | None) -> dict:
    """A Ray task's work: train one unit on this worker, return the results as dicts."""
    unit = [SweepPoint.from_dict(d) for d in items]
    if run_fn is not None:
        results = [run_fn(p, device=device, progress=False) for p in unit]
        for point, result in zip(unit, results, strict=True):
            problem = _refusal(result, point)
            if problem is not None:
                raise TypeError(problem)
    else:
        results = run_chunk(unit, device, progress=False)
    return {"base": base_fingerprint(), "results": [r.to_dict() for r in results]}


def _train_on_ray(
    session: RaySession,
    mine: list[SweepPoint],
    device: torch.device | None,
    run_fn: Callable | None,
    batched: bool,
    max_configs: int | None,
    bar,
    done: Callable[[SweepResult], None],
) -> dict[SweepPoint, str]:
    """Train `mine` as Ray tasks, one per unit; cache each result as it comes; failures back."""
    kind = session.device_kind(device)
    if run_fn is not None or not batched:
        units = [[p] for p in mine]
    else:
        _say_alone(mine)

        def size(group: list[SweepPoint]) -> int:  # chosen by a worker, for its own device
            try:
                return int(session.call(_remote_chunk_size, [p.to_dict() for p in group], kind))
            except session.ray.exceptions.RayError as exc:
                # Planning only chooses how many points share a step, never their numbers: fall
                # back to the CPU rule (a worker still trims a unit to its memory) and let the
                # training tasks succeed, or fail and be reported by point.
                n = max(1, CPU_ROWS_PER_STEP // group[0].batch_size)
                tqdm.write(
                    f"could not ask a worker for the chunk size ({task_error(exc)}); "
                    f"training {n} per task"
                )
                return n

        units = plan_chunks(mine, kind, max_configs, size=size)
    slots = session.slots(kind)
    left = len(units)
    devices = f"{slots} {'GPU' if kind == 'cuda' else 'CPU'}{'s' * (slots != 1)}"

    def show() -> None:
        busy = min(left, slots)
        bar.set_postfix_str(f"{busy} worker{'s' * (busy != 1)} busy, {devices}", refresh=True)

    failures: dict[SweepPoint, str] = {}
    ours = base_fingerprint()
    jobs = session.map(_remote_unit, [[p.to_dict() for p in u] for u in units], kind, (run_fn,),
                       on_start=lambda n: show())  # fmt: skip
    with contextlib.closing(jobs):  # leaving early (Ctrl-C) cancels what is still out
        for index, value, where, error in jobs:
            left -= 1
            unit = units[index]
            got: list[SweepResult] = []
            if error is None:
                error = _check_returned(value, unit, ours, where)
            if error is None:
                got = [SweepResult.from_dict(d) for d in value["results"]]
                for result in got:
                    result.extra["worker"] = {"host": where.host, "device": where.device}
                    done(result)
            else:
                for point in unit:
                    failures[point] = error
                tqdm.write(f"failed: {', '.join(describe(p) for p in unit)}: {error}")
            show()
    return failures


def _check_returned(value: object, unit: list[SweepPoint], ours: str, where) -> str | None:
    """What is wrong with a task's returned value (None: nothing); results are never trusted."""
    if not isinstance(value, dict) or not isinstance(value.get("results"), list):
        return f"the task returned {type(value).__name__}, not a dict of results"
    if value.get("base") != ours:
        return (
            f"the worker on {where.host} has another base model ({value.get('base')}, this "
            f"driver {ours}): install the same lab on every machine"
        )
    try:
        points = [SweepResult.from_dict(d).point for d in value["results"]]
    except ValueError as exc:  # nan where a number must be, an accuracy above 1, ...
        return f"the worker on {where.host} returned an invalid result ({exc})"
    if sorted(p.key for p in points) != sorted(p.key for p in unit):
        return f"the worker on {where.host} returned results for other points than it was given"
    return None


def _say_alone(points: Sequence[SweepPoint]) -> None:
    """One line naming the LoRA flavours among `points` that the batched engine cannot train."""
    alone = [p for p in points if not p.is_full and not p.batchable]
    if alone:
        kinds = sorted({_flavour(p) for p in alone})
        tqdm.write(
            f"{_plural(len(alone), 'point')} ({', '.join(kinds)}) "
            f"{'trains' if len(alone) == 1 else 'train'} one by one: the "
            "batched engine has no exact form for them"
        )


def chunk_size(
    group: Sequence[SweepPoint], device: torch.device | str, *, calibrate: bool = True
) -> int:
    """How many of `group`'s points (one group_key) one batched run takes on `device`.

    With `calibrate`: the chunk size `lab.calibrate` measured fastest for such a group on this
    machine (1: each point trains alone, faster here than batched), measured when that costs
    under 5% of the group's training and remembered in user_cache_root()/calibration.json;
    $LORA_LAB_CALIBRATE=0 turns it off. Otherwise, and while nothing is measured,
    `lab.batched.default_max_configs`: what fits in half the device's free memory, and on a CPU
    about CPU_ROWS_PER_STEP sequences per step. Chunking never changes a point's numbers.
    """
    group = list(group)
    batch_size = group[0].batch_size
    config = load_base_config()
    specs = [p.spec() for p in group]
    needed = bytes_per_config(config, specs, batch_size)
    static = default_max_configs(batch_size, device, needed)
    if not calibrate:
        return static
    return calibrated_chunk_size(
        specs, get_task(group[0].task), batch_size, group[0].steps, device, static=static,
        limit=max_configs_for_memory(needed, device), config=config,
    )  # fmt: skip


def plan_chunks(
    points: Sequence[SweepPoint],
    device: torch.device | str,
    max_configs: int | None = None,
    size: Callable[[list[SweepPoint]], int] | None = None,
) -> list[list[SweepPoint]]:
    """The units of work sweep() trains `points` in, in order: each a list of points.

    A point the batched engine cannot train (full fine-tuning, a 4-bit base, DoRA's or PiSSA's
    unbatched forms) is a unit of its own; the batchable LoRA points are grouped by `group_key`
    and each group is cut into chunks of `max_configs` (default `chunk_size`, or `size(group)`
    when given: the rule for a device elsewhere, such as a Ray worker's GPU). A unit of one
    point trains alone (`run_point`), a longer one as one batched run (`run_group`). Local
    sweeps run the units one after another, `executor="ray"` hands each to a Ray task.
    """
    if max_configs is not None:
        check_count("max_configs", max_configs)
    units: list[list[SweepPoint]] = []
    groups: dict[tuple, list[SweepPoint]] = {}
    for point in dict.fromkeys(points):
        if point.batchable:
            groups.setdefault(group_key(point), []).append(point)
        else:
            units.append([point])
    for group in groups.values():
        if max_configs is not None:
            n = max_configs
        else:
            n = size(group) if size is not None else chunk_size(group, device)
        units += [group[i : i + n] for i in range(0, len(group), n)]
    return units


def run_chunk(
    unit: Sequence[SweepPoint],
    device: torch.device | str | None = None,
    progress: bool = True,
    on_result: Callable[[SweepResult], None] | None = None,
) -> list[SweepResult]:
    """Train one unit of `plan_chunks`: one point alone, or several batched together.

    A batched unit larger than this device's free memory holds (half of it, as planned here)
    trains in smaller chunks, and one that still runs out of memory is halved (run_group), so
    a unit planned for a larger device (another Ray worker's) still trains.
    """
    unit = list(unit)
    if len(unit) == 1:
        result = run_point(unit[0], device=device, progress=progress)
        if on_result is not None:
            on_result(result)
        return [result]
    device = torch.device(device) if device is not None else default_device()
    per = bytes_per_config(load_base_config(), [p.spec() for p in unit], unit[0].batch_size)
    fits = max_configs_for_memory(per, device)
    return run_group(unit, device, progress, min(len(unit), fits), on_result=on_result)


def resolve_device(device: object) -> torch.device:
    """A torch.device that exists here, or ValueError naming the value and what would do."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        parsed = device
    else:
        if not isinstance(device, str):
            raise TypeError(f"device={device!r}: expected a str such as 'cpu' or 'cuda'")
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device={device!r} is not a device; try 'cpu' or 'cuda'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here; use 'cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} GPUs")
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r}: MPS is not available here; use 'cpu'")
    elif parsed.type != "cpu":
        raise ValueError(f"device={device!r}: the lab trains on 'cpu', 'cuda' or 'mps'")
    if parsed.type != "cuda" and parsed.index not in (None, 0):
        raise ValueError(f"device={device!r}: there is one {parsed.type}; use {parsed.type!r}")
    return parsed


# ---------------------------------------------------------------------------------------------
# Summaries: plain lists for lab.plots
# ---------------------------------------------------------------------------------------------


def select(results: Iterable[SweepResult], **filters: object) -> list[SweepResult]:
    """Results whose point has every given field equal to the given value (targets: any order)."""
    names = {f.name for f in dataclasses.fields(SweepPoint)}
    unknown = sorted(set(filters) - names)
    if unknown:
        raise ValueError(f"unknown SweepPoint fields {unknown}; valid: {sorted(names)}")
    if "targets" in filters:
        filters["targets"] = tuple(sorted(filters["targets"]))
    return [r for r in results if all(getattr(r.point, k) == v for k, v in filters.items())]


def by_rank(results: Iterable[SweepResult]) -> dict[int, SweepResult]:
    """LoRA results keyed by rank, ascending; the first result of each rank wins (not diverged)."""
    out: dict[int, SweepResult] = {}
    for r in results:
        if not r.point.is_full and not r.diverged:
            out.setdefault(r.point.rank, r)
    return dict(sorted(out.items()))


def accuracy_table(
    results: Iterable[SweepResult], ranks: Sequence[int], alphas: Sequence[float]
) -> list[list[float]]:
    """Held-out accuracy, a row per rank and a column per alpha; nan where not run or diverged."""
    found = {
        (r.point.rank, r.point.alpha): math.nan if r.diverged else r.heldout["accuracy"]
        for r in results
    }
    return [[found.get((rank, float(a)), math.nan) for a in alphas] for rank in ranks]


def dropout_series(
    results: Iterable[SweepResult],
) -> tuple[list[float], list[float], list[float]]:
    """(dropouts, train losses, held-out losses) by dropout, from results with a train eval."""
    kept = [r for r in results if r.train_eval is not None and not r.diverged]
    rows = sorted({r.point.dropout: r for r in kept}.items())
    return (
        [p for p, _ in rows],
        [r.train_eval["loss"] for _, r in rows],
        [r.heldout["loss"] for _, r in rows],
    )


def trainable_counts(
    ranks: Sequence[int],
    targets: Sequence[str] = DEFAULT_TARGETS,
    config: ModelConfig | None = None,
) -> tuple[list[int], int]:
    """Exact trainable parameters per rank, and full fine-tuning's, counted on the meta device."""
    config = config or load_base_config()
    targets = tuple(sorted(targets))
    return [count_lora(config, rank, targets)[0] for rank in ranks], count_full(config)
