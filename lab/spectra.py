"""Spectra of fine-tuned weights: intruder dimensions, energy rank and amplification.

Three ways to look at what fine-tuning did to a weight matrix, each from the singular value
decomposition (computed in float64 on the CPU, so rounding never decides a count):

- Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence"): top singular vectors of the tuned weight that resemble no singular vector of
  the pretrained one. LoRA tends to create them, full fine-tuning much less; scaling them down
  recovers some of what the model forgot (`scale_intruders`, `scale_model_intruders`).
- Energy rank (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"): how many directions
  the update ΔW needs to hold most of its squared Frobenius norm (`energy_rank`).
- Amplification (Hu et al. 2021, section 7.3): how strongly ΔW amplifies directions that W
  holds only weakly (`amplification_factor`).

Models are compared layer by layer over the linears of the transformer blocks
(`BLOCK_LINEARS`), using the weight each layer effectively applies (`effective_weight`), so a
full fine-tune, a merged or unmerged adapter, DoRA and a 4-bit base are all read alike.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import nn

from .analysis import rank_for_energy, singular_values
from .frozen import frozen_weight, is_frozen_linear
from .lora import LoRALinear
from .quant import dense_linear

__all__ = [
    "BLOCK_LINEARS",
    "amplification_factor",
    "effective_weight",
    "energy_rank",
    "intruder_counts",
    "intruder_dimensions",
    "intruder_similarities",
    "layer_spectra",
    "scale_intruders",
    "scale_model_intruders",
]

# The linears of every lab.ToyTransformer block, as paths inside `blocks.{i}`.
BLOCK_LINEARS = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# ---------------------------------------------------------------------------------------------
# Validation: everything is checked before anything is computed
# ---------------------------------------------------------------------------------------------


def _matrix(name: str, value: object) -> torch.Tensor:
    """`value` as a detached float64 CPU matrix, or an error naming `name` and what is valid."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (out, in), got {type(value).__name__}")
    if value.ndim != 2 or value.numel() == 0:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}: expected a non-empty 2-D (out, in) matrix"
        )
    if value.is_meta:
        raise ValueError(f"{name} is on the meta device (shapes only): expected values")
    if value.is_complex():
        raise ValueError(f"{name} is complex ({value.dtype}): expected a real matrix")
    if not value.is_floating_point():  # a result cast back to it would be truncated
        raise TypeError(f"{name} has dtype {value.dtype}: expected a floating-point weight matrix")
    m = value.detach().to("cpu", torch.float64)
    bad = int((~torch.isfinite(m)).sum())
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite entries (nan or inf): expected finite values"
        )
    return m


