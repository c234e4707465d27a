"""The lab's pretrained base model: a committed safetensors file and how to load or rewrite it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .fileio import atomic_write_bytes
from .model import ModelConfig, ToyTransformer, default_device

__all__ = [
    "BASE_MODEL_PATH",
    "check_state",
    "load_base_config",
    "load_base_model",
    "model_from_state",
    "save_base_model",
]

BASE_MODEL_PATH = Path(__file__).parent / "data" / "base_model.safetensors"
_CONFIG_KEY = "lora_lab_model_config"
_TIED = "head.weight"  # the same tensor as tok_emb.weight; stored once


def save_base_model(
    model: ToyTransformer, path: str | os.PathLike = BASE_MODEL_PATH, info: dict | None = None
) -> Path:
    """Write `model`'s weights and config to a safetensors file, atomically."""
    if not isinstance(model, ToyTransformer):
        raise TypeError(f"model must be a ToyTransformer, got {type(model).__name__}")
    path = _as_path(path)
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED
    }
    metadata = {_CONFIG_KEY: json.dumps(model.config.to_dict()), "info": json.dumps(info or {})}
    data = safetensors_save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def _read(path: Path, with_tensors: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config in a base model file's metadata, and its tensors if asked for."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory, not a base model file (.safetensors); pass the file's path"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"no base model at {path}; rebuild it with `python scripts/pretrain_base.py`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys()) if with_tensors else []
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path} is not a readable base model file (truncated or corrupt?): {exc}"
        ) from exc
    if _CONFIG_KEY not in metadata:
        raise ValueError(
            f"{path} has no {_CONFIG_KEY!r} metadata: not a base model written by save_base_model"
        )
    try:
        raw = json.loads(metadata[_CONFIG_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: the {_CONFIG_KEY!r} metadata is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: the {_CONFIG_KEY!r} metadata must be a JSON object of ModelConfig fields, "
            f"got {type(raw).__name__}"
        )
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(
            f"{path}: the model config has unknown fields {unknown}; valid: {sorted(fields)}"
        )
    try:
        config = ModelConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the model config is invalid: {exc}") from exc
    return config, tensors


def check_state(config: ModelConfig, tensors: object, source: str = "the state dict") -> None:
    """ValueError/TypeError unless `tensors` are exactly the weights `config` describes.

    Every expected name present (the tied head optional), no other name, the expected shape,
    a floating dtype and finite values. `source` names where the tensors came from.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{source}: expected a mapping name -> tensor, got {type(tensors).__name__}"
        )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ToyTransformer(config).state_dict().items()}
    missing = sorted(set(expected) - set(tensors) - {_TIED})
    unexpected = sorted(set(tensors) - set(expected), key=str)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its config: missing tensors {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected tensors {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}"
        )
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: {name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(expected[name]):
            raise ValueError(
                f"{source}: {name} has shape {tuple(value.shape)}, but its config needs "
                f"{tuple(expected[name])}"
            )
        if not value.dtype.is_floating_point:
            raise ValueError(
                f"{source}: {name} has dtype {value.dtype}; model weights must be floating point"
            )
        if not value.is_meta and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: {name} contains non-finite values (inf or nan)")


def load_base_config(path: str | os.PathLike = BASE_MODEL_PATH) -> ModelConfig:
    """The base model's config, read from the file's metadata alone (no tensors are loaded)."""
    return _read(_as_path(path), with_tensors=False)[0]


def _as_path(path: object) -> Path:
    if not isinstance(path, str | os.PathLike) or (isinstance(path, str) and not path):
        raise TypeError(f"path must be a non-empty str or os.PathLike, got {path!r}")
    return Path(path)


def load_base_model(
    device: torch.device | str | None = None, path: str | os.PathLike = BASE_MODEL_PATH
) -> ToyTransformer:
    """The pretrained base (copy, reverse, sort, add) on `device` (default: `default_device()`).

    The file is checked first: its tensors must be exactly those its config describes (names,
    shapes, floating dtype, finite values), else ValueError naming the file and the problem.
    """
    path = _as_path(path)
    try:
        device = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda')") from exc
    config, tensors = _read(path, with_tensors=True)
    check_state(config, tensors, source=str(path))
    return model_from_state(config, tensors).to(device).eval()


def model_from_state(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ToyTransformer:
    """A ToyTransformer that takes `tensors` as its weights (no copy, no random init).

    `tensors` is a state dict, with or without the tied head (it is the token embedding).
    They are checked first (see check_state): a mismatch raises before anything is built.
    """
    check_state(config, tensors)
    with torch.device("meta"):  # shapes only: the tensors below become the weights
        model = ToyTransformer(config)
    tensors = {**tensors, _TIED: tensors["tok_emb.weight"]}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.head.weight = model.tok_emb.weight  # assign=True replaced the tied Parameter: re-tie
    return model
