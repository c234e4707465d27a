"""The doctor's findings: what each code means, one Finding, the report, and the words they share.

lab.diagnosis runs the checks (lab.diagnostics' model_checks, adapter_file_checks and lr_evidence);
each returns Findings built here, so every finding reads the same way: a kebab-case code from
CODES, one sentence of advice (the fix) and the measured evidence.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..config import LoRAConfig
from ..lora import LoRALinear
from ..quant import Linear4bit

__all__ = ["CODES", "Finding", "report"]

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


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _names(names: list[str], limit: int = 3) -> str:
    """'a, b, c and 4 more': a list of layer names short enough for one line."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _span(low: float, high: float, prefix: str) -> str:
    """'between 0.005 and 0.04', or 'about 0.001' when only one value is known."""
    return f"about {prefix}{low:g}" if low == high else f"between {prefix}{low:g} and {high:g}"


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
