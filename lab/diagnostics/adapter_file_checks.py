"""The doctor's checks of an adapter file against a model: readable, non-empty, finite, trained,
made for the model's settings. The file is read, never loaded into the model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..adapters import (
    _adapter_config,
    _adapter_description,
    _read_adapter_file,
    _summary,
    load_adapter,
    lora_state_dict,
)
from ..config import LoRAConfig
from ..lora import LoRALinear
from ..text import plural
from .findings import Finding, _names

__all__: list[str] = []

# ---------------------------------------------------------------------------------------------
# An adapter file
# ---------------------------------------------------------------------------------------------


def _why(exc: Exception, path: Path) -> str:
    """An error's message for a finding's detail, which already starts with the path."""
    text = str(exc)
    prefixes = (f"cannot read adapter file {path}: ", f"adapter file {path} ", f"{path}: ")
    for prefix in (*prefixes, f"{path} "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    return text[:300]


def _file_finding(code: str, path: Path, why: str, advice: str | None = None) -> Finding:
    advice = (
        advice or "save the adapter again with lab.save_adapter(model, path) and check the path"
    )
    return Finding(code, advice, f"{path}: {why}")


def _adapter_file(model: nn.Module, layers: dict[str, LoRALinear], path: Path) -> list[Finding]:
    """adapter-file-*: the file read as load_adapter reads it, without loading it."""
    unreadable = "adapter-file-unreadable"
    try:  # a missing path, a folder, a FIFO or a device is named here, never opened
        metadata, tensors = _read_adapter_file(path)
    except (OSError, ValueError) as exc:
        return [_file_finding(unreadable, path, _why(exc, path))]
    adapter_keys = [k for k in tensors if k.rpartition(".")[2] in ("lora_A", "lora_B")]
    if not adapter_keys:
        held = (
            f"{plural(len(tensors), 'tensor')} ({_names(sorted(tensors))})"
            if tensors
            else "no tensors"
        )
        return [
            _file_finding(
                "adapter-file-empty",
                path,
                f"holds {held} and none is a lora_A or lora_B",
                "save the adapter itself with lab.save_adapter(model, path) after add_lora and "
                "training (a base model file or an empty state dict has no adapter tensors)",
            )
        ]
    try:  # the settings as load_adapter validates them: every field present and valid
        stored = _adapter_description(metadata, path)
    except (TypeError, ValueError) as exc:
        return [_file_finding(unreadable, path, _why(exc, path))]
    findings = []
    nonfinite = [
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if nonfinite:
        findings.append(
            _file_finding(
                "adapter-file-nonfinite",
                path,
                f"{len(nonfinite)} tensors hold nan or inf ({_names(nonfinite)})",
                "retrain with a lower lr or alpha and save again: this adapter came from a "
                "diverged run",
            )
        )
    inits = (
        {stored["config"]["init"]}
        if stored["config"] is not None
        else {c["init"] for c in stored["layers"].values()}
    )
    b_keys = [k for k in adapter_keys if k.endswith(".lora_B")]
    if inits == {"default"} and b_keys and not any(bool(tensors[k].any()) for k in b_keys):
        findings.append(
            _file_finding(
                "adapter-file-untrained",
                path,
                f"all {len(b_keys)} lora_B tensors are exactly zero: the adapter was saved "
                "before it trained, and loading it changes nothing",
                "train the adapter, then save it with lab.save_adapter (it was saved fresh)",
            )
        )
    findings += _file_mismatch(model, layers, path, stored, tensors, trial=not findings)
    return findings


def _file_mismatch(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    path: Path,
    stored: dict,
    tensors: dict[str, torch.Tensor],
    trial: bool,
) -> list[Finding]:
    """adapter-file-mismatch: the file's settings, layers and shapes against the model's.

    With `trial`, a file that matches in every way checked here is also loaded into a copy of
    the model, so whatever else lab.load_adapter would refuse is reported too.
    """
    config = _summary(stored)
    settings = ", ".join(
        f"{k}={config[k]!r}" for k in ("targets", "rank", "alpha", "rslora", "variant")
        if config.get(k) is not None
    )  # fmt: skip
    advice = (
        f"build the model as the file was trained (lab.add_lora(model, {settings}) on a "
        "fresh base) before lab.load_adapter"
    )
    if not layers:
        return [_file_finding("adapter-file-mismatch", path, "the model has no LoRA layers to "
                              "load it into", advice)]  # fmt: skip
    expected = _summary(_adapter_config(layers))
    differences = [
        f"{field}: file {config.get(field)!r}, model {expected.get(field)!r}"
        for field in (*LoRAConfig.__dataclass_fields__, "layers", "per_layer")
        if config.get(field) != expected.get(field)
    ]
    params = lora_state_dict(model)
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(p.shape)}"
        for k, p in params.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(p.shape)
    ]
    missing = sorted(params.keys() - tensors.keys())
    if missing and not differences:
        differences.append(f"tensors missing from the file: {_names(missing)}")
    differences += shapes
    if trial and not differences and not any(layer.merged for layer in layers.values()):
        # Everything matched: load a copy, so anything load_adapter refuses is found too.
        try:
            load_adapter(copy.deepcopy(model), path)
        except (TypeError, ValueError, OSError) as exc:
            differences.append(str(exc)[:200])
    if not differences:
        return []
    return [
        _file_finding(
            "adapter-file-mismatch",
            path,
            f"does not match the model's LoRA layers ({'; '.join(differences)[:600]})",
            advice,
        )
    ]
