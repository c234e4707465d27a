"""Exercise 6: predicting the gradient and optimizer bytes LoRA saves over full fine-tuning."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ..base import load_base_model
from ..memory import analytic_memory, format_bytes, measure_step_memory
from ..model import get_preset
from ..surgery import add_lora
from .feedback import Feedback, _no, _safe

__all__ = [
    "check_memory",
]


MEMORY_TARGETS, MEMORY_RANK = ("q_proj", "v_proj"), 8  # exercise 6's LoRA setting


@functools.cache
def _state_bytes() -> dict[str, dict[str, int]]:
    """Gradient + AdamW bytes, analytic and measured (one real CPU step), full and LoRA."""
    config = get_preset("cpu")
    out: dict[str, dict[str, int]] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (4, 19), generator=g)
    y = torch.randint(0, config.vocab_size, (4, 19), generator=g)
    for kind, targets in (("full", None), ("lora", MEMORY_TARGETS)):
        rank = MEMORY_RANK if targets else 0
        predicted = analytic_memory(config, 4, 19, lora_targets=targets, lora_rank=rank)
        torch.manual_seed(0)
        model = load_base_model("cpu").train()
        if targets:
            add_lora(model, targets, rank=MEMORY_RANK)
        params = [p for p in model.parameters() if p.requires_grad]
        measured = measure_step_memory(model, x, y, torch.optim.AdamW(params, lr=1e-3))
        out[kind] = {
            "trainable": sum(p.numel() for p in params),
            "analytic": predicted.gradients + predicted.optimizer,
            "measured": measured.gradients + measured.optimizer,
        }
    return out


def _memory_mistakes(kind: str) -> list[tuple[str, float]]:
    """(hint, the bytes that mistake predicts) for `kind`, in the order they are tried."""
    config = get_preset("cpu")
    d, f, n, v, t = (
        config.d_model,
        config.d_ff,
        config.n_layers,
        config.vocab_size,
        config.max_seq_len,
    )
    if kind == "lora":
        one = n * MEMORY_RANK * 2 * d  # one 128 -> 128 target, both blocks
        return [
            (
                "that is half the adapters: LoRA here is on q and v, in both blocks, each "
                "with A (r x in) and B (out x r)",
                12 * one,
            ),
            ("that is LoRA on q, k, v and o: this setting adapts q and v only", 12 * 4 * one),
            (
                "that is LoRA on all six projections: this setting adapts q and v only",
                12 * n * MEMORY_RANK * (4 * 2 * d + 2 * (d + f)),
            ),
        ]
    linear = 4 * d * d + 2 * d * f  # one block's q, k, v, o, up and down (no biases)
    norms = 2 * 2 * d  # one block's two LayerNorms, a weight and a bias each
    n_full = v * d + t * d + n * (linear + norms) + 2 * d  # + the final LayerNorm
    return [
        (
            "the output head is counted twice: it shares its weight with the token embedding "
            "(weight tying), so the model holds that matrix once",
            12 * (n_full + v * d),
        ),
        (
            "both embeddings are left out: the token embedding (64 x 128, which the output "
            "head shares) and the position embedding (32 x 128) train too",
            12 * (n_full - v * d - t * d),
        ),
        ("the token embedding (64 x 128, shared with the head) is left out", 12 * (n_full - v * d)),
        ("the position embedding (32 x 128) is left out", 12 * (n_full - t * d)),
        (
            "that counts only the blocks' linear layers: the embeddings and the LayerNorms "
            "(a weight and a bias each) train too",
            12 * n * linear,
        ),
        (
            "the LayerNorms are left out: two per block and a final one, a weight and a bias "
            "each, 128 values apiece",
            12 * (n_full - n * norms - 2 * d),
        ),
        ("that is one block's worth of the blocks: the base has 2", 12 * (n_full - linear - norms)),
    ]


def _bytes_hint(kind: str, guess: float, n: int, n_frozen: int, swapped: bool) -> str:
    """Why a byte count is off: a known mistake's value, or its value per parameter."""
    if swapped:
        return "that is the other prediction's value: are FULL_BYTES and LORA_BYTES swapped?"
    # A known slip is an exact count: only the same number (to the byte) names it.
    matches = [h for h, v in _memory_mistakes(kind) if guess == v]
    per = guess / n
    known = {
        4: "that is the gradients alone: AdamW also keeps two moments per parameter",
        8: "one fp32 value per parameter is missing: a gradient and two Adam moments",
        16: "you included the weights themselves: the question is gradients + optimizer state",
        24: "that is 8 bytes per value: the lab trains in float32, 4 bytes",
        1: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        3: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        6: "that is 2 bytes per value: the lab trains in float32, 4 bytes",
    }
    per_hint = next((h for v, h in known.items() if math.isclose(per, v, rel_tol=0.02)), None)
    if matches and per_hint and kind == "full":  # one number, two explanations: say both
        return f"{matches[0]} (or {per_hint})"
    # LoRA is checked after full fine-tuning passed, bytes per value and all: a LoRA number
    # that is off is off in what it counts.
    if hint := (matches[0] if matches else per_hint):
        return hint
    if n_frozen and math.isclose(guess / (n + n_frozen), 12, rel_tol=0.05):
        return "you counted the frozen base too: only A and B get gradients and Adam moments"
    want = 12 * n
    for unit, size in (("KiB", 2**10), ("MiB", 2**20), ("kB", 1e3), ("MB", 1e6)):
        if math.isclose(guess * size, want, rel_tol=0.15):
            return f"that looks like {unit}: give bytes (multiply by {size:,.0f})"
    if guess < 1e4:
        return "that is very small: give bytes, not KiB or MiB"
    close = "close, but not exact: " if math.isclose(guess, want, rel_tol=0.15) else ""
    return (
        f"{close}count the trainable parameters exactly (every tensor that trains, each once), "
        "then 12 bytes each: a float32 gradient and two AdamW moments"
    )


