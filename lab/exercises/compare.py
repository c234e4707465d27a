"""Comparing a student's answer with the lab's: closeness, a scale factor, where they differ."""

from __future__ import annotations

import math

import torch

from .feedback import Feedback, _no


def _where(diff: torch.Tensor) -> str:
    """'by 3.2e-01 at position [0, 5]': the largest entry of |diff| and where it is."""
    index = torch.unravel_index(diff.abs().argmax(), diff.shape)
    return f"by {float(diff.abs().max()):.1e} at position {[int(i) for i in index]}"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def _factor(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """k if got == k * want everywhere (k from a least-squares fit), else None."""
    k = float((got * want).sum() / (want * want).sum())
    return k if _close(got, k * want) else None


def _match_factor(k: float | None, messages: dict[float, str]) -> str | None:
    if k is None:
        return None
    return next((m for f, m in messages.items() if math.isclose(k, f, abs_tol=1e-3)), None)


def _bad_tensor(
    out: object, name: str, want: torch.Tensor, why: str = "the base's dtype"
) -> Feedback | None:
    """Feedback when `out` is not a finite CPU tensor with want's shape and dtype."""
    if out is None:
        return _no(f"{name} returned None: return the output tensor")
    if not isinstance(out, torch.Tensor):
        return _no(f"{name} returned a {type(out).__name__}; expected a torch.Tensor")
    if out.device != want.device:
        return _no(f"{name} returned a tensor on {out.device}; expected {want.device}, like x")
    if out.shape != want.shape:
        return _no(f"{name} returned shape {tuple(out.shape)}; expected {tuple(want.shape)}")
    if out.dtype != want.dtype:
        return _no(f"{name} returned {out.dtype}; expected {want.dtype}, {why}")
    if not bool(torch.isfinite(out).all()):
        return _no(f"{name} returned inf or nan values")
    return None


def _as_number(value: object) -> object:
    """A one-element tensor's value; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    return value
