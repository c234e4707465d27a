"""The machine a sweep trains on: its device, its free memory, torch's compiler cache folder."""

from __future__ import annotations

import os

import torch

from ..fileio import user_cache_root
from ..model import default_device
from ..training import available_bytes as free_memory  # the lab's one free-memory probe

__all__ = ["free_memory", "keep_torch_cache_at_home", "ray_device", "resolve_device"]


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


TORCH_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"


def keep_torch_cache_at_home() -> str | None:
    """Point torch's compiler cache into the user's cache folder, unless it is chosen already.

    torch makes that folder on the first optimizer step even when nothing is compiled, by
    default as /tmp/torchinductor_<user>: on a shared host one folder per student left in /tmp,
    and a file another user puts at that name stops training. Called where training starts
    (never at import), this sets $TORCHINDUCTOR_CACHE_DIR to user_cache_root()/torchinductor
    instead, unless the variable is set or that folder could not be made (no writable home:
    torch's default is kept). Returns the folder chosen, or None when it left the variable
    alone.
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