def _pair(w_before: object, w_after: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both matrices in float64, refused unless they have the same shape."""
    before, after = _matrix("w_before", w_before), _matrix("w_after", w_after)
    if before.shape != after.shape:
        raise ValueError(
            f"w_before has shape {tuple(before.shape)} but w_after has {tuple(after.shape)}: "
            "expected the same layer before and after fine-tuning (same shape)"
        )
    return before, after


def _check_top_k(top_k: object, limit: int, where: str = "the matrices") -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if not 1 <= top_k <= limit:
        raise ValueError(
            f"top_k={top_k}: expected an int in [1, {limit}] (min(out, in) of {where})"
        )


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_threshold(threshold: object) -> None:
    t = _real("threshold", threshold)
    if not 0.0 < t <= 1.0:  # also refuses nan
        raise ValueError(
            f"threshold={threshold!r}: expected a cosine similarity in (0, 1] (the paper and "
            "PEFT use 0.5)"
        )


def _check_factor(factor: object) -> None:
    f = _real("factor", factor)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(
            f"factor={factor!r}: expected a finite number >= 0 (0 removes the intruder "
            "dimensions, 1 keeps them, between shrinks them)"
        )


def _check_fraction(fraction: object) -> None:
    f = _real("fraction", fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a share of the energy in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Intruder dimensions of one matrix
# ---------------------------------------------------------------------------------------------


def _svd_cosines(
    before: torch.Tensor, after: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """after's SVD (U, S, Vh) and, for its top_k left singular vectors, the largest |cos| each
    has with any left singular vector of before (all min(out, in) of them)."""
    u_before = torch.linalg.svd(before, full_matrices=False).U
    u, s, vh = torch.linalg.svd(after, full_matrices=False)
    # Singular vectors have unit norm, so the entries of U_afterᵀ U_before are the cosines;
    # the sign of a singular vector is arbitrary, hence the absolute value.
    return u, s, vh, (u[:, :top_k].T @ u_before).abs().amax(dim=1)


def intruder_similarities(
    w_before: torch.Tensor, w_after: torch.Tensor, top_k: int = 10
) -> list[float]:
    """For each of w_after's top_k left singular vectors, its largest |cos| with any of w_before's.

    A value near 1: the direction was already in the pretrained weight (perhaps stretched).
    A value near 0: a new direction, an intruder (see `intruder_dimensions`). Largest singular
    value first; w_before's singular vectors are all min(out, in) of them, not only its top ones.
    """
    before, after = _pair(w_before, w_after)
    _check_top_k(top_k, min(after.shape))
    return _svd_cosines(before, after, top_k)[3].tolist()


def intruder_dimensions(
    w_before: torch.Tensor, w_after: torch.Tensor, top_k: int = 10, threshold: float = 0.5
) -> int:
    """How many of w_after's top_k left singular vectors are intruders: |cos| < threshold with all.

    Shuttleworth et al. 2024 call a singular vector of the fine-tuned weight an intruder
    dimension when its absolute cosine similarity with every singular vector of the pretrained
    weight is below a threshold. As in PEFT's `reduce_intruder_dimension` (the definition this
    follows, with its defaults top_k=10 and threshold=0.5): left singular vectors (the output
    side, columns of U), the top_k of w_after against all min(out, in) of w_before, strict
    `<`. w_before and w_after: the same (out, in) layer before and after fine-tuning.
    """
    before, after = _pair(w_before, w_after)
    _check_top_k(top_k, min(after.shape))
    _check_threshold(threshold)
    return int((_svd_cosines(before, after, top_k)[3] < threshold).sum())


def scale_intruders(
    w_before: torch.Tensor,
    w_after: torch.Tensor,
    factor: float,
    top_k: int = 10,
    threshold: float = 0.5,
) -> torch.Tensor:
    """w_after with the singular values of its intruder dimensions multiplied by `factor`.

    With w_after = Σ sᵢ uᵢ vᵢᵀ and I its intruders (as `intruder_dimensions` finds them), returns
    w_after + (factor - 1) Σ_{i∈I} sᵢ uᵢ vᵢᵀ: 0 removes them, 1 changes nothing. PEFT's
    `mitigation_lambda` (default 0.75) is this factor: its code forms the same W + ΔW +
    (λ - 1)·intruders, then refactors the new ΔW into an adapter of the old rank (exact only
    when that rank is full). The other singular triplets are untouched. Returned in w_after's
    dtype and device.
    """
    before, after = _pair(w_before, w_after)
    _check_top_k(top_k, min(after.shape))
    _check_threshold(threshold)
    _check_factor(factor)
    u, s, vh, cos = _svd_cosines(before, after, top_k)
    idx = torch.nonzero(cos < threshold).flatten()
    if len(idx) == 0 or factor == 1:
        return w_after.detach().clone()
    intruders = (u[:, idx] * s[idx]) @ vh[idx]
    scaled = after + (float(factor) - 1.0) * intruders
    return scaled.to(dtype=w_after.dtype, device=w_after.device)


# ---------------------------------------------------------------------------------------------
# Energy rank and amplification of an update ΔW
# ---------------------------------------------------------------------------------------------


def energy_rank(delta: torch.Tensor, fraction: float = 0.9) -> int:
    """The smallest rank whose top singular values hold `fraction` of ‖delta‖_F².

    Biderman et al. 2024 find that full fine-tuning's ΔW needs a rank 10-100 times the usual
    LoRA ranks to reach 90%. Built on `lab.analysis.singular_values` and `rank_for_energy`.
    """
    m = _matrix("delta", delta)
    _check_fraction(fraction)
    if not bool(m.any()):
        raise ValueError("delta is all zeros: it has no energy, so no rank holds a fraction of it")
    return rank_for_energy(singular_values(m), float(fraction))


def amplification_factor(w: torch.Tensor, delta: torch.Tensor, rank: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F, U and V the top-`rank` left and right singular vectors of ΔW.

    The LoRA paper's feature amplification factor (Hu et al. 2021, section 7.3 and Table 7):
    Uᵀ W V (rank x rank) is W projected onto ΔW's own rank-r subspace, what W already does in
    the directions ΔW changes. A large factor means ΔW amplifies directions W held only
    weakly; for GPT-3's W_q at layer 48 they report 6.91 / 0.32 ≈ 21.5 with a rank-4 adapter and
    3.57 / 1.90 ≈ 1.9 with a rank-64 one. The numerator is the whole ‖ΔW‖_F, as in the paper
    (for a LoRA update of rank <= `rank` that is also the norm of its rank-r part).
    Returns inf when W has nothing at all in ΔW's subspace.
    """
    w64, d64 = _matrix("w", w), _matrix("delta", delta)
    if w64.shape != d64.shape:
        raise ValueError(
            f"w has shape {tuple(w64.shape)} but delta has {tuple(d64.shape)}: expected ΔW of "
            "the same (out, in) layer"
        )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(d64.shape):
        raise ValueError(f"rank={rank}: expected an int in [1, {min(d64.shape)}] (min(out, in))")
    if not bool(d64.any()):
        raise ValueError("delta is all zeros: there is no update whose directions to compare")
    u, _, vh = torch.linalg.svd(d64, full_matrices=False)
    projected = float(torch.linalg.matrix_norm(u[:, :rank].T @ w64 @ vh[:rank].T))
    norm = float(torch.linalg.matrix_norm(d64))
    return math.inf if projected == 0 else norm / projected


