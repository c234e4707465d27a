"""Adapter files and state dicts: only A and B (and a flavour's own tensors), with their config.

An adapter file is a .safetensors file of the adapter tensors (kilobytes to megabytes, not the
model) whose metadata holds the format and version, the LoRAConfig as JSON, and the adapted
layers' names (with mixed settings: each layer's own config). `load_adapter` checks the file
against the model's LoRA layers and changes nothing unless everything matches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .checks import check_model, check_path, describe, nonfinite
from .config import LoRAConfig
from .fileio import atomic_write_bytes, regular_file
from .interrupts import kept
from .lora import LoRALinear
from .surgery import _require_lora, lora_layers

__all__ = ["load_adapter", "load_lora_state_dict", "lora_state_dict", "save_adapter"]

# safetensors metadata of an adapter file: the format and version, the LoRAConfig's to_dict()
# as JSON, and the adapted layers' names (with mixed settings: each layer's own config).
_FORMAT_KEY, _VERSION_KEY = "lora_lab_format", "lora_lab_version"
_CONFIG_KEY, _LAYERS_KEY = "lora_lab_config", "lora_lab_layers"
_FORMAT, _VERSION = "lora-lab-adapter", 2


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, e.g. {"blocks.0.attn.q_proj.lora_A": (rank, in) tensor, ...}."""
    state = {}
    for name, layer in lora_layers(model).items():
        for key, p in layer.adapter_parameters().items():
            state[f"{name}.{key}"] = p.detach()
    return state


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRA layers; strict, and all-or-nothing."""
    layers = _require_lora(model)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        # The merged weights contain the old ΔW; new A, B would leave them inconsistent.
        raise ValueError(f"LoRA layers {merged} are merged; call unmerge_lora(model) first")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of name -> tensor (as from lora_state_dict), "
            f"got {type(state_dict).__name__}"
        )
    params = lora_state_dict(model)
    missing = sorted(params.keys() - state_dict.keys(), key=str)
    unexpected = sorted(state_dict.keys() - params.keys(), key=str)
    if missing or unexpected:
        raise ValueError(
            f"adapter keys do not match: missing {describe(missing)}, "
            f"unexpected {describe(unexpected)}"
        )
    # First pass: check every value and make the exact tensor to copy (right dtype and device).
    # Nothing is written until every one of them is known to be good.
    ready: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise TypeError(f"{key}: expected a dense tensor, got layout {value.layout}")
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{key}: adapter tensors must be floating point (float32, bfloat16, ...), "
                f"got dtype {value.dtype}"
            )
        if value.shape != param.shape:
            raise ValueError(
                f"{key}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
            )
        if value.is_meta and not param.is_meta:
            raise ValueError(f"{key} is on the meta device: it has a shape but no values to load")
        try:
            converted = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"{key}: cannot move it from {value.device} to {param.device}: {exc}"
            ) from exc
        if not converted.is_meta and not bool(torch.isfinite(converted).all()):
            raise ValueError(f"{key} contains non-finite values (inf or nan) as {param.dtype}")
        ready[key] = converted
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(ready[key])


def _leaf_order(names: Iterable[str]) -> list[str]:
    """Leaf names (q_proj, ...) in order of first appearance."""
    return list(dict.fromkeys(name.rpartition(".")[2] for name in names))


def _adapter_config(layers: dict[str, LoRALinear]) -> dict:
    """The description of a model's adapters, used both to save and to compare.

    {"config": LoRAConfig.to_dict() or None, "layers": [names] or {name: to_dict()}}: one
    config when every layer shares its settings (its targets: the adapted leaf names), else
    each layer's own (add_lora called twice with different ranks, say).
    """
    configs = {name: layer.config.replace(targets=(name.rpartition(".")[2],))
               for name, layer in layers.items()}  # fmt: skip
    first = next(iter(configs.values()))
    if all(c.replace(targets=first.targets) == first for c in configs.values()):
        shared = first.replace(targets=tuple(_leaf_order(layers)))
        return {"config": shared.to_dict(), "layers": list(layers)}
    return {"config": None, "layers": {n: c.to_dict() for n, c in configs.items()}}


def _summary(description: dict) -> dict:
    """What load_adapter returns: the config's fields, "layers", and "per_layer" if mixed."""
    if description["config"] is not None:
        return {**description["config"], "layers": list(description["layers"])}
    fields = dict.fromkeys(LoRAConfig.__dataclass_fields__)
    layers = description["layers"]
    fields["targets"] = _leaf_order(layers)
    return {**fields, "layers": list(layers), "per_layer": dict(layers)}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapters and their config to a .safetensors file, atomically; returns the path.

    The file holds only A and B for each layer (kilobytes to megabytes, not the whole model);
    the config is JSON in the safetensors metadata under "lora_lab_config".
    """
    path = check_path(path, "adapter path")
    layers = _require_lora(model)
    state = lora_state_dict(model)
    if any(t.is_meta for t in state.values()):
        raise ValueError("the model is on the meta device: its adapters hold no values to save")
    broken = [f"{key} has {bad}" for key, t in state.items() if (bad := nonfinite(t))]
    if broken:  # load_adapter would refuse the file: a diverged run is not kept as a result
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ValueError(
            f"not saved: {'; '.join(broken[:3])}{more} (a diverged run: retrain with a lower lr "
            "or alpha)"
        )
    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    description = _adapter_config(layers)
    metadata = {
        _FORMAT_KEY: _FORMAT,
        _VERSION_KEY: str(_VERSION),
        _CONFIG_KEY: json.dumps(description["config"]),
        _LAYERS_KEY: json.dumps(description["layers"]),
    }
    data = safetensors_save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def _read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a .safetensors file, read without touching any model.

    OSError (FileNotFoundError, IsADirectoryError, ...) for a path that is not an ordinary file
    (a FIFO or a device such as /dev/zero is refused before it is opened); ValueError for a
    file safetensors cannot read.
    """
    path = regular_file(check_path(path, "adapter file"), "adapter file")
    try:
        with kept(), safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable adapter file (truncated or corrupt?): {exc}"
        ) from exc
    return metadata, tensors


