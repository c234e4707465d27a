"""The LoRA doctor: the mistakes that fill LoRA issue trackers, found by looking at a model.

`doctor(model)` reads a model (and optionally an adapter file and the learning rate you mean
to use) and returns a list of `Finding`s: a short code, one sentence of advice (the fix) and
the measured evidence. A trained, healthy adapter gets an empty list. The doctor only reads:
it never runs the model, never changes a tensor or a requires_grad flag.

    findings = lab.doctor(model, "adapter.safetensors", lr=2e-2)
    print(lab.doctor_report(findings))  # "no findings: ..." or one numbered entry per finding

(The module is lab.diagnosis, not lab.doctor: `lab.doctor` is the function.)

Each check and its code is listed in `CODES`. What they catch, as PEFT, Unsloth and
LLMs-from-scratch users report them:
  - an adapter that never trained (lora_B still exactly zero: the optimizer was built before
    add_lora, lr 0, no optimizer.step()) or whose tensors do not require grad;
  - a base left trainable next to the adapters ("why did memory not drop?");
  - a scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) far from what trains;
  - attention-only targets, which LoRA Without Regret and QLoRA (section 4) find fall short;
  - a merged adapter, and ΔW counted twice (a merged model saved as a base, the adapter loaded
    again on top);
  - 4-bit weights that a parameter count over model.parameters() misses (packed two a byte);
  - an adapter file that is unreadable, empty, untrained or made for other settings;
  - a learning rate outside the range that trained in the lab's own shipped sweeps.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checks import check_path as _check_path
from .diagnostics.adapter_file_checks import _adapter_file
from .diagnostics.findings import CODES, Finding, report
from .diagnostics.lr_evidence import GRID_DIR, LR_TOLERANCE, LrEvidence, _learning_rate, lr_evidence
from .diagnostics.model_checks import (
    SCALING_RANGE,
    _adapter_state,
    _attention_only,
    _base_trainable,
    _merged,
    _merged_twice,
    _packed_4bit,
    _scaling,
    scaling_note,
)
from .surgery import lora_layers
from .training import check_lr

__all__ = [
    "CODES",
    "GRID_DIR",
    "LR_TOLERANCE",
    "SCALING_RANGE",
    "Finding",
    "LrEvidence",
    "doctor",
    "lr_evidence",
    "report",
    "scaling_note",
]


def doctor(
    model: nn.Module, adapter_path: str | os.PathLike | None = None, *, lr: float | None = None
) -> list[Finding]:
    """Diagnose `model`'s LoRA setup (and an adapter file, and an lr); [] means healthy.

    `adapter_path`: a file from lab.save_adapter to check against the model (it is read,
    never loaded into the model). `lr`: the learning rate you train (or trained) with,
    compared with those that trained in the lab's shipped sweeps. A bad file gives a finding,
    never an exception; a wrong argument type raises TypeError, a bad lr ValueError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    path = None if adapter_path is None else _check_path(adapter_path, "adapter_path")
    if lr is not None:
        check_lr(lr)
    layers = lora_layers(model)
    with torch.no_grad():
        findings = _adapter_state(model, layers)
        findings += _base_trainable(model, layers)
        findings += _scaling(layers)
        findings += _attention_only(model, layers)
        findings += _merged(layers)
        findings += _merged_twice(model, layers)
        findings += _packed_4bit(model)
        if path is not None:
            findings += _adapter_file(model, layers, path)
        if lr is not None:
            findings += _learning_rate(layers, float(lr))
    return findings