# ---------------------------------------------------------------------------------------------
# Models: the linears of the transformer blocks, by the weight each effectively applies
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def effective_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear layer applies to its input, detached.

    nn.Linear: its weight. A 4-bit linear: its weight dequantised. An unmerged LoRA layer:
    W + scaling·B·A (DoRA: m·(W + ΔW)/‖W + ΔW‖ per row), i.e. `merged_weight()`; a merged one:
    what its base now holds. Dropout is not part of it (it acts only while training).
    """
    if isinstance(module, LoRALinear):
        weight = frozen_weight(module.base) if module.merged else module.merged_weight()
    elif is_frozen_linear(module):
        weight = frozen_weight(module)
    else:
        raise TypeError(
            f"expected a linear layer (nn.Linear, a 4-bit linear or a LoRA layer), "
            f"got {type(module).__name__}"
        )
    return weight.detach()


def _block_linears(model: object, what: str) -> dict[str, nn.Module]:
    """name -> module for the BLOCK_LINEARS of every block of a ToyTransformer-like model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch nn.Module, got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(
            f"{what} ({type(model).__name__}) has no `blocks` (a non-empty nn.ModuleList): "
            "expected a lab.ToyTransformer, with or without LoRA"
        )
    out = {}
    for i, block in enumerate(blocks):
        for path in BLOCK_LINEARS:
            name = f"blocks.{i}.{path}"
            try:
                module = block.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"{what} has no {name}: expected the linears {', '.join(BLOCK_LINEARS)} "
                    "in every block, as in a lab.ToyTransformer"
                ) from None
            if not (isinstance(module, LoRALinear) or is_frozen_linear(module)):
                raise TypeError(f"{what}.{name} is a {type(module).__name__}, not a linear layer")
            out[name] = module
    return out