def _adapter_description(metadata: Mapping[str, str], path: str | os.PathLike) -> dict:
    """The adapter settings an adapter file's metadata states, each validated.

    {"config": LoRAConfig.to_dict() or None, "layers": [names] or {name: to_dict()}}, as
    _adapter_config describes a model. ValueError (or TypeError) naming what is wrong: a
    missing or foreign format, a missing field ("adapter file a.safetensors has no 'alpha'"),
    a field of the wrong type or value.
    """
    for key in (_CONFIG_KEY, _LAYERS_KEY):
        if key not in metadata:
            raise ValueError(f"{path} has no {key!r} metadata: not written by save_adapter?")
    if metadata.get(_FORMAT_KEY) != _FORMAT:
        raise ValueError(f"{path}: metadata is not a {_FORMAT!r} file")
    if metadata.get(_VERSION_KEY) != str(_VERSION):
        raise ValueError(
            f"{path}: adapter format version {metadata.get(_VERSION_KEY)!r} "
            f"is not supported (expected {_VERSION})"
        )
    raw = {}
    for key in (_CONFIG_KEY, _LAYERS_KEY):
        try:
            raw[key] = json.loads(metadata[key])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(
                f"{path}: the {key!r} metadata is not valid JSON: {describe(str(exc))}"
            ) from exc
    # Every config in the file is validated by LoRAConfig.from_dict: all fields, each checked.
    layer_names, what = raw[_LAYERS_KEY], f"adapter file {path}"
    if raw[_CONFIG_KEY] is not None:
        config = LoRAConfig.from_dict(raw[_CONFIG_KEY], what).to_dict()
        if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
            raise ValueError(f"{what}: {_LAYERS_KEY} must be a list of layer names")
        return {"config": config, "layers": layer_names}
    if not isinstance(layer_names, dict) or not layer_names:
        raise ValueError(f"{what}: {_LAYERS_KEY} must map layer names to configs")
    per_layer = {
        name: LoRAConfig.from_dict(c, f"{what}, layer {name},").to_dict()
        for name, c in layer_names.items()
    }
    return {"config": None, "layers": per_layer}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a file written by save_adapter into the model's LoRA layers; returns its config.

    The model must already have LoRA with the same settings: call add_lora(model, targets=...,
    rank=..., alpha=..., dropout=..., rslora=...) as when training, then load_adapter. Any
    mismatch raises ValueError and leaves the model unchanged.
    """
    check_model(model)
    metadata, tensors = _read_adapter_file(path)
    path = Path(path)
    try:
        stored = _adapter_description(metadata, path)
    except TypeError as exc:  # a field of the wrong type: a bad file, not a bad call
        raise ValueError(str(exc)) from exc
    layers = lora_layers(model)
    if not layers:
        hint = stored["config"] or {}
        shown = ", ".join(f"{k}={hint[k]!r}" for k in ("targets", "rank", "alpha") if k in hint)
        raise ValueError(
            f"cannot load {path}: the model has no LoRA layers; first call "
            f"add_lora(model, LoRAConfig({shown}, ...)) with the settings the file was saved with"
        )
    config = _summary(stored)
    expected = _summary(_adapter_config(layers))
    differences = [
        f"{field}: file has {describe(config.get(field))}, "
        f"model has {describe(expected.get(field))}"
        for field in (*LoRAConfig.__dataclass_fields__, "layers", "per_layer")
        if config.get(field) != expected.get(field)
    ]
    if differences:
        raise ValueError(
            f"{path} does not match the model's LoRA layers: " + "; ".join(differences)
        )
    try:
        load_lora_state_dict(model, tensors)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"cannot load {path}: {exc}") from exc
    return config
