"""The lab's pretrained base model: a committed safetensors file and how to load or rewrite it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .fileio import atomic_write_bytes
from .model import ModelConfig, ToyTransformer, default_device

__all__ = [
    "BASE_MODEL_PATH",
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
    path = Path(path)
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED
    }
    metadata = {_CONFIG_KEY: json.dumps(model.config.to_dict()), "info": json.dumps(info or {})}
    data = safetensors_save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def _read(path: Path, with_tensors: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config in a base model file's metadata, and its tensors if asked for."""
    if not path.is_file():
        raise FileNotFoundError(
            f"no base model at {path}; rebuild it with `python scripts/pretrain_base.py`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            names = list(f.keys()) if with_tensors else []
            tensors = {k: f.get_tensor(k) for k in names}
        return ModelConfig(**json.loads(metadata[_CONFIG_KEY])), tensors
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable base model file: {exc}") from exc


def load_base_config(path: str | os.PathLike = BASE_MODEL_PATH) -> ModelConfig:
    """The base model's config, read from the file's metadata alone (no tensors are loaded)."""
    return _read(Path(path), with_tensors=False)[0]


def load_base_model(
    device: torch.device | str | None = None, path: str | os.PathLike = BASE_MODEL_PATH
) -> ToyTransformer:
    """The pretrained base (copy, reverse, sort, add) on `device` (default: `default_device()`)."""
    config, tensors = _read(Path(path), with_tensors=True)
    device = torch.device(device) if device is not None else default_device()
    return model_from_state(config, tensors).to(device).eval()


def model_from_state(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ToyTransformer:
    """A ToyTransformer that takes `tensors` as its weights (no copy, no random init).

    `tensors` is a state dict, with or without the tied head (it is the token embedding).
    """
    with torch.device("meta"):  # shapes only: the tensors below become the weights
        model = ToyTransformer(config)
    tensors = {**tensors, _TIED: tensors["tok_emb.weight"]}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.head.weight = model.tok_emb.weight  # assign=True replaced the tied Parameter: re-tie
    return model
