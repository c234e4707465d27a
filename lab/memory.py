"""Where does training memory go? Measure one step, predict it from the config, count FLOPs.

Training memory has four big consumers, and LoRA shrinks only two of them:

- parameters: every weight, trainable or frozen (LoRA keeps the whole base model in memory);
- gradients: one value per *trainable* parameter;
- optimizer state: Adam keeps two moments per *trainable* parameter;
- activations: tensors the forward pass saves for the backward pass; they grow with batch size
  and sequence length, whatever is trainable.

`measure_step_memory` runs one real training step and measures these categories,
`analytic_memory` predicts them from a `ModelConfig` alone (so it works for GPT-3-sized configs),
and `flops_per_step` / `analytic_flops` do the same for compute.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lab.config import ALL_LINEAR
from lab.model import ModelConfig, lm_loss
from lab.step import training_step
from lab.text import format_bytes  # re-exported: lab.memory.format_bytes

__all__ = [
    "MemoryBreakdown",
    "analytic_flops",
    "analytic_memory",
    "flops_per_step",
    "format_bytes",
    "measure_step_memory",
]

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "other")
MIB = 2**20

# Layer shapes (in_features, out_features) as functions of (d_model, d_ff), by leaf name.
_LAYER_DIMS = {
    "q_proj": lambda d, f: (d, d),
    "k_proj": lambda d, f: (d, d),
    "v_proj": lambda d, f: (d, d),
    "o_proj": lambda d, f: (d, d),
    "up_proj": lambda d, f: (d, f),
    "down_proj": lambda d, f: (f, d),
}
# Optimizer state values kept per trainable parameter.
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}


@dataclass
class MemoryBreakdown:
    """Bytes used by one training step, by category.

    The categories are *footprints*: each one is what that category holds once it is complete —
    activations when the forward pass (and loss) ends, gradients when backward ends, optimizer
    state after `optimizer.step()`. `total` adds them up: the memory a steady-state training step
    needs when all of them are resident at once (optimizer state persists between steps).
    `peak` is the measured peak of the step's memory, and `at_peak` its breakdown at that moment
    (MemTracker only: the CUDA allocator cannot tell, so there `at_peak` is empty and `other` 0).
    On a first step `peak` can be below `total`: Adam creates its state lazily in `step()`,
    after backward has freed the activations.
    """

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    other: int = 0  # temporaries (e.g. gradients of activations) and buffers at the peak
    peak: int = 0
    method: str = ""
    device: str = ""
    at_peak: dict[str, int] = field(default_factory=dict)  # category -> bytes when peak was hit
    loss: float | None = None  # the step's loss, when a real step was run

    @property
    def total(self) -> int:
        """Sum of the categories."""
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_mib(self) -> dict[str, float]:
        """Categories, total and peak in MiB."""
        names = (*CATEGORIES, "total", "peak")
        return {name: getattr(self, name) / MIB for name in names}

    def to_dict(self) -> dict:
        """A plain dict (for JSON), including the total."""
        return {**asdict(self), "total": self.total}


def _storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind some tensors (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def measure_step_memory(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    autocast_dtype: torch.dtype | None = None,
) -> MemoryBreakdown:
    """Run ONE real training step (it updates the model) and measure its memory by category.

    Only what the step itself holds is counted: a batch that is a view of a larger tensor
    (`task.train_inputs[:64]`) is measured as if it were a copy of just those rows.
    """
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}"
            )
    if inputs.shape != targets.shape:
        raise ValueError(
            f"inputs and targets must have the same shape (batch, seq), "
            f"got {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    inputs, targets = _own_storage(inputs), _own_storage(targets)
    device = next(model.parameters()).device
    if device.type == "cuda":
        return _measure_cuda(model, inputs, targets, optimizer, autocast_dtype)
    return _measure_mem_tracker(model, inputs, targets, optimizer, autocast_dtype)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if its storage holds just its own values, else a compact copy.

    The CPU tracker files whole storages, so a slice of a 20,000-example data set saved by the
    embedding for backward would count the entire data set as activations. On CUDA the
    allocator only sees new allocations, but a compact batch keeps both paths measuring the same.
    """
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _NoHook:
    """Stands in for a hook handle: removing it does nothing."""

    def remove(self) -> None:
        pass


