"""Exercise 8: DoRA's forward, the magnitude times the direction of W + scaling B A."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..variants.dora import DoRALinear
from .compare import _bad_tensor, _close, _where
from .feedback import Feedback, _call, _no, _safe

__all__ = [
    "check_dora_forward",
]


DORA_CALL = "my_dora_forward(x, W, A, B, m, scaling)"
DORA_TODO = (
    "Write the body: m / ||W + scaling · B A|| (one norm per output row) times "
    "(x Wᵀ + scaling · x Aᵀ Bᵀ)."
)
_DORA_AXIS = (
    "the norm is over the wrong axis: .norm(dim=0) gives one norm per input column. DoRA "
    "takes one per output row, over the input dimension, (W + ΔW).norm(dim=1): shape (out,), "
    "like m"
)
_DORA_BROADCAST = (
    "m and the norms scale the input columns: m * V / V.norm(dim=1) broadcasts them along "
    "V's last dimension (in). They belong to the output rows: (m / V.norm(dim=1))[:, None] * V, "
    "or scale the output y's last dimension"
)


def _dora_case(
    n_in: int = 12, n_out: int = 12, rank: int = 4, alpha: float = 6.0, seed: int = 11
) -> tuple[DoRALinear, torch.Tensor]:
    """A lab DoRALinear (no bias, B != 0, m away from ||W|| and ||W + ΔW||) and x (2, 3, in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layer's own init leaves torch's seed alone
        layer = DoRALinear(nn.Linear(n_in, n_out, bias=False), rank, alpha)
    with torch.no_grad():
        for t in (layer.base.weight, layer.lora_A, layer.lora_B):
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
        folded = layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A
        # 30 to 70% above ||W + ΔW||: with m = ||W + ΔW|| DoRA would compute LoRA's output
        layer.magnitude.copy_(folded.norm(dim=1) * (1.3 + 0.4 * torch.rand(n_out, generator=g)))
    return layer.eval(), torch.randn(2, 3, n_in, generator=g)


def _dora_mistakes(
    x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float
) -> list[tuple[str, torch.Tensor]]:
    """(hint, the output that mistake gives) for this case, in the order they are tried."""

    def path(k: float) -> torch.Tensor:  # x (W + k B A)^T, in two thin matmuls
        return x @ W.T + k * (x @ A.T @ B.T)

    def v(k: float) -> torch.Tensor:
        return W + k * (B @ A)

    rows = v(s).norm(dim=1)
    mistakes = [
        (_DORA_AXIS, x @ (m[:, None] * v(s) / v(s).norm(dim=0)).T),
        (
            "that divides by the norm of the whole matrix: DoRA takes one norm per output row, "
            "(W + ΔW).norm(dim=1)",
            m / v(s).norm() * path(s),
        ),
        (
            "the magnitude is not applied: you return the direction (W + ΔW) / ||W + ΔW|| "
            "alone. Multiply each output row by m",
            path(s) / rows,
        ),
        (
            "that is plain LoRA's output, x (W + ΔW)ᵀ: DoRA rescales each output row by "
            "m / ||W + ΔW||",
            path(s),
        ),
        (
            "you multiplied by m but did not divide by ||W + ΔW|| (one norm per output row)",
            m * path(s),
        ),
        (
            "you divided by the norm of W: DoRA normalises the adapted weight, "
            "||W + ΔW|| with ΔW = scaling · B A",
            m / W.norm(dim=1) * path(s),
        ),
        (
            "the low-rank update is missing from the output: add scaling · x Aᵀ Bᵀ",
            m / rows * path(0),
        ),
        (
            "the scaling is not applied: ΔW = scaling · B A, in the norm and in the update",
            m / v(1).norm(dim=1) * path(1),
        ),
        (
            "the scaling is applied twice, in the norm and in the update",
            m / v(s * s).norm(dim=1) * path(s * s),
        ),
        ("the scaling is missing from the update: scaling · x Aᵀ Bᵀ", m / rows * path(1)),
        (
            "the scaling is missing from the norm: ||W + scaling · B A||",
            m / v(1).norm(dim=1) * path(s),
        ),
        ("the scaling is applied twice in the update", m / rows * path(s * s)),
        ("the scaling is applied twice in the norm", m / v(s * s).norm(dim=1) * path(s)),
    ]
    if W.shape[0] == W.shape[1]:  # these only run without a shape error on a square W
        mistakes[1:1] = [
            (_DORA_AXIS, m / v(s).norm(dim=0) * path(s)),
            (_DORA_BROADCAST, x @ ((m / rows)[None, :] * v(s)).T),
            (
                "m scales the input columns (m * V broadcasts along V's last dimension): m has "
                "one entry per output row, m[:, None] * V / ||V||",
                x @ (m[None, :] * v(s) / rows[:, None]).T,
            ),
        ]
    return mistakes


def _dora_hint(out: torch.Tensor, layer: DoRALinear, x: torch.Tensor) -> str | None:
    W, A, B = layer.base.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    with torch.no_grad():
        mistakes = _dora_mistakes(x, W, A, B, layer.magnitude.detach(), layer.scaling)
    return next((hint for hint, wrong in mistakes if _close(out, wrong)), None)


@_safe
def check_dora_forward(fn: Callable) -> Feedback:
    """Exercise 8: fn(x, W, A, B, m, scaling) must equal lab.DoRALinear's forward (no bias)."""

    def run(layer: DoRALinear, x: torch.Tensor) -> tuple[object, Feedback | None]:
        W, A, B, m = layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude
        inputs = {"x": x, "W": W, "A": A, "B": B, "m": m}
        saved = {k: v.detach().clone() for k, v in inputs.items()}
        (out_f, in_f), r = W.shape, A.shape[0]
        shapes = (
            f"x is (..., in) = (..., {in_f}), W (out, in) = ({out_f}, {in_f}), A (r, in) = "
            f"({r}, {in_f}), B (out, r) = ({out_f}, {r}), m (out,) = ({out_f},): ΔW = "
            "scaling * B @ A is (out, in), and its norm is one per output row, norm(dim=1)"
        )
        hints = dict.fromkeys(("shape", "size", "dimension"), shapes)
        args = (x, W, A, B, m, layer.scaling)
        out, problem = _call(fn, "my_dora_forward", DORA_TODO, *args, hints=hints, call=DORA_CALL)
        if problem:
            return None, problem
        changed = [k for k, v in inputs.items() if not torch.equal(v.detach(), saved[k])]
        if changed:
            return None, _no(f"my_dora_forward changed {changed[0]} in place: a forward must not")
        want = x.new_empty(*x.shape[:-1], out_f)
        problem = _bad_tensor(out, "my_dora_forward", want, "like x and W")
        return (None, problem) if problem else (out, None)

    layer, x = _dora_case()
    with torch.no_grad():
        ref = layer(x)
    raw, problem = run(layer, x)
    if problem:
        return problem
    out = raw.detach()
    if not _close(out, ref):
        hint = _dora_hint(out, layer, x) or (
            "compare with y = m / ||W + scaling · B A|| * (x Wᵀ + scaling · x Aᵀ Bᵀ), the norm "
            "taken per output row, (W + scaling * B @ A).norm(dim=1)"
        )
        return _no(f"your output differs from lab.DoRALinear's {_where(out - ref)}: {hint}")

    # Training needs the gradient to reach m, A and B through the output.
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    (want_m,) = torch.autograd.grad((layer(x) * weights).sum(), (layer.magnitude,))
    if not raw.requires_grad:
        return _no(
            "your output carries no gradient, so training would never change m, A or B: do not "
            "compute it under torch.no_grad() or detach it"
        )
    params = (layer.magnitude, layer.lora_A, layer.lora_B)
    got = torch.autograd.grad((raw * weights).sum(), params, allow_unused=True)
    if got[0] is None or not _close(got[0], want_m):
        return _no(
            "the gradient reaching m through your output is wrong: use m as given "
            "(no .detach(), no copies of m)"
        )
    for name, g in zip(("A", "B"), got[1:], strict=True):
        if g is None:
            return _no(
                f"no gradient reaches {name} through your output: compute ΔW from A and B as "
                f"given (no .detach(), no copies of {name})"
            )

    # Another layer, not square: a function that hard-codes this layer's numbers shows it here.
    layer2, x2 = _dora_case(10, 6, 2, 8.0, seed=12)
    with torch.no_grad():
        ref2 = layer2(x2)
    out2, problem = run(layer2, x2)
    second = "on a second layer (in 10, out 6, rank 2, scaling 4)"
    if problem:
        return _no(f"{second}: {problem.message}")
    if not _close(out2.detach(), ref2):
        hint = _dora_hint(out2.detach(), layer2, x2) or (
            "your function is right for the first layer but not for this one: use its "
            "arguments (W, A, B, m, scaling), not fixed numbers"
        )
        return _no(f"{second}, your output differs {_where(out2.detach() - ref2)}: {hint}")
    return Feedback(
        True,
        "my_dora_forward equals lab.DoRALinear's forward on two layers (12 -> 12 and 10 -> 6), "
        "the gradient reaching m included: each output row i is rescaled by "
        "m[i] / ||row i of W + scaling · B A||, so m sets the length of every row of the "
        "adapted weight and W + ΔW only its direction. With m = ||W + ΔW|| it is LoRA again.",
    )