def _paired_weights(
    base_model: nn.Module, tuned_model: nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (base weight, tuned effective weight) for every block linear, shapes checked."""
    if base_model is tuned_model:
        raise ValueError(
            "base_model and tuned_model are the same object: pass the model as it was before "
            "fine-tuning (load it again, or copy.deepcopy it before add_lora or training)"
        )
    base, tuned = (
        _block_linears(base_model, "base_model"),
        _block_linears(tuned_model, "tuned_model"),
    )
    if base.keys() != tuned.keys():
        raise ValueError(
            f"base_model has {len(base)} block linears and tuned_model {len(tuned)}: expected "
            "the same architecture (the same number of blocks)"
        )
    pairs = {}
    for name in base:
        wb, wt = effective_weight(base[name]), effective_weight(tuned[name])
        if wb.shape != wt.shape:
            raise ValueError(
                f"{name} is {tuple(wb.shape)} in base_model but {tuple(wt.shape)} in "
                "tuned_model: expected the same architecture"
            )
        for what, w in (("base_model", wb), ("tuned_model", wt)):
            if w.is_meta:
                raise ValueError(
                    f"{name} of {what} is on the meta device (shapes only): expected a model "
                    "with weights (lab.load_base_model(), or one trained)"
                )
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"{name} of {what} has non-finite weights (nan or inf)")
        pairs[name] = (wb, wt)
    return pairs


def _check_model_top_k(pairs: dict, top_k: object) -> None:
    limit = min(min(wt.shape) for _, wt in pairs.values())
    _check_top_k(top_k, limit, "the smallest block linear")


def intruder_counts(
    base_model: nn.Module, tuned_model: nn.Module, top_k: int = 10, threshold: float = 0.5
) -> dict[str, int]:
    """Intruder dimensions per block linear: {"blocks.0.attn.q_proj": n, ...}, in module order.

    tuned_model is base_model fine-tuned: fully (plain linears) or with LoRA layers (merged or
    not, any variant); each layer is read by the weight it effectively applies
    (`effective_weight`). Compare a 4-bit model with the 4-bit base it was tuned on, or its
    quantisation error counts as part of the change.
    """
    pairs = _paired_weights(base_model, tuned_model)
    _check_model_top_k(pairs, top_k)
    _check_threshold(threshold)
    return {name: intruder_dimensions(wb, wt, top_k, threshold) for name, (wb, wt) in pairs.items()}


@torch.no_grad()
def scale_model_intruders(
    base_model: nn.Module,
    tuned_model: nn.Module,
    factor: float,
    top_k: int = 10,
    threshold: float = 0.5,
) -> nn.Module:
    """A new plain model: tuned_model with the intruder dimensions of every block linear scaled.

    A deep copy of tuned_model in which every LoRA layer is folded into a plain nn.Linear (its
    effective weight) and every block linear's weight is replaced by `scale_intruders(base
    weight, tuned weight, factor, top_k, threshold)`. The copy starts from the tuned model, not
    the base, so factor=1 computes exactly what tuned_model does, also after full fine-tuning
    (which changed the embeddings and layer norms too). Neither input is changed. For
    evaluation (`lab.get_task(name).evaluate(model)`): its folded linears are frozen.
    """
    pairs = _paired_weights(base_model, tuned_model)
    _check_model_top_k(pairs, top_k)
    _check_threshold(threshold)
    _check_factor(factor)
    model = copy.deepcopy(tuned_model)
    # Fold every LoRA layer (inside the blocks or not) into a plain linear.
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        dense = dense_linear(layer.base, effective_weight(layer))
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, dense)
    for name, (wb, wt) in pairs.items():
        module = model.get_submodule(name)
        scaled = scale_intruders(wb, wt, factor, top_k, threshold)
        if isinstance(module, nn.Linear):
            module.weight.copy_(scaled.to(module.weight.dtype))
        else:  # a 4-bit linear has no weight to write into: a full-precision one takes its place
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, dense_linear(module, scaled))
    return model


def layer_spectra(
    base_model: nn.Module,
    tuned_model: nn.Module,
    rank: int | None = None,
    fraction: float = 0.9,
) -> list[dict]:
    """One row per compared block linear: ΔW's size, energy rank and amplification.

    Each row: layer, shape (out, in), weight_norm ‖W‖_F (the base), delta_norm ‖ΔW‖_F
    (ΔW = effective tuned weight - base weight), energy_rank (`energy_rank(ΔW, fraction)`),
    rank (the r used below), projected_norm ‖Uᵀ W V‖_F and amplification (see
    `amplification_factor`). An unchanged layer (ΔW = 0) gets energy_rank 0 and nan for
    projected_norm and amplification.

    rank=None takes each LoRA layer's own rank, and compares the layers that carry an adapter:
    a plain layer left untouched (k_proj beside a q,v adapter) has no row. A plain layer that
    did change (full fine-tuning) needs `rank` given; then every block linear gets a row.
    Print with `lab.analysis.format_table`.
    """
    pairs = _paired_weights(base_model, tuned_model)
    _check_fraction(fraction)
    tuned = _block_linears(tuned_model, "tuned_model")
    ranks = {}
    for name, (wb, wt) in pairs.items():
        adapter = isinstance(tuned[name], LoRALinear)
        if rank is None and not adapter:
            if torch.equal(wb.to("cpu", torch.float64), wt.to("cpu", torch.float64)):
                continue  # untouched, no adapter: nothing to compare
            raise ValueError(
                f"rank=None takes each LoRA layer's own rank, but {name} is a plain "
                f"{type(tuned[name]).__name__} whose weight changed (full fine-tuning): give "
                "rank=, e.g. rank=8"
            )
        r = tuned[name].rank if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"rank must be an int or None, got {r!r}")
        if not 1 <= r <= min(wt.shape):
            raise ValueError(
                f"rank={r}: expected an int in [1, {min(wt.shape)}] (min(out, in) of {name})"
            )
        ranks[name] = int(r)
    if not ranks:
        raise ValueError(
            "tuned_model has no LoRA layer and no block linear differs from base_model: there "
            "is no update to compare (pass the fine-tuned model)"
        )
    rows = []
    for name in ranks:
        wb, wt = pairs[name]
        w64 = wb.to("cpu", torch.float64)
        delta = wt.to("cpu", torch.float64) - w64
        row = {
            "layer": name,
            "shape": tuple(wb.shape),
            "weight_norm": float(torch.linalg.matrix_norm(w64)),
            "delta_norm": float(torch.linalg.matrix_norm(delta)),
            "rank": ranks[name],
        }
        if bool(delta.any()):
            amp = amplification_factor(w64, delta, ranks[name])
            row["energy_rank"] = energy_rank(delta, fraction)
            row["projected_norm"] = row["delta_norm"] / amp
            row["amplification"] = amp
        else:
            row.update(energy_rank=0, projected_norm=math.nan, amplification=math.nan)
        rows.append(row)
    return rows
