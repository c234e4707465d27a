"""What a run measured: the SweepResult record, its JSON and the checks a stored one passes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import numbers
from dataclasses import dataclass, field

from ..memory import CATEGORIES as MEMORY_CATEGORIES
from ..tasks import PRETRAIN_TASKS
from .points import FORMAT, SweepPoint, describe

__all__ = ["SweepResult", "now_utc", "refusal", "result_problem"]


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
        problem = result_problem(result)
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


def result_problem(r: SweepResult) -> str | None:
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


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def refusal(result: object, point: SweepPoint) -> str | None:
    """Why `result` cannot be kept as the result of `point` (None: it can).

    A trainer passed to sweep() is the caller's code: it may return None, another type, another
    point's result, or a result with NaN or impossible numbers. Only what would read back from
    the cache as this point's valid result is kept.
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