@_safe
def check_memory(full_bytes: object, lora_bytes: object) -> Feedback:
    """Exercise 6: predicted bytes of gradients + AdamW state, full fine-tuning and LoRA, exact."""
    guesses = {"full": full_bytes, "lora": lora_bytes}
    for kind, guess in guesses.items():
        if guess is None:
            return _no(
                f"no prediction for {kind} yet: give a number of bytes for FULL_BYTES and "
                "LORA_BYTES (gradients + AdamW state on the 'cpu' preset)"
            )
        if isinstance(guess, torch.Tensor) and guess.numel() == 1 and not guess.is_complex():
            guess = guesses[kind] = guess.item()
        number = isinstance(guess, numbers.Real) and not isinstance(guess, bool)
        if not number or not math.isfinite(guess) or guess <= 0:
            return _no(f"the {kind} prediction should be a positive number of bytes: {guess!r}")
    state = _state_bytes()
    full, lora = state["full"], state["lora"]
    names = {"full": "full fine-tuning", "lora": f"LoRA r={MEMORY_RANK} on q, v"}
    for kind, guess in guesses.items():
        # The count is exact: each slip the exercise warns about moves it by a few percent.
        want = state[kind]["analytic"]
        if guess != want:
            n, frozen = state[kind]["trainable"], full["trainable"] - state[kind]["trainable"]
            other = "lora" if kind == "full" else "full"
            swapped = guess == state[other]["analytic"] and guesses[other] == want
            return _no(
                f"{names[kind]}: you predict {format_bytes(guess)} ({guess:,.0f} bytes), not "
                f"the lab's count: {_bytes_hint(kind, float(guess), n, frozen, swapped)}"
            )
    return Feedback(
        True,
        "exactly the lab's count on both. Gradients + AdamW state: full fine-tuning "
        f"{full['trainable']:,} x 12 bytes = {format_bytes(full['analytic'])} (measured "
        f"{format_bytes(full['measured'])}), LoRA {lora['trainable']:,} x 12 bytes = "
        f"{format_bytes(lora['analytic'])} (measured {format_bytes(lora['measured'])}): "
        f"{full['analytic'] / lora['analytic']:.0f} times less. The frozen weights and the "
        "activations are still there in both: LoRA saves only on what trains.",
    )
