"""The lab's pretrained base model: a committed safetensors file and how to load or rewrite it."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .fileio import atomic_write_bytes, regular_file
from .interrupts import kept
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
    # A base file holds a plain ToyTransformer: load_base_model builds exactly that. Anything
    # else would be written and then refused at every load, so it is refused here, by name.
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"the model has LoRA layers ({', '.join(lora[:3])}{', ...' if len(lora) > 3 else ''}):"
            " a base file holds the plain model. Fold the adapters in with "
            "lab.remove_lora(model) (merge=True), or save only them with lab.save_adapter"
        )
    quantized = [n for n, m in model.named_modules() if callable(getattr(m, "dequantize", None))]
    if quantized:
        raise ValueError(
            f"the model has 4-bit layers ({', '.join(quantized[:3])}"
            f"{', ...' if len(quantized) > 3 else ''}): a base file holds full-precision weights. "
            "Save the base before lab.quantize_base, or replace them by their dequantised "
            "weights with lab.quant.dequantize_base(model)"
        )
    if model.head.weight is not model.tok_emb.weight:
        raise ValueError(
            "the model's head is not tied to its token embedding (model.head.weight is not "
            "model.tok_emb.weight): a base file stores that matrix once, so the head would load "
            "as the embedding. Re-tie them (model.head.weight = model.tok_emb.weight) to save"
        )
    if any(t.is_meta for t in model.state_dict().values()):
        raise ValueError("the model is on the meta device (shapes only): it has no weights to save")
    if not isinstance(info, dict | None):
        raise TypeError(f"info must be a dict of JSON values or None, got {type(info).__name__}")
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED
    }
    check_state(model.config, tensors, source="the model")
    try:
        info_json = json.dumps(info or {})
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"info must hold only JSON values (str, numbers, lists, dicts): {exc}"
        ) from exc
    metadata = {_CONFIG_KEY: json.dumps(model.config.to_dict()), "info": info_json}
    data = safetensors_save(tensors, metadata=metadata)
    return atomic_write_bytes(path, data)


def _read(path: Path, with_tensors: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config in a base model file's metadata, and its tensors if asked for.

    The config is checked against the tensors' names, shapes and dtypes, read from the file's
    header, before any tensor is loaded or any model built: a crafted config (a million
    layers, say) is refused at once. Values are checked by check_state once loaded.
    """
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory, not a base model file (.safetensors); pass the file's path"
        )
    try:
        regular_file(path, "base model file")  # a FIFO or /dev/zero would block or never end
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no base model at {path} ({exc}); rebuild it with `python scripts/pretrain_base.py`"
        ) from None
    with kept():  # a Ctrl-C that torch swallows mid-read is a Ctrl-C, not a corrupt file
        return _read_file(path, with_tensors)


def _read_file(path: Path, with_tensors: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    unreadable = (SafetensorError, OSError, ValueError, RuntimeError)
    try:
        opened = safe_open(str(path), framework="pt")
    except unreadable as exc:
        raise _unreadable(path, exc) from exc
    with opened as f:
        try:
            metadata = f.metadata() or {}
            header = {k: _header_entry(f.get_slice(k)) for k in f.keys()}  # noqa: SIM118
        except unreadable as exc:
            raise _unreadable(path, exc) from exc
        config = _config_from(metadata, path)
        _check_layout(config, header, str(path))
        try:
            tensors = {k: f.get_tensor(k) for k in header} if with_tensors else {}
        except unreadable as exc:
            raise _unreadable(path, exc) from exc
    return config, tensors


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable base model file (truncated or corrupt?): {exc}")


def _config_from(metadata: Mapping[str, str], path: Path) -> ModelConfig:
    """The ModelConfig stored in a base file's metadata, or a ValueError naming the fault."""
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
        return ModelConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the model config is invalid: {exc}") from exc


# The dtypes a base file may hold (safetensors' names). float8 and integers are refused: the
# model computes in one float dtype, and torch cannot even test float8 values for finiteness.
_FILE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_WEIGHT_DTYPES = tuple(_FILE_DTYPES.values())


# Readable names for the other dtypes safetensors stores, for the error message.
_OTHER_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "BOOL": "bool"}


