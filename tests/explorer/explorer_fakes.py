"""What the explorer's tests share: made-up results (no training), trainers that count."""

from __future__ import annotations

import dataclasses
import json
import math

from lab.sweeps import (
    FORMAT,
    SweepPoint,
    SweepResult,
    base_fingerprint,
)
from lab.widgets import (
    Selection,
)

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(value: bytes | memoryview) -> bool:
    """Image.value holds bytes (ipywidgets may hand back a memoryview)."""
    return bytes(value).startswith(PNG)


def fake_result(point: SweepPoint) -> SweepResult:
    """Made-up but plausible numbers: accuracy grows with rank, memory with trainable size."""
    rank = point.rank or 128
    return SweepResult(
        point=point,
        losses=[3.0 / (1 + i * rank / 64) for i in range(40)],
        heldout={"loss": 1.0 / rank + point.dropout, "accuracy": min(1.0, rank / 16), "n": 512},
        train_eval=(
            {"loss": 0.1 + point.dropout / 2, "accuracy": 1.0, "n": 256}
            if point.task.endswith("_small")
            else None
        ),
        trainable_parameters=rank * 512,
        total_parameters=406_784,
        memory={
            "parameters": 1_600_000,
            "gradients": rank * 2048,
            "optimizer": rank * 4096,
            "activations": 20_000_000,
        },  # fmt: skip
        wall_seconds=0.1,
        tokens_per_second=1e5,
        device="cpu",
        date="2026-01-01T00:00:00+00:00",
    )


class FakeTrainer:
    """run_fn that counts calls and returns fake results instantly."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[SweepPoint] = []
        self.fail = fail

    def __call__(self, point, device=None, progress=True):
        self.calls.append(point)
        if self.fail:
            raise RuntimeError("out of memory (fake)")
        return fake_result(point)


# -- the method control: LoRA, DoRA, LoRA+, PiSSA, on a 4-bit base or not -------------------------

# Each flavour gets its own accuracy, so a plot shows whose runs it was given.
FLAVOURS = {
    ("LoRA", None): 0.0,
    ("DoRA", None): 0.01,
    ("LoRA+", None): 0.02,
    ("PiSSA", None): 0.03,
    ("LoRA", "nf4"): 0.04,
    ("DoRA", "nf4"): 0.05,
    ("LoRA+", "nf4"): 0.06,
}


def _is_plain(point: SweepPoint) -> bool:
    return (point.variant, point.init, point.lr_ratio, point.quant) == ("lora", "default", 1, None)


def flavoured_result(point: SweepPoint, offset: float) -> SweepResult:
    result = fake_result(point)
    result.heldout = {**result.heldout, "accuracy": round(offset + point.rank / 1000, 6)}
    result.losses = [offset + x for x in result.losses]
    return result


ALL6 = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
SKILLS = ("copy", "reverse", "sort", "add")


def practice_result(point: SweepPoint, kept: float = 0.5) -> SweepResult:
    """A run with forgetting: accuracy peaks at lr 1e-2 (LoRA) or 1e-3 (full); 0.1 diverges."""
    result = fake_result(point)
    best = 1e-3 if point.is_full else 1e-2
    result.heldout = {
        **result.heldout,
        "accuracy": round(0.9 - 0.2 * abs(math.log10(point.lr / best)), 6),
    }
    if point.lr >= 0.1:
        result.diverged, result.heldout = True, {"loss": math.nan, "accuracy": 0.0, "n": 512}
        return result
    result.forgetting = {t: {"accuracy": kept, "loss": 1.0 - kept} for t in SKILLS}
    return result


PRACTICE = Selection(ranks=(1, 4), alphas=(16.0,), targets=ALL6, steps=200)


PRACTICE_SWEPT = dataclasses.replace(PRACTICE, lr_sweep=True)


def figure_texts(fig) -> str:
    """Every text drawn in a Figure (titles, labels, annotations, legend entries)."""
    return " | ".join(t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text")))


def variants_grid_fixture(path) -> list[SweepPoint]:
    """A small grid file shaped like the shipped variants grid: rank 4, 400 steps, lrs."""
    fields = {"LoRA": {}, "DoRA": {"variant": "dora"}, "LoRA+": {"lr_ratio": 16.0},
              "PiSSA": {"init": "pissa"}, "QLoRA": {"quant": "nf4"}}  # fmt: skip
    lrs = {"LoRA+": (2.5e-3, 5e-3)}
    points = [
        SweepPoint("sort_desc", 4, 16.0, steps=400, lr=lr, **f)
        for name, f in fields.items()
        for lr in lrs.get(name, (1e-2, 2e-2))
    ]
    results = [flavoured_result(p, 0.1 * i) for i, p in enumerate(points)]
    path.write_text(json.dumps({
        "format": FORMAT, "base": base_fingerprint(), "steps": 400,
        "results": [r.to_dict() for r in results],
    }))  # fmt: skip
    return points


def lora_at(lr: float, rank: int = 4, steps: int = 300) -> SweepPoint:
    return SweepPoint("sort_desc", rank, 16.0, steps=steps, lr=lr)