def _measure_mem_tracker(model, inputs, targets, optimizer, autocast_dtype) -> MemoryBreakdown:
    # MemTracker is a private PyTorch API (hence the pinned torch version, and a test): a
    # TorchDispatchMode that sees every tensor created inside it and files its storage under
    # Parameter, Buffer, Gradient, Activation (forward), Temp (new tensors in backward),
    # Optstate (anything made inside optimizer.step()) or Other. Errors are not swallowed.
    from torch.distributed._tools.mem_tracker import MemTracker

    device = next(model.parameters()).device

    def snapshot(mt: MemTracker, kind: str = "current") -> dict[str, int]:
        # Keys are str-Enums whose hash is not the string's: convert them to plain names.
        snap = mt.get_tracker_snapshot(kind).get(device, {})
        return {getattr(k, "value", k): v for k, v in snap.items()}

    tracker = MemTracker()
    # MemTracker hooks every parameter to see its gradient, and registering a hook on a frozen
    # parameter (LoRA's base weights) raises. Mark those as already hooked, with handles that do
    # nothing, so the tracker skips them: they never get a gradient anyway.
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, optimizer)  # tensors that exist before the step
    snaps: dict[str, dict[str, int]] = {}
    with tracker as mt:
        # The lab's own training step, observed between its phases. On a first step AdamW
        # creates exp_avg and exp_avg_sq inside optimizer.step().
        loss = training_step(
            model, inputs, targets, optimizer, autocast_dtype,
            observe=lambda phase: snaps.__setitem__(phase, snapshot(mt)),
        )  # fmt: skip
        peak = snapshot(mt, "peak")
    loss_value = loss.item()
    after_forward, after_backward, after_step = snaps["forward"], snaps["backward"], snaps["step"]

    names = {
        "Parameter": "parameters",
        "Gradient": "gradients",
        "Optstate": "optimizer",
        "Activation": "activations",
        "Temp": "temp",
        "Buffer": "buffers",
        "Other": "other",
    }
    return MemoryBreakdown(
        parameters=after_forward.get("Parameter", 0),
        gradients=after_backward.get("Gradient", 0),
        optimizer=after_step.get("Optstate", 0),
        activations=after_forward.get("Activation", 0),
        other=sum(peak.get(k, 0) for k in ("Temp", "Buffer", "Other")),
        peak=peak.get("Total", 0),
        method=f"MemTracker ({device.type})",
        device=str(device),
        at_peak={names[k]: v for k, v in peak.items() if k in names},
        loss=loss_value,
    )


def _measure_cuda(model, inputs, targets, optimizer, autocast_dtype) -> MemoryBreakdown:
    # The CUDA caching allocator counts every byte handed out, but not what a tensor is *for*:
    # parameters, gradients and optimizer state are summed from the tensors themselves, and
    # activations are what the allocator grew by over the forward pass (under autocast that
    # includes the low-precision copies of the weights it makes and keeps for backward).
    device = next(model.parameters()).device
    params = list(model.parameters())
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before_forward = torch.cuda.memory_allocated(device)
    # Memory that is not this model's (another model in the notebook, say) is left out of peak.
    ours = _storage_bytes([*params, *(p.grad for p in params), *_optimizer_tensors(optimizer)])
    unrelated = max(0, before_forward - ours)
    seen: dict[str, int] = {}

    def observe(phase: str) -> None:
        if phase == "forward":
            seen["activations"] = torch.cuda.memory_allocated(device) - before_forward
        elif phase == "backward":
            seen["gradients"] = _storage_bytes(p.grad for p in params)
        else:
            seen["optimizer"] = _storage_bytes(_optimizer_tensors(optimizer))

    loss = training_step(model, inputs, targets, optimizer, autocast_dtype, observe=observe)
    loss_value = loss.item()
    activations, gradients = seen["activations"], seen["gradients"]
    optimizer_bytes = seen["optimizer"]
    torch.cuda.synchronize(device)
    return MemoryBreakdown(
        parameters=_storage_bytes(params),
        gradients=gradients,
        optimizer=optimizer_bytes,
        activations=activations,
        peak=torch.cuda.max_memory_allocated(device) - unrelated,
        method="torch.cuda allocator (peak = max_memory_allocated; activations = forward growth)",
        device=str(device),
        loss=loss_value,
    )