def _header_entry(view: object) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of a tensor in a safetensors file, from its header alone."""
    code = view.get_dtype()
    if code in _FILE_DTYPES:
        return tuple(view.get_shape()), _FILE_DTYPES[code]
    name = _OTHER_DTYPES.get(code) or re.sub(r"^I", "int", re.sub(r"^U", "uint", code))
    return tuple(view.get_shape()), name


def _expected_layout(config: ModelConfig) -> tuple[dict, dict]:
    """(name -> shape outside the blocks, name inside a block -> shape), from a one-block model
    on the meta device: the cost does not grow with n_layers, d_model or vocab_size."""
    with torch.device("meta"):
        state = ToyTransformer(replace(config, n_layers=1)).state_dict()
    outer = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("blocks.")}
    block = {
        k.removeprefix("blocks.0."): tuple(v.shape)
        for k, v in state.items()
        if k.startswith("blocks.0.")
    }
    return outer, block


_BLOCK_NAME = re.compile(r"blocks\.(0|[1-9][0-9]*)\.(.+)")


def _check_layout(config: ModelConfig, header: Mapping, source: str) -> None:
    """ValueError/TypeError unless `header` (name -> (shape, dtype)) is what `config` needs.

    Every expected name present (the tied head optional), no other name, the expected shape,
    one floating dtype for all (float32, float64, float16 or bfloat16).
    """
    outer, block = _expected_layout(config)

    def expected(name: object) -> tuple[int, ...] | None:
        if not isinstance(name, str):
            return None
        if name in outer:
            return outer[name]
        match = _BLOCK_NAME.fullmatch(name)
        if match and int(match.group(1)) < config.n_layers:
            return block.get(match.group(2))
        return None

    unexpected = sorted((k for k in header if expected(k) is None), key=str)
    needed = len(outer) - 1 + config.n_layers * len(block)  # the tied head is optional
    found = len(header) - len(unexpected) - (_TIED in header)
    if unexpected or found != needed:
        missing = [k for k in outer if k != _TIED and k not in header]
        for i in range(config.n_layers):  # stops at the first few: n_layers may be huge
            if len(missing) > 6:
                break
            missing += [f"blocks.{i}.{k}" for k in block if f"blocks.{i}.{k}" not in header]
        layers = f"n_layers={config.n_layers}, d_model={config.d_model}"
        raise ValueError(
            f"{source} does not match its config ({layers}: {needed + 1:,} tensors with the "
            f"tied head, {needed:,} without; it holds {len(header):,}): missing tensors "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected tensors "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    dtypes: dict[object, list[str]] = {}
    for name, (shape, dtype) in header.items():
        if tuple(shape) != expected(name):
            raise ValueError(
                f"{source}: {name} has shape {tuple(shape)}, but its config needs {expected(name)}"
            )
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"{source}: {name} has dtype {dtype}; base model weights must be "
                "float32 (the lab's), float64, float16 or bfloat16"
            )
        dtypes.setdefault(dtype, []).append(name)
    if len(dtypes) > 1:
        counts = ", ".join(
            f"{len(names)} {str(d).removeprefix('torch.')} (e.g. {names[0]})"
            for d, names in sorted(dtypes.items(), key=lambda kv: -len(kv[1]))
        )
        raise ValueError(
            f"{source} mixes dtypes: {counts}; a model computes in one dtype, so every tensor "
            "must have the same (the lab saves float32)"
        )


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
    bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise TypeError(f"{source}: {bad} is a {type(tensors[bad]).__name__}, not a tensor")
    _check_layout(config, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, source)
    for name, value in tensors.items():
        if not value.is_meta and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: {name} contains non-finite values (inf or nan)")
    head, emb = tensors.get(_TIED), tensors["tok_emb.weight"]
    if head is not None and not head.is_meta and not emb.is_meta and not torch.equal(head, emb):
        raise ValueError(
            f"{source}: {_TIED} differs from tok_emb.weight, but the model ties them (one "
            "matrix): loading would silently replace the head by the embedding"
        )


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
    try:  # a device this machine lacks is named before the file is read
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(
            f"device={str(device)!r} is not available here ({exc}); lab.default_device() is "
            f"{default_device()}"
        ) from exc
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