def _as_targets(lora_targets: str | Iterable[str] | None) -> tuple[str, ...]:
    if isinstance(lora_targets, str):
        lora_targets = (lora_targets,)
    targets = tuple(lora_targets or ())
    if targets == (ALL_LINEAR,):  # every linear of the toy's blocks
        return ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    return targets


def _lora_params(config: ModelConfig, targets: Iterable[str], rank: int) -> int:
    unknown = set(targets) - set(_LAYER_DIMS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; valid: {sorted(_LAYER_DIMS)}")
    per_layer = sum(rank * sum(_LAYER_DIMS[t](config.d_model, config.d_ff)) for t in targets)
    return config.n_layers * per_layer


def _base_params(config: ModelConfig) -> int:
    d, f = config.d_model, config.d_ff
    per_layer = 4 * d * d + 2 * d * f + 2 * (2 * d)  # q/k/v/o, up/down, two LayerNorms
    if config.bias:
        per_layer += 4 * d + f + d
    # tok_emb (tied with the head: counted once), pos_emb, blocks, final LayerNorm
    return config.vocab_size * d + config.max_seq_len * d + config.n_layers * per_layer + 2 * d


def analytic_memory(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    *,
    lora_targets: str | Iterable[str] | None = None,
    lora_rank: int = 0,
    param_bytes: int = 4,
    optimizer: str = "adamw",
) -> MemoryBreakdown:
    """Predict one training step's memory from the config alone (no model is built).

    - parameters: all base weights at `param_bytes` each, plus fp32 LoRA factors,
      rank * (in + out) per adapted layer;
    - gradients: 4 bytes (fp32) per trainable parameter: all of them for full fine-tuning,
      only the LoRA factors with `lora_targets` (fp32 training, or mixed precision's fp32 master
      gradients; PyTorch gives a bf16 weight a bf16 gradient);
    - optimizer: 4 bytes per state value per trainable parameter: 2 values for Adam/AdamW,
      1 for "sgd_momentum", 0 for plain "sgd";
    - activations: an estimate of the values per token that the forward saves for backward,
      at `param_bytes` each (dropout 0, so no masks). Every layer keeps its two LayerNorm
      inputs (2*d), q, k, v and the attention output (4*d), and the GELU's input (d_ff). A linear
      layer also keeps its input, but only if its weight gets a gradient (a frozen weight needs
      none): the first LayerNorm's output d for q/k/v, the second's d for up_proj, the GELU's
      output d_ff for down_proj; a LoRA layer keeps x @ A^T (rank). So full fine-tuning keeps
      8*d + 2*d_ff per layer and LoRA on q, v keeps 7*d + d_ff + 2*rank. After the layers: the
      final LayerNorm's input d (and its output d, the head's input, if the head is trained),
      and the log-softmax of the logits, vocab values in fp32 (lm_loss computes the loss in fp32;
      the logits themselves are not kept). Small items (LayerNorm statistics, attention's
      log-sum-exp) are left out, and with LoRA the first layer saves a little less than this.

    `peak` is set to `total`, everything resident at once, as in steady-state training.
    """
    tokens = batch_size * seq_len
    targets = _as_targets(lora_targets)
    if targets and lora_rank < 1:
        raise ValueError("lora_targets need lora_rank >= 1")
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {sorted(_OPTIMIZER_STATES)}")

    base = _base_params(config)
    lora = _lora_params(config, targets, lora_rank) if targets else 0
    trainable = lora if targets else base

    d, f, v = config.d_model, config.d_ff, config.vocab_size
    trained = set(targets) if targets else set(_LAYER_DIMS)  # linears whose weight is trained
    per_layer = 2 * d + 4 * d + f  # LayerNorm inputs, q/k/v + attention output, GELU input
    per_layer += d * bool(trained & {"q_proj", "k_proj", "v_proj"})  # ln_1 output
    per_layer += d * ("up_proj" in trained) + f * ("down_proj" in trained)
    per_layer += lora_rank * len(targets)
    final = d if targets else 2 * d  # ln_f's input, and its output if the head is trained
    act_values = tokens * (config.n_layers * per_layer + final)
    activations = act_values * param_bytes + tokens * v * 4

    result = MemoryBreakdown(
        parameters=base * param_bytes + lora * 4,
        gradients=trainable * 4,
        optimizer=trainable * 4 * _OPTIMIZER_STATES[optimizer],
        activations=activations,
        method="analytic",
        device="any",
    )
    result.peak = result.total
    return result


def flops_per_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward and one backward pass, counted by FlopCounterMode.

    Only matmul-like ops are counted, as usual (on CPU that means the linear layers: PyTorch's
    fused CPU attention kernel is not in FlopCounterMode's table; on CUDA attention is counted).
    The model is left as it was: no optimizer step, and every parameter's .grad is restored.
    """
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None  # so backward does not accumulate into a caller's gradient
    try:
        with FlopCounterMode(display=False) as forward:
            logits = model(inputs)
        loss = lm_loss(logits, targets)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def analytic_flops(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    *,
    lora_targets: str | Iterable[str] | None = None,
    lora_rank: int = 0,
) -> dict[str, int]:
    """Predict one forward+backward pass's matmul FLOPs from the config alone.

    Forward: 2 FLOPs (a multiply and an add) per weight per token for every matmul weight: the
    blocks' linears and the head (embedding lookups are free), plus LoRA's x @ A^T @ B^T.
    Full fine-tuning's backward costs twice the forward, one matmul for the input's gradient and
    one for the weight's: the "6 * N * tokens" rule. With LoRA a frozen weight needs no gradient,
    so a linear layer costs one matmul in backward (the gradient has to flow through it to the
    adapters earlier in the network), and none at all where no adapter comes earlier: the first
    layer's q/k/v, whose input comes from the frozen embeddings.
    Attention's two T x T products (4*T*d per token per layer, small while T << d) are left out,
    as in the 6*N rule; FlopCounterMode does not see PyTorch's fused CPU attention kernel either,
    so on CPU this matches flops_per_step exactly.
    """
    tokens = batch_size * seq_len
    d, f = config.d_model, config.d_ff
    targets = _as_targets(lora_targets)
    matmul_weights = config.n_layers * (4 * d * d + 2 * d * f) + config.vocab_size * d
    if not targets:
        forward = 2 * matmul_weights * tokens
        return {"forward": forward, "backward": 2 * forward, "total": 3 * forward}

    forward = 2 * tokens * (matmul_weights + _lora_params(config, targets, lora_rank))
    backward = 2 * tokens * config.vocab_size * d  # the frozen head: its input's gradient
    # Where each linear sits in a block: q/k/v read the same input, then o, up, down follow.
    stage = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "up_proj": 2, "down_proj": 3}
    for layer in range(config.n_layers):
        for name, dims in _LAYER_DIMS.items():
            d_in, d_out = dims(d, f)
            # The embeddings are frozen: in the first layer an input needs a gradient only if
            # an adapter comes earlier in the same block.
            if layer > 0 or any(stage[t] < stage[name] for t in targets):
                backward += 2 * tokens * d_in * d_out
                backward += 2 * tokens * lora_rank * d_in * (name in targets)  # through A
            if name in targets:  # gradients of A and B, and the gradient flowing into B
                backward += 2 * tokens * lora_rank * (d_in + 2 * d_out)
    return {"forward": forward, "backward": backward, "total": forward + backward}
