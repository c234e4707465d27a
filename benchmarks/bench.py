"""Benchmarks that measure the lab's claims about speed and memory, side by side.

Every comparison runs both sides in one process, in alternating rounds after a warm-up, and
reports medians and ratios next to the analytic limit. From the repository root:

    python -m benchmarks.bench                       # every benchmark -> benchmarks/results
    python -m benchmarks.bench qlora dora --quick    # a smoke run of two of them

writes JSON, a markdown report and plots; `python -m benchmarks.gpu` runs them at the GPU sizes.

- lora_vs_full: one training step of LoRA (q, v) against full fine-tuning across widths and
  ranks: time and measured peak memory, next to the FLOP ratio and the analytic bytes.
- qlora: LoRA's training step on an fp32, a bf16 and a packed NF4 (4-bit) frozen base across
  widths: time, measured weight bytes and peak memory, and the NF4 bits per weight measured
  next to the QLoRA paper's 4.127.
- dora: DoRA's training step against LoRA's at the same rank and targets across widths, next
  to the slowdown PEFT reports.
- layers: lab.LoRALinear against loralib.Linear and PEFT's LoRA Linear on identical weights:
  forward+backward time, and a check that the three give the same outputs.
- inference: base vs merged vs unmerged forward time, next to the unmerged FLOP share.
- growth: trainable parameters against model width and rank (exact counts), with measured memory.
- sweep: a grid trained one configuration after another against the same grid as sweep() trains
  it (in the chunk size lab.engine.calibrate measures fastest, timed), how the cost per
  configuration scales with the grid's size (sweep()'s default and every configuration forced
  into one step),
  the dropout masks' share of a batched step (exact vs fast draw), and a profile of a step.

Timings come from lab.analysis.time_calls (the calls take turns), every training step is
lab.step.training_step and every memory figure lab.measure_step_memory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common import describe_machine, machine
from lab.analysis import (
    _sync,
    count_full,
    count_lora,
    format_table,
    lora_flop_share,
    spread,
    time_calls,
)
from lab.base import load_base_model
from lab.config import LoRAConfig
from lab.engine.batched import (
    DROPOUT_DRAWS,
    AdapterSpec,
    BatchedTrainer,
    train_batched,
)
from lab.engine.calibrate import measure
from lab.engine.devices import free_memory
from lab.engine.plan import FREE_FRACTION, static_chunk
from lab.fileio import atomic_write_bytes
from lab.lora import LoRALinear
from lab.memory import (
    MIB,
    MemoryBreakdown,
    analytic_flops,
    analytic_memory,
    measure_step_memory,
)
from lab.model import ModelConfig, ToyTransformer, get_preset
from lab.quant import DQ_BLOCK_SIZE, Linear4bit, quantize_base
from lab.step import autocast_dtype, make_optimizer, training_step
from lab.surgery import add_lora, count_parameters, merge_lora
from lab.sweeps import check_writable_dir, resolve_device
from lab.tasks import SEQ_LEN, get_task
from lab.training import plan_memory, train

__all__ = [
    "BENCHMARKS",
    "EXTRA",
    "PEFT_DORA_SLOWDOWN",
    "QUICK",
    "bench_dora",
    "bench_growth",
    "bench_inference",
    "bench_layers",
    "bench_lora_vs_full",
    "bench_qlora",
    "bench_sweep",
    "bench_throughput",
    "main",
    "markdown",
    "nf4_bits_per_weight",
    "plots",
    "run_all",
    "width_config",
    "write_results",
]

TARGETS = ("q_proj", "v_proj")


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _median(seconds: Sequence[float]) -> float:
    return statistics.median(seconds)


def _iqr(seconds: Sequence[float]) -> float:
    lo, hi = spread(seconds)  # the quartiles (min and max below 4 timings)
    return hi - lo


def width_config(d_model: int, n_layers: int = 2) -> ModelConfig:
    """The lab's CPU model at another width: d_ff = 4 d, heads of 32."""
    return get_preset(
        "cpu", d_model=d_model, d_ff=4 * d_model, n_heads=max(1, d_model // 32), n_layers=n_layers
    )


def _batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    task = get_task("sort_desc")
    x, y = task.train_inputs[:batch_size], task.train_targets[:batch_size]
    if len(x) < batch_size:
        raise ValueError(f"batch_size={batch_size}: the task has only {len(x)} examples")
    return x.to(device), y.to(device)


class _Trainer:
    """One model, the lab's AdamW, one fixed batch: a callable that runs lab.step.training_step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device):
        self.model, self.x, self.y = model.to(device).train(), x, y
        self.optimizer = make_optimizer(model, lr=1e-5)
        self.dtype = autocast_dtype(device)  # bf16 autocast on CUDA, fp32 elsewhere

    def __call__(self) -> None:
        training_step(self.model, self.x, self.y, self.optimizer, self.dtype)

    def memory(self) -> MemoryBreakdown:
        """One steady-state step (Adam's state already exists) measured by category."""
        return measure_step_memory(self.model, self.x, self.y, self.optimizer, self.dtype)

    def peak_bytes(self) -> int:
        """Measured peak of one steady-state step."""
        return self.memory().peak


def _pair(
    config: ModelConfig, ranks: Sequence[int], alpha: float, device: torch.device
) -> dict[str, nn.Module]:
    """Full fine-tuning and LoRA models on the same random base: 'full', 'r1', 'r8', ...

    Built on `device` directly: initialising a billion-parameter model on a host CPU would
    take longer than the GPU benchmark it serves."""
    torch.manual_seed(0)
    with device:
        full = ToyTransformer(config)
    models: dict[str, nn.Module] = {"full": full}
    for rank in ranks:
        model = copy.deepcopy(full)
        add_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS))
        models[f"r{rank}"] = model
    return models


# ---------------------------------------------------------------------------------------------
# 1. LoRA vs full fine-tuning: one training step across widths and ranks
# ---------------------------------------------------------------------------------------------


def bench_lora_vs_full(
    widths: Sequence[int] = (128, 256, 512, 1024),
    ranks: Sequence[int] = (1, 4, 8, 16, 64),
    rank_width: int = 512,
    rank: int = 8,
    alpha: float = 16.0,
    n_layers: int = 2,
    batch_size: int = 64,
    repeats: int = 11,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Step time and measured peak memory of LoRA (q, v) against full fine-tuning.

    The analytic time limit is the matmul FLOP ratio (LoRA's backward skips the frozen
    weights' gradients: about 2/3); full fine-tuning's optimizer step over every weight is not
    in it, so a measured ratio can land below it. The analytic memory is `analytic_memory`.
    """
    device = torch.device(device)
    x, y = _batch(batch_size, device)
    tokens = batch_size * x.shape[1]
    jobs = [(d, (rank,)) for d in widths]
    if rank_width is not None and ranks:
        jobs.append((rank_width, tuple(ranks)))
    width_rows, rank_rows = [], []
    for i, (d, job_ranks) in enumerate(tqdm(jobs, desc="lora vs full", disable=not progress)):
        config = width_config(d, n_layers)
        trainers = {
            k: _Trainer(m, x, y, device) for k, m in _pair(config, job_ranks, alpha, device).items()
        }
        times = time_calls(trainers, repeats, warmup=2, device=device)
        full_s = _median(times["full"])
        full_flops = analytic_flops(config, batch_size, x.shape[1])["total"]
        full_mem = analytic_memory(config, batch_size, x.shape[1])
        peaks = {k: t.peak_bytes() for k, t in trainers.items()}
        rows = []
        for r in job_ranks:
            key = f"r{r}"
            lora_flops = analytic_flops(
                config, batch_size, x.shape[1], lora_targets=TARGETS, lora_rank=r
            )["total"]
            lora_mem = analytic_memory(
                config, batch_size, x.shape[1], lora_targets=TARGETS, lora_rank=r
            )
            rows.append({
                "d_model": d,
                "rank": r,
                "parameters": count_parameters(trainers["full"].model).total,
                "trainable": count_parameters(trainers[key].model).trainable,
                "full_ms": 1e3 * full_s,
                "lora_ms": 1e3 * _median(times[key]),
                "full_iqr_ms": 1e3 * _iqr(times["full"]),
                "lora_iqr_ms": 1e3 * _iqr(times[key]),
                "time_ratio": _median(times[key]) / full_s,
                "flop_ratio": lora_flops / full_flops,
                "full_tokens_per_s": tokens / full_s,
                "lora_tokens_per_s": tokens / _median(times[key]),
                "full_peak_bytes": peaks["full"],
                "lora_peak_bytes": peaks[key],
                "memory_ratio": peaks[key] / peaks["full"],
                "full_analytic_bytes": full_mem.total,
                "lora_analytic_bytes": lora_mem.total,
            })  # fmt: skip
        (rank_rows if i == len(widths) else width_rows).extend(rows)
        del trainers
    return {
        "name": "lora_vs_full",
        "settings": {
            "widths": list(widths),
            "ranks": list(ranks),
            "rank_width": rank_width,
            "rank": rank,
            "alpha": alpha,
            "n_layers": n_layers,
            "batch_size": batch_size,
            "seq_len": SEQ_LEN,
            "repeats": repeats,
            "targets": list(TARGETS),
        },  # fmt: skip
        "widths": width_rows,
        "ranks": rank_rows,
    }


# ---------------------------------------------------------------------------------------------
# 1b. Throughput and model FLOPs utilisation (the GPU script's headline numbers)
# ---------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks from the vendors' data sheets, FLOP/s (no sparsity).
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12}  # fmt: skip


def peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak in FLOP/s if it is a GPU in PEAK_BF16_FLOPS, else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def bench_throughput(
    preset: str = "gpu",
    rank: int = 8,
    alpha: float = 16.0,
    batch_size: int = 512,
    repeats: int = 10,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Tokens per second, model FLOPs utilisation and peak memory of full fine-tuning and LoRA.

    Model FLOPs are each method's analytic matmul FLOPs per step (full: 6 N per token; LoRA:
    no weight gradients); MFU divides the achieved FLOP/s by the device's bf16 peak (CUDA only).
    """
    device = torch.device(device)
    config = get_preset(preset)
    x, y = _batch(batch_size, device)
    tokens = batch_size * x.shape[1]
    with tqdm(total=2, desc=f"throughput {preset}", disable=not progress) as bar:
        trainers = {
            k: _Trainer(m, x, y, device) for k, m in _pair(config, (rank,), alpha, device).items()
        }
        times = time_calls(trainers, repeats, warmup=3, device=device)
        bar.update(1)
        peaks = {k: t.peak_bytes() for k, t in trainers.items()}
        bar.update(1)
    peak = peak_flops(device)
    rows = []
    for key, label in (("full", "full fine-tuning"), (f"r{rank}", f"LoRA r{rank} (q, v)")):
        seconds = _median(times[key])
        lora = {} if key == "full" else {"lora_targets": TARGETS, "lora_rank": rank}
        flops = analytic_flops(config, batch_size, x.shape[1], **lora)["total"]
        rows.append({
            "method": label,
            "step_ms": 1e3 * seconds,
            "tokens_per_s": tokens / seconds,
            "model_flops_per_step": flops,
            "achieved_tflops": flops / seconds / 1e12,
            "mfu": None if peak is None else flops / seconds / peak,
            "peak_bytes": peaks[key],
            "trainable": count_parameters(trainers[key].model).trainable,
        })  # fmt: skip
    return {
        "name": "throughput",
        "settings": {
            "preset": preset,
            "config": config.to_dict(),
            "rank": rank,
            "alpha": alpha,
            "batch_size": batch_size,
            "seq_len": x.shape[1],
            "repeats": repeats,
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "peak_flops": peak,
        },  # fmt: skip
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# 2. One layer: lab.LoRALinear vs loralib vs PEFT
# ---------------------------------------------------------------------------------------------


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def _layer_implementations(
    base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rank: int, alpha: float
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """LoRA layers with identical weights: ours always, loralib and PEFT when installed."""
    d_in, d_out = base.in_features, base.out_features
    device = base.weight.device
    layers: dict[str, nn.Module] = {}
    versions = {"lab": "lab.LoRALinear"}
    ours = LoRALinear(copy.deepcopy(base), rank, alpha)
    layers["lab"] = ours
    loralib = _import("loralib")
    if loralib is not None:
        layer = loralib.Linear(d_in, d_out, r=rank, lora_alpha=alpha, merge_weights=False)
        with torch.no_grad():
            layer.weight.copy_(base.weight)
            layer.bias.copy_(base.bias)
        loralib.mark_only_lora_as_trainable(layer, bias="none")
        layers["loralib"] = layer.to(device)
        versions["loralib"] = getattr(loralib, "__version__", "installed")
    peft = _import("peft")
    if peft is not None:
        holder = nn.Module()
        holder.layer = copy.deepcopy(base)
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["layer"])
        holder = peft.inject_adapter_in_model(config, holder)
        layers["peft"] = holder.layer
        versions["peft"] = peft.__version__
    with torch.no_grad():  # the same A and B everywhere
        ours.lora_A.copy_(a)
        ours.lora_B.copy_(b)
        if "loralib" in layers:
            layers["loralib"].lora_A.copy_(a)
            layers["loralib"].lora_B.copy_(b)
        if "peft" in layers:
            layers["peft"].lora_A["default"].weight.copy_(a)
            layers["peft"].lora_B["default"].weight.copy_(b)
    return layers, versions


def bench_layers(
    d_model: int = 1024,
    rank: int = 8,
    alpha: float = 16.0,
    tokens: int = 2048,
    repeats: int = 30,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Forward+backward of one adapted linear layer (fp32), ours against loralib and PEFT."""
    device = torch.device(device)
    torch.manual_seed(0)
    base = nn.Linear(d_model, d_model).to(device)
    a = torch.randn(rank, d_model, device=device) / math.sqrt(d_model)
    b = torch.randn(d_model, rank, device=device) * 0.02  # nonzero: the update shows in outputs
    layers, versions = _layer_implementations(base, a, b, rank, alpha)
    x = torch.randn(tokens, d_model, device=device)
    with torch.no_grad():
        outputs = {k: layer(x) for k, layer in layers.items()}
    reference = outputs["lab"]
    scale = float(reference.abs().max())
    xg = x.clone().requires_grad_(True)  # an input that needs a gradient, as inside a network

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer(xg).sum().backward()
            for p in layer.parameters():
                p.grad = None
            xg.grad = None

        return run

    fns = {k: step(layer) for k, layer in layers.items()}
    with tqdm(total=1, desc="layers", disable=not progress) as bar:
        times = time_calls(fns, repeats, warmup=3, device=device)
        bar.update(1)
    rows = []
    for name in layers:
        rows.append({
            "implementation": name,
            "version": versions[name],
            "median_ms": 1e3 * _median(times[name]),
            "iqr_ms": 1e3 * _iqr(times[name]),
            "lab_ratio": _median(times["lab"]) / _median(times[name]),
            "max_abs_diff": float((outputs[name] - reference).abs().max()),
            "same_output": bool(
                torch.allclose(outputs[name], reference, rtol=1e-5, atol=1e-5 * scale)
            ),
            "trainable": sum(p.numel() for p in layers[name].parameters() if p.requires_grad),
        })  # fmt: skip
    missing = [n for n in ("loralib", "peft") if n not in layers]
    return {
        "name": "layers",
        "settings": {
            "d_model": d_model,
            "rank": rank,
            "alpha": alpha,
            "tokens": tokens,
            "repeats": repeats,
            "dtype": "float32",
        },  # fmt: skip
        "rows": rows,
        "missing": missing,
    }


# ---------------------------------------------------------------------------------------------
# 3. Inference: merged costs what the base costs
# ---------------------------------------------------------------------------------------------


def bench_inference(
    widths: Sequence[int] = (512, 1024),
    rank: int = 8,
    alpha: float = 16.0,
    n_layers: int = 2,
    batch_size: int = 64,
    repeats: int = 30,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Forward time of the base, the merged model and the unmerged (adapter-carrying) model."""
    device = torch.device(device)
    x, _ = _batch(batch_size, device)
    rows = []
    for d in tqdm(widths, desc="inference", disable=not progress):
        config = width_config(d, n_layers)
        torch.manual_seed(0)
        with device:
            base = ToyTransformer(config).eval()
        unmerged = copy.deepcopy(base)
        add_lora(unmerged, LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS))
        with torch.no_grad():  # a trained-looking adapter: B != 0, so merging changes W
            for p in unmerged.parameters():
                if p.requires_grad and p.dim() == 2 and p.shape[1] == rank:
                    p.normal_(0, 0.02)
        merged = copy.deepcopy(unmerged)
        merge_lora(merged)
        models = {"base": base, "merged": merged, "unmerged": unmerged.eval()}
        with torch.inference_mode():
            times = time_calls({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats, 3,
                               device)  # fmt: skip
            agree = float((merged(x) - unmerged(x)).abs().max())
        base_s = _median(times["base"])
        rows.append({
            "d_model": d,
            "rank": rank,
            "base_ms": 1e3 * base_s,
            "merged_ms": 1e3 * _median(times["merged"]),
            "unmerged_ms": 1e3 * _median(times["unmerged"]),
            "merged_ratio": _median(times["merged"]) / base_s,
            "unmerged_ratio": _median(times["unmerged"]) / base_s,
            "unmerged_flop_share": lora_flop_share(config, TARGETS, rank),
            "merged_vs_unmerged_max_abs_diff": agree,
        })  # fmt: skip
    return {
        "name": "inference",
        "settings": {
            "widths": list(widths),
            "rank": rank,
            "alpha": alpha,
            "n_layers": n_layers,
            "batch_size": batch_size,
            "repeats": repeats,
        },  # fmt: skip
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# 4. Cost growth: trainable parameters against width and rank
# ---------------------------------------------------------------------------------------------


def bench_growth(
    widths: Sequence[int] = (128, 256, 512, 1024, 2048, 4096, 8192, 12288),
    ranks: Sequence[int] = (1, 4, 8, 16, 64),
    n_layers: int = 2,
    lora_vs_full: dict | None = None,
) -> dict:
    """Exact parameter counts (meta device) for full fine-tuning and LoRA (q, v) per rank.

    Full fine-tuning grows with d^2, LoRA with r * d. Measured step memory comes from a
    lora_vs_full result when one is given.
    """
    rows = []
    for d in widths:
        config = width_config(d, n_layers)
        row = {"d_model": d, "parameters": count_full(config)}
        for r in ranks:
            if r <= d:
                row[f"r{r}_trainable"] = count_lora(config, r, TARGETS)[0]
        rows.append(row)
    measured = []
    for row in (lora_vs_full or {}).get("widths", []):
        measured.append({k: row[k] for k in ("d_model", "rank", "full_peak_bytes",
                                             "lora_peak_bytes", "full_analytic_bytes",
                                             "lora_analytic_bytes")})  # fmt: skip
    return {
        "name": "growth",
        "settings": {
            "widths": list(widths),
            "ranks": list(ranks),
            "n_layers": n_layers,
            "targets": list(TARGETS),
        },  # fmt: skip
        "rows": rows,
        "measured_memory": measured,
    }


# ---------------------------------------------------------------------------------------------
# 5. Sweeps: one after another vs batched
# ---------------------------------------------------------------------------------------------


def _alone(base: ToyTransformer, task, spec: AdapterSpec, steps, batch_size, device) -> float:
    """Train one configuration the way run_point does; the training loop's seconds."""
    model = copy.deepcopy(base)
    spec.add_to(model)
    result = train(model, task, steps, spec.lr, batch_size, spec.seed, device, progress=False,
                   measure_memory=False)  # fmt: skip
    return result.wall_seconds


def _profile(fn: Callable[[], object], device: torch.device, top: int = 8) -> list[dict]:
    """Where the time of fn() goes: the top operators by self time, and the rest."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0.0)) for e in prof.key_averages()]
    events = [(k, t) for k, t in events if t > 0 and not k.startswith("autograd::engine")]
    events.sort(key=lambda e: -e[1])
    total = sum(t for _, t in events) or 1.0
    rows = [{"op": k, "ms": t / 1e3, "share": t / total} for k, t in events[:top]]
    rest = sum(t for _, t in events[top:])
    rows.append({"op": "everything else", "ms": rest / 1e3, "share": rest / total})
    return rows


def _profile_steps(base, task, specs, batch_size, device, steps) -> dict[str, list[dict]]:
    """Profiles of `steps` training steps: the middle configuration alone, and all batched."""
    model = copy.deepcopy(base)
    specs[len(specs) // 2].add_to(model)
    x, y = task.train_inputs[:batch_size].to(device), task.train_targets[:batch_size].to(device)
    alone = _Trainer(model, x, y, device)
    batched = BatchedTrainer(base, task, specs, steps + 1, batch_size, device)  # + warm-up
    alone(), batched.step()  # warm-up, outside the profile

    def run(step: Callable[[], object]) -> Callable[[], None]:
        return lambda: [step() for _ in range(steps)]

    return {"alone": _profile(run(alone), device), "batched": _profile(run(batched.step), device)}


def _chunks(specs: Sequence[AdapterSpec], size: int) -> list[list[AdapterSpec]]:
    return [list(specs[i : i + size]) for i in range(0, len(specs), size)]


def _default_seconds(base, task, specs, chunk, steps, batch_size, device) -> float:
    """Train `specs` as sweep() does with chunk size `chunk`: units of one alone, else batched."""
    total = 0.0
    for c in _chunks(specs, chunk):
        if len(c) == 1:
            total += _alone(base, task, c[0], steps, batch_size, device)
        else:
            total += train_batched(base, task, c, steps, batch_size, device,
                                   progress=False).wall_seconds  # fmt: skip
    return total


def _mask_costs(base, task, specs, batch_size, device, steps, repeats) -> dict:
    """One batched step of every spec with exact and with fast dropout masks, and the masks alone.

    Steps: `repeats` interleaved rounds of `steps` steps of each draw. Masks: every adapted
    layer's `_dropped` on an input of its step's shape, timed in turns.
    """
    rounds = 1 + repeats  # time_calls warms each call up once, then times `repeats` turns
    trainers = {d: BatchedTrainer(base, task, specs, rounds * steps, batch_size, device,
                                  dropout_draw=d) for d in DROPOUT_DRAWS}  # fmt: skip
    step_s = time_calls({d: (lambda t=t: [t.step() for _ in range(steps)])
                         for d, t in trainers.items()}, repeats=repeats, device=device)  # fmt: skip
    layers = list(trainers["exact"].layers.values())
    fast_layers = list(trainers["fast"].layers.values())
    x = torch.randn(len(specs), batch_size, SEQ_LEN, layers[0].in_features, device=device)

    def masks(group):
        return lambda: [[layer._dropped(x) for layer in group] for _ in range(steps)]

    mask_s = time_calls({"exact": masks(layers), "fast": masks(fast_layers)},
                        repeats=repeats, device=device)  # fmt: skip
    out = {"configs": len(specs), "with_dropout": sum(s.dropout > 0 for s in specs)}
    for d in DROPOUT_DRAWS:
        out[f"{d}_step_ms"] = 1e3 * _median(step_s[d]) / steps
        out[f"{d}_mask_ms"] = 1e3 * _median(mask_s[d]) / steps
        out[f"{d}_mask_share"] = out[f"{d}_mask_ms"] / out[f"{d}_step_ms"]
    out["fast_step_speedup"] = out["exact_step_ms"] / out["fast_step_ms"]
    return out


def bench_sweep(
    task: str = "sort_desc",
    ranks: Sequence[int] = (1, 4, 8, 16),
    alphas: Sequence[float] = (8.0, 16.0),
    dropouts: Sequence[float] = (0.0, 0.1),
    steps: int = 100,
    batch_sizes: Sequence[int] = (64, 8),
    grid_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    profile_steps: int = 5,
    progress: bool = True,
) -> dict:
    """A rank x alpha x dropout grid trained one after another and as sweep() trains it, in turns.

    Training loops only (loading, evaluation and memory measurement excluded on both sides).
    For each batch size: the chunk size sweep() now chooses (`lab.engine.calibrate.measure`, run
    fresh here and timed; the user's remembered answers are neither read nor written) and the
    static rule's; the whole grid alone vs in those chunks (median of `repeats` alternating
    rounds); then, as the grid grows, alone vs sweep()'s default vs every configuration forced
    into one step; the cost of the dropout masks, exact vs fast; and a profile of one
    configuration alone and of the whole grid batched.
    """
    device = torch.device(device)
    base = load_base_model("cpu")
    the_task = get_task(task)
    specs = [
        AdapterSpec(LoRAConfig(rank=r, alpha=a, dropout=p, targets=TARGETS))
        for r in ranks
        for a in alphas
        for p in dropouts
    ]
    n = len(specs)
    rows, scaling, profiles, calibrations, masks = [], [], {}, [], []
    total = len(batch_sizes) * (2 + repeats + len(grid_sizes) + 1)
    bar = tqdm(total=total, desc="sweep bench", disable=not progress)
    for batch_size in batch_sizes:
        plan = plan_memory(base.config, batch_size, steps, [(s.targets, s.rank) for s in specs])
        free = free_memory(device)
        fits = max(1, plan.how_many_fit(4 << 30 if free is None else free, FREE_FRACTION))
        static = static_chunk(fits, batch_size, device)  # sweep()'s rule without measuring
        limit = min(n, fits)
        found = measure(specs, the_task, batch_size, device, limit, base=base)
        chunk = found.chunk  # what sweep() trains this grid in on this machine
        calibrations.append({"batch_size": batch_size, "chunk": chunk, "static_chunk": static,
                             "seconds": found.seconds, "rounds": found.rounds,
                             "steps": found.steps,
                             "ms_per_config_step": {str(k): v for k, v in
                                                    found.ms_per_config_step.items()}})  # fmt: skip
        bar.update(1)
        alone_s, default_s = [], []
        for _ in range(repeats):
            # Chunk by chunk, its configurations alone and then as sweep() trains them: a
            # machine whose speed drifts over minutes slows both sides alike.
            alone, together = 0.0, 0.0
            for c in _chunks(specs, chunk):
                alone += sum(_alone(base, the_task, s, steps, batch_size, device) for s in c)
                if chunk > 1:
                    together += _default_seconds(base, the_task, c, chunk, steps, batch_size,
                                                 device)  # fmt: skip
            alone_s.append(alone)
            default_s.append(together if chunk > 1 else alone)  # chunk 1: sweep() runs this loop
            bar.update(1)
        rows.append({
            "batch_size": batch_size,
            "configs": n,
            "chunk": chunk,
            "static_chunk": static,
            "steps": steps,
            "alone_s": _median(alone_s),
            "batched_s": _median(default_s),
            "speedup": _median(alone_s) / _median(default_s),
            "alone_noise": _iqr(alone_s) / _median(alone_s),
            "alone_ms_per_config_step": 1e3 * _median(alone_s) / (n * steps),
            "batched_ms_per_config_step": 1e3 * _median(default_s) / (n * steps),
        })  # fmt: skip
        for k in grid_sizes:
            # Past the grid's own size, the same settings again with further seeds. Each size is
            # timed next to the same configurations trained one after another.
            more = [dataclasses.replace(specs[i % n], seed=i // n) for i in range(k)]
            alone = sum(_alone(base, the_task, s, steps, batch_size, device) for s in more)
            run = train_batched(base, the_task, more, steps, batch_size, device,
                                progress=False)  # fmt: skip
            size = min(chunk, k)
            if size == 1:  # sweep() trains each alone: the same loop as the alone side
                default = alone
            elif size == k:  # one chunk: the forced run is sweep()'s run
                default = run.wall_seconds
            else:
                default = _default_seconds(base, the_task, more, size, steps, batch_size, device)
            per = 1e3 * run.wall_seconds / (k * steps)
            scaling.append({"batch_size": batch_size, "configs": k, "chunk": size,
                            "ms_per_config_step": per,
                            "alone_ms_per_config_step": 1e3 * alone / (k * steps),
                            "default_ms_per_config_step": 1e3 * default / (k * steps),
                            "speedup_vs_alone": alone / run.wall_seconds,
                            "default_speedup": alone / default})  # fmt: skip
            bar.update(1)
        masks.append({"batch_size": batch_size, **_mask_costs(
            base, the_task, specs, batch_size, device, profile_steps, repeats)})  # fmt: skip
        bar.update(1)
        profiles[str(batch_size)] = _profile_steps(base, the_task, specs, batch_size, device,
                                                   profile_steps)  # fmt: skip
        bar.update(1)
    bar.close()
    return {
        "name": "sweep",
        "settings": {
            "task": task,
            "ranks": list(ranks),
            "alphas": list(alphas),
            "dropouts": list(dropouts),
            "steps": steps,
            "repeats": repeats,
            "targets": list(TARGETS),
            "profile_steps": profile_steps,
        },  # fmt: skip
        "rows": rows,
        "scaling": scaling,
        "calibration": calibrations,
        "masks": masks,
        "profiles": profiles,
    }


# ---------------------------------------------------------------------------------------------
# 6. QLoRA: LoRA on an fp32, a bf16 and a packed 4-bit (NF4) frozen base
# ---------------------------------------------------------------------------------------------

BASES = ("fp32", "bf16", "nf4")


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = True) -> float:
    """The analytic storage of one 4-bit weight in bits: 4 + its share of the block scales.

    With double quantisation each block of `block_size` weights keeps an 8-bit scale and every
    DQ_BLOCK_SIZE (256) of those one fp32 scale: 4 + 8/64 + 32/(64 * 256) = 4.127 (QLoRA);
    without it an fp32 scale per block: 4 + 32/64 = 4.5.
    """
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * DQ_BLOCK_SIZE)
    return 4 + 32 / block_size


def _block_weights(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the frozen linear weights inside the blocks, as stored."""
    weights = stored = 0
    for module in model.blocks.modules():
        if isinstance(module, Linear4bit):
            weights += module.in_features * module.out_features
            stored += module.storage_bytes()
        elif isinstance(module, nn.Linear):
            weights += module.weight.numel()
            stored += module.weight.numel() * module.weight.element_size()
    return weights, stored


def _qlora_models(
    config: ModelConfig, adapter: LoRAConfig, device: torch.device, block_size: int
) -> dict[str, nn.Module]:
    """LoRA on one random base three ways: fp32, bf16 (model.to(bfloat16)) and NF4 packed.

    add_lora comes last each time; its adapters stay fp32 on the bf16 base (LoRALinear keeps
    its A and B in at least fp32) and train on top of the dequantised 4-bit weights."""
    torch.manual_seed(0)
    with device:
        base = ToyTransformer(config)
    models: dict[str, nn.Module] = {}
    for kind in BASES:
        model = copy.deepcopy(base)
        if kind == "bf16":
            model.to(torch.bfloat16)
        elif kind == "nf4":
            quantize_base(model, scheme="nf4", block_size=block_size, double_quant=True)
        add_lora(model, adapter)
        models[kind] = model
    return models


def _weight_bytes(memory: MemoryBreakdown, model: nn.Module) -> tuple[int, int]:
    """(parameters, buffers) in bytes: the tracker's figures where it has them (MemTracker),
    else the tensors' own storage (the CUDA allocator cannot tell buffers apart)."""
    if "buffers" in memory.at_peak:
        return memory.parameters, memory.at_peak["buffers"]
    seen = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()}
    return memory.parameters, sum(seen.values())


def bench_qlora(
    widths: Sequence[int] = (128, 256, 512, 1024),
    rank: int = 8,
    alpha: float = 16.0,
    n_layers: int = 2,
    batch_size: int = 64,
    block_size: int = 64,
    repeats: int = 11,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Step time and measured memory of LoRA (q, v) on an fp32, a bf16 and an NF4 base.

    The three models share one random base and take turns step by step. Memory is one
    measured steady-state step (lab.measure_step_memory): the weights held (parameters and
    buffers: the packed 4-bit codes and scales are buffers) and the peak. Bits per weight are
    the blocks' frozen linear weights as stored, next to the analytic figure.
    """
    device = torch.device(device)
    x, y = _batch(batch_size, device)
    tokens = batch_size * x.shape[1]
    adapter = LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS)
    analytic_bits = {"fp32": 32.0, "bf16": 16.0, "nf4": nf4_bits_per_weight(block_size)}
    rows = []
    for d in tqdm(widths, desc="qlora", disable=not progress):
        config = width_config(d, n_layers)
        models = _qlora_models(config, adapter, device, block_size)
        trainers = {k: _Trainer(m, x, y, device) for k, m in models.items()}
        times = time_calls(trainers, repeats, warmup=2, device=device)
        memory = {k: t.memory() for k, t in trainers.items()}
        fp32_s = _median(times["fp32"])
        fp32_weights = sum(_weight_bytes(memory["fp32"], models["fp32"]))
        for kind in BASES:
            seconds = _median(times[kind])
            params, buffers = _weight_bytes(memory[kind], models[kind])
            weights, stored = _block_weights(models[kind])
            rows.append({
                "d_model": d,
                "base": kind,
                "trainable": count_parameters(models[kind]).trainable,
                "step_ms": 1e3 * seconds,
                "iqr_ms": 1e3 * _iqr(times[kind]),
                "time_ratio": seconds / fp32_s,
                "tokens_per_s": tokens / seconds,
                "parameter_bytes": params,
                "buffer_bytes": buffers,
                "weight_bytes": params + buffers,
                "weight_ratio": (params + buffers) / fp32_weights,
                "peak_bytes": memory[kind].peak,
                "peak_ratio": memory[kind].peak / memory["fp32"].peak,
                "block_weights": weights,
                "block_weight_bytes": stored,
                "bits_per_weight": 8 * stored / weights,
                "analytic_bits_per_weight": analytic_bits[kind],
            })  # fmt: skip
        del trainers, models
    return {
        "name": "qlora",
        "settings": {
            "widths": list(widths),
            "rank": rank,
            "alpha": alpha,
            "n_layers": n_layers,
            "batch_size": batch_size,
            "seq_len": x.shape[1],
            "block_size": block_size,
            "double_quant": True,
            "repeats": repeats,
            "targets": list(TARGETS),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        },  # fmt: skip
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# 7. DoRA against LoRA: the cost of the magnitude and the column norms
# ---------------------------------------------------------------------------------------------

# PEFT's own measurement (its method comparison on MetaMathQA: Llama-3.2-3B, rank 32, bf16, one
# GPU): DoRA trains about 14% slower than LoRA in tokens per second.
PEFT_DORA_SLOWDOWN = 0.14


def bench_dora(
    widths: Sequence[int] = (128, 256, 512, 1024),
    rank: int = 8,
    alpha: float = 16.0,
    n_layers: int = 2,
    batch_size: int = 64,
    repeats: int = 11,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Training step of DoRA against LoRA at the same rank and targets, in turns, per width.

    The slowdown is PEFT's way of stating it: the fraction of LoRA's tokens per second that
    DoRA loses, 1 - LoRA time / DoRA time. Memory: measured peak of a steady-state step.
    """
    device = torch.device(device)
    x, y = _batch(batch_size, device)
    tokens = batch_size * x.shape[1]
    rows = []
    for d in tqdm(widths, desc="dora", disable=not progress):
        torch.manual_seed(0)
        with device:
            base = ToyTransformer(width_config(d, n_layers))
        models = {}
        for variant in ("lora", "dora"):
            model = copy.deepcopy(base)
            add_lora(model, LoRAConfig(rank=rank, alpha=alpha, targets=TARGETS, variant=variant))
            models[variant] = model
        trainers = {k: _Trainer(m, x, y, device) for k, m in models.items()}
        times = time_calls(trainers, repeats, warmup=2, device=device)
        peaks = {k: t.peak_bytes() for k, t in trainers.items()}
        lora_s, dora_s = _median(times["lora"]), _median(times["dora"])
        rows.append({
            "d_model": d,
            "rank": rank,
            "lora_trainable": count_parameters(models["lora"]).trainable,
            "dora_trainable": count_parameters(models["dora"]).trainable,
            "lora_ms": 1e3 * lora_s,
            "dora_ms": 1e3 * dora_s,
            "lora_iqr_ms": 1e3 * _iqr(times["lora"]),
            "dora_iqr_ms": 1e3 * _iqr(times["dora"]),
            "time_ratio": dora_s / lora_s,
            "lora_tokens_per_s": tokens / lora_s,
            "dora_tokens_per_s": tokens / dora_s,
            "tokens_per_s_slowdown": 1 - lora_s / dora_s,
            "lora_peak_bytes": peaks["lora"],
            "dora_peak_bytes": peaks["dora"],
            "memory_ratio": peaks["dora"] / peaks["lora"],
        })  # fmt: skip
        del trainers, models
    return {
        "name": "dora",
        "settings": {
            "widths": list(widths),
            "rank": rank,
            "alpha": alpha,
            "n_layers": n_layers,
            "batch_size": batch_size,
            "seq_len": x.shape[1],
            "repeats": repeats,
            "targets": list(TARGETS),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "peft_reported_slowdown": PEFT_DORA_SLOWDOWN,
        },  # fmt: skip
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Running, reporting, plotting
# ---------------------------------------------------------------------------------------------

# The default run, in this order.
BENCHMARKS = ("lora_vs_full", "qlora", "dora", "layers", "inference", "growth", "sweep")
EXTRA = ("throughput",)  # GPU-sized: benchmarks/gpu.py runs it

# Smallest settings that still exercise every code path: for the test suite and a quick look.
QUICK = {
    "lora_vs_full": {"widths": (32, 64), "ranks": (1, 4), "rank_width": 64, "rank": 4,
                     "batch_size": 4, "repeats": 1},
    "qlora": {"widths": (32, 64), "rank": 4, "batch_size": 4, "repeats": 1},
    "dora": {"widths": (32, 64), "rank": 4, "batch_size": 4, "repeats": 1},
    "throughput": {"preset": "tiny", "rank": 4, "batch_size": 4, "repeats": 2},
    "layers": {"d_model": 64, "rank": 4, "tokens": 32, "repeats": 2},
    "inference": {"widths": (64,), "rank": 4, "batch_size": 4, "repeats": 2},
    "growth": {"widths": (32, 64, 128), "ranks": (1, 4)},
    "sweep": {"ranks": (1, 2), "alphas": (8.0,), "dropouts": (0.0, 0.1), "steps": 2,
              "batch_sizes": (4,), "grid_sizes": (1, 2), "repeats": 1, "profile_steps": 2},
}  # fmt: skip


def run_all(
    names: Sequence[str] = BENCHMARKS,
    quick: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    overrides: Mapping[str, Mapping] | None = None,
    earlier: Mapping[str, dict] | None = None,
) -> dict:
    """Run the named benchmarks (in BENCHMARKS order) and return every result with the machine.

    `earlier` holds results of a previous call (growth takes lora_vs_full's measured memory).
    """
    valid = EXTRA + BENCHMARKS
    unknown = sorted(set(names) - set(valid))
    if unknown or not names:
        raise ValueError(f"unknown benchmarks {unknown or list(names)}; valid: {list(valid)}")
    settings = {n: dict(QUICK[n]) if quick else {} for n in valid}
    for name, values in (overrides or {}).items():
        settings[name].update(values)
    report = {"machine": machine(device), "quick": quick, "results": {}}
    results = report["results"]
    for name in valid:
        if name not in names:
            continue
        kwargs = settings[name]
        if name == "growth":
            measured = results.get("lora_vs_full") or (earlier or {}).get("lora_vs_full")
            results[name] = bench_growth(lora_vs_full=measured, **kwargs)
        else:
            fn = globals()[f"bench_{name}"]
            results[name] = fn(device=device, progress=progress, **kwargs)
        results[name]["finished"] = machine(device)["date"]
        if progress:
            print(markdown({**report, "results": {name: results[name]}}, header=False))
    return report


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table (lab.analysis.format_table) of cells written as they are given."""
    dicts = [dict(zip(header, (str(c) for c in row), strict=True)) for row in rows]
    return format_table(dicts, header, markdown=True).splitlines() + [""]


def markdown(report: dict, header: bool = True) -> str:
    """The results as markdown tables, with the machine and date when `header`."""
    out: list[str] = []
    m = report["machine"]
    if header:
        out += ["# LoRA Lab benchmarks", ""]
        quick = " Quick settings (smoke test)." if report.get("quick") else ""
        out += [f"Measured {m['date']} on {describe_machine(m)}; torch {m['torch']}, Python "
                f"{m['python']}, device `{m['device']}`.{quick}", ""]  # fmt: skip
    if header and "seconds" in report:
        out += [f"Whole run: {report['seconds']:.0f} s."
                + (f" Skipped, over the time budget: {', '.join(report['skipped'])}."
                   if report.get("skipped") else ""), ""]  # fmt: skip
    results = report["results"]
    if "throughput" in results:
        r = results["throughput"]
        s = r["settings"]
        c = s["config"]
        out += [f"## Throughput: the {s['preset']} preset", "",
                f"d_model {c['d_model']}, {c['n_layers']} layers, d_ff {c['d_ff']}; batch "
                f"{s['batch_size']} x {s['seq_len']} tokens, {s['precision']}, AdamW, median of "
                f"{s['repeats']} alternating steps. MFU: analytic model FLOPs per second over "
                + (f"the bf16 peak, {s['peak_flops'] / 1e12:.0f} TFLOP/s."
                   if s["peak_flops"] else "the peak (unknown for this device)."), ""]  # fmt: skip
        out += _table(
            ["method", "trainable", "step ms", "tokens/s", "TFLOP/s", "MFU", "peak MiB"],
            [[x["method"], f"{x['trainable']:,}", f"{x['step_ms']:.2f}",
              f"{x['tokens_per_s']:,.0f}", f"{x['achieved_tflops']:.2f}",
              "-" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%", _mib(x["peak_bytes"])]
             for x in r["rows"]],
        )  # fmt: skip
    if "lora_vs_full" in results:
        r = results["lora_vs_full"]
        s = r["settings"]
        out += ["## LoRA (q, v) vs full fine-tuning: one training step",
                "", f"{s['n_layers']} layers, batch {s['batch_size']} x {s['seq_len']} tokens, "
                f"AdamW, median of {s['repeats']} alternating rounds. Time limit: the analytic "
                "matmul FLOP ratio. Memory: measured peak of a steady-state step, MiB "
                "(analytic in brackets).", ""]  # fmt: skip
        for title, rows in ((f"By width (rank {s['rank']})", r["widths"]),
                            (f"By rank (d_model {s['rank_width']})", r["ranks"])):  # fmt: skip
            if not rows:
                continue
            out += [f"**{title}**", ""]
            out += _table(
                ["d_model", "rank", "trainable / all", "full ms", "LoRA ms", "LoRA/full time",
                 "FLOP limit", "full MiB", "LoRA MiB", "LoRA/full memory"],
                [[x["d_model"], x["rank"], f"{x['trainable']:,} / {x['parameters']:,}",
                  f"{x['full_ms']:.1f}", f"{x['lora_ms']:.1f}", f"**{x['time_ratio']:.3f}**",
                  f"{x['flop_ratio']:.3f}",
                  f"{_mib(x['full_peak_bytes'])} ({_mib(x['full_analytic_bytes'])})",
                  f"{_mib(x['lora_peak_bytes'])} ({_mib(x['lora_analytic_bytes'])})",
                  f"{x['memory_ratio']:.2f}"] for x in rows],
            )  # fmt: skip
    if "qlora" in results:
        r = results["qlora"]
        s = r["settings"]
        out += ["## QLoRA: LoRA (q, v) on an fp32, a bf16 and a 4-bit (NF4) base",
                "", f"{s['n_layers']} layers, rank {s['rank']}, batch {s['batch_size']} x "
                f"{s['seq_len']} tokens, {s['precision']}, AdamW, median of {s['repeats']} "
                "alternating rounds (± half the spread of the middle half); the three share "
                "one random base. bf16: the frozen model "
                "cast with model.to(torch.bfloat16), adapters fp32. NF4: lab.quantize_base "
                f"(block {s['block_size']}, double-quantised scales), then add_lora. Weights: "
                "parameters + buffers of a measured step (the 4-bit codes and scales are "
                "buffers), MiB. Bits per weight: the blocks' frozen linear weights as stored, "
                "analytic in brackets (NF4: 4 + 8/64 + 32/(64 x 256) = 4.127).", ""]  # fmt: skip
        out += _table(
            ["d_model", "base", "step ms", "time / fp32", "tokens/s", "weights MiB",
             "weights / fp32", "peak MiB", "peak / fp32", "bits per weight"],
            [[x["d_model"], x["base"], f"{x['step_ms']:.1f} ± {x['iqr_ms'] / 2:.1f}",
              f"**{x['time_ratio']:.2f}**",
              f"{x['tokens_per_s']:,.0f}", _mib(x["weight_bytes"]), f"{x['weight_ratio']:.3f}",
              _mib(x["peak_bytes"]), f"**{x['peak_ratio']:.2f}**",
              f"{x['bits_per_weight']:.3f} ({x['analytic_bits_per_weight']:.3f})"]
             for x in r["rows"]],
        )  # fmt: skip
    if "dora" in results:
        r = results["dora"]
        s = r["settings"]
        out += ["## DoRA vs LoRA: one training step at the same rank and targets", "",
                f"{s['n_layers']} layers, rank {s['rank']} on q, v, batch {s['batch_size']} x "
                f"{s['seq_len']} tokens, {s['precision']}, AdamW, median of {s['repeats']} "
                "alternating rounds (± half the spread of the middle half). Slowdown: the "
                "share of LoRA's tokens per second that DoRA "
                "loses (1 - LoRA time / DoRA time). For comparison, PEFT reports DoRA about "
                f"{100 * s['peft_reported_slowdown']:.0f}% slower than LoRA in tokens per second "
                "on a 3B model (Llama-3.2-3B, rank 32, bf16 on a GPU; PEFT's method "
                "comparison).", ""]  # fmt: skip
        out += _table(
            ["d_model", "LoRA ms", "DoRA ms", "DoRA / LoRA time", "tokens/s slowdown",
             "PEFT's figure", "LoRA MiB", "DoRA MiB", "DoRA / LoRA memory", "trainable"],
            [[x["d_model"], f"{x['lora_ms']:.1f} ± {x['lora_iqr_ms'] / 2:.1f}",
              f"{x['dora_ms']:.1f} ± {x['dora_iqr_ms'] / 2:.1f}",
              f"**{x['time_ratio']:.2f}**", f"{100 * x['tokens_per_s_slowdown']:.0f}%",
              f"{100 * s['peft_reported_slowdown']:.0f}%", _mib(x["lora_peak_bytes"]),
              _mib(x["dora_peak_bytes"]), f"{x['memory_ratio']:.2f}",
              f"{x['lora_trainable']:,} / {x['dora_trainable']:,}"] for x in r["rows"]],
        )  # fmt: skip
    if "layers" in results:
        r = results["layers"]
        s = r["settings"]
        out += ["## One adapted layer: lab.LoRALinear vs loralib vs PEFT", "",
                f"d {s['d_model']} in and out, rank {s['rank']}, alpha {s['alpha']:g}, "
                f"{s['tokens']} tokens, {s['dtype']}, forward + backward (input gradient "
                f"included), median of {s['repeats']} alternating rounds; the same weights in "
                "all three.", ""]  # fmt: skip
        out += _table(
            ["implementation", "version", "median ms", "lab / this", "same output",
             "max abs diff"],
            [[x["implementation"], x["version"], f"{x['median_ms']:.2f}",
              f"**{x['lab_ratio']:.3f}**", "yes" if x["same_output"] else "NO",
              f"{x['max_abs_diff']:.1e}"] for x in r["rows"]],
        )  # fmt: skip
        if r["missing"]:
            out += [f"Not installed, so not compared: {', '.join(r['missing'])} "
                    "(`pip install -r benchmarks/requirements.txt`).", ""]  # fmt: skip
    if "inference" in results:
        r = results["inference"]
        out += ["## Inference: merged vs base", "",
                f"Forward of batch {r['settings']['batch_size']}, median of "
                f"{r['settings']['repeats']} alternating rounds.", ""]  # fmt: skip
        out += _table(
            ["d_model", "base ms", "merged ms", "merged/base", "unmerged ms", "unmerged/base",
             "unmerged FLOP share"],
            [[x["d_model"], f"{x['base_ms']:.2f}", f"{x['merged_ms']:.2f}",
              f"**{x['merged_ratio']:.3f}**", f"{x['unmerged_ms']:.2f}",
              f"{x['unmerged_ratio']:.3f}", f"+{100 * x['unmerged_flop_share']:.1f}%"]
             for x in r["rows"]],
        )  # fmt: skip
    if "growth" in results:
        r = results["growth"]
        ranks = r["settings"]["ranks"]
        out += [
            "## Cost growth: trainable parameters",
            "",
            f"{r['settings']['n_layers']} layers, LoRA on q, v; exact counts.",
            "",
        ]
        out += _table(
            ["d_model", "full fine-tuning"] + [f"LoRA r{k}" for k in ranks],
            [[x["d_model"], f"{x['parameters']:,}"]
             + [f"{x.get(f'r{k}_trainable', 0):,}" for k in ranks] for x in r["rows"]],
        )  # fmt: skip
    if "sweep" in results:
        r = results["sweep"]
        s = r["settings"]
        out += ["## Sweeps: one after another vs batched", "",
                f"Grid: ranks {s['ranks']} x alphas {s['alphas']} x dropouts {s['dropouts']} on "
                f"{s['task']}, {s['steps']} steps each, training loops only, median of "
                f"{s['repeats']} alternating rounds. \"per step\" is the chunk size sweep() "
                "uses here: the fastest that lab.calibrate measured on this machine (1: each "
                "configuration trains alone); the static rule's in brackets."
                + (f" This section: measured {r['machine']['date'][:10]} on "
                   f"{describe_machine(r['machine'])}." if "machine" in r else ""),
                ""]  # fmt: skip
        out += _table(
            ["batch", "configs", "per step", "alone s", "sweep s", "speedup",
             "alone ms/config-step", "sweep ms/config-step"],
            [[x["batch_size"], x["configs"],
              f"{x['chunk']} ({x['static_chunk']})" if "static_chunk" in x else x["chunk"],
              f"{x['alone_s']:.1f}", f"{x['batched_s']:.1f}", f"**{x['speedup']:.2f}x**",
              f"{x['alone_ms_per_config_step']:.2f}",
              f"{x['batched_ms_per_config_step']:.2f}"] for x in r["rows"]],
        )  # fmt: skip
        if r.get("calibration"):
            sizes = sorted({int(k) for c in r["calibration"] for k in c["ms_per_config_step"]})
            c0 = r["calibration"][0]
            out += ["**The chunk size, measured** (lab.calibrate: ms per configuration-step, "
                    f"median of {c0['rounds']} interleaved rounds of {c0['steps']} steps after a "
                    "warm-up step; 1 = alone; what a sweep measures once per machine and "
                    "remembers)", ""]  # fmt: skip
            out += _table(
                ["batch", "chosen", "static rule", "measurement s"]
                + ["alone" if k == 1 else f"{k} per step" for k in sizes],
                [[c["batch_size"], c["chunk"], c["static_chunk"], f"{c['seconds']:.1f}"]
                 + [f"{c['ms_per_config_step'][str(k)]:.2f}" if str(k) in c["ms_per_config_step"]
                    else "-" for k in sizes] for c in r["calibration"]],
            )  # fmt: skip
        noise = {x["batch_size"]: x.get("alone_noise", 0.0) for x in r["rows"]}

        def note(x: dict) -> str:
            if x["chunk"] == 1:
                return "trains alone"
            if x["default_speedup"] >= 1:
                return ""
            spread = noise.get(x["batch_size"], 0.0)
            if 1 - x["default_speedup"] <= spread:
                return f"a tie: alone itself varies by {100 * spread:.0f}% between rounds"
            return "slower than alone"

        out += ["**How it scales with grid size** (one round each: sweep()'s default chunks, "
                "and every configuration forced into one step, for information)", ""]  # fmt: skip
        if r["scaling"] and "default_speedup" in r["scaling"][0]:
            out += _table(
                ["batch", "configs", "per step", "alone ms/config-step",
                 "sweep ms/config-step", "sweep speedup", "note", "all in one step ms",
                 "all in one step speedup"],
                [[x["batch_size"], x["configs"], x["chunk"],
                  f"{x['alone_ms_per_config_step']:.2f}",
                  f"{x['default_ms_per_config_step']:.2f}", f"**{x['default_speedup']:.2f}x**",
                  note(x), f"{x['ms_per_config_step']:.2f}", f"{x['speedup_vs_alone']:.2f}x"]
                 for x in r["scaling"]],
            )  # fmt: skip
        else:  # a report from before the calibrated chunk size
            out += _table(
                ["batch", "configs batched", "batched ms per config-step",
                 "alone ms per config-step", "speedup"],
                [[x["batch_size"], x["configs"], f"{x['ms_per_config_step']:.2f}",
                  f"{x['alone_ms_per_config_step']:.2f}", f"{x['speedup_vs_alone']:.2f}x"]
                 for x in r["scaling"]],
            )  # fmt: skip
        if r.get("masks"):
            m0 = r["masks"][0]
            out += [f"**Dropout masks** ({m0['configs']} configurations in one step, "
                    f"{m0['with_dropout']} with dropout; exact: each configuration's own "
                    "generator, as alone, the default; fast: one draw of 16 bits per entry, "
                    "`dropout_draw=\"fast\"`, statistically the same dropout)", ""]  # fmt: skip
            out += _table(
                ["batch", "exact step ms", "exact masks ms", "exact share", "fast step ms",
                 "fast masks ms", "fast share", "step speedup"],
                [[x["batch_size"], f"{x['exact_step_ms']:.1f}", f"{x['exact_mask_ms']:.2f}",
                  f"{100 * x['exact_mask_share']:.0f}%", f"{x['fast_step_ms']:.1f}",
                  f"{x['fast_mask_ms']:.2f}", f"{100 * x['fast_mask_share']:.0f}%",
                  f"{x['fast_step_speedup']:.2f}x"] for x in r["masks"]],
            )  # fmt: skip
        n_configs = r["rows"][0]["configs"] if r["rows"] else 0
        for batch, prof in r["profiles"].items():
            out += [f"**Where the time goes (batch {batch}, {s['profile_steps']} steps)**", ""]
            names = list(dict.fromkeys([p["op"] for p in prof["batched"]]
                                       + [p["op"] for p in prof["alone"]]))  # fmt: skip
            alone = {p["op"]: p["share"] for p in prof["alone"]}
            batched = {p["op"]: p["share"] for p in prof["batched"]}
            out += _table(
                ["operator", "one config alone", f"{n_configs} configs batched"],
                [[n, f"{100 * alone[n]:.0f}%" if n in alone else "-",
                  f"{100 * batched[n]:.0f}%" if n in batched else "-"] for n in names],
            )  # fmt: skip
    return "\n".join(out)


def _figure(title: str, xlabel: str, ylabel: str, figsize=(7.0, 4.0)):
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _width_ticks(ax, widths: Sequence[int]) -> None:
    """Ticks at the measured values (widths, ranks, sizes), written plainly on a log axis."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.xaxis.set_major_locator(FixedLocator(list(widths)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{w // 1024}k" if w >= 4096 and w % 1024 == 0 else str(w) for w in widths])


def _plain_log_y(ax) -> None:
    """Log-scale y tick labels as plain numbers (30, 100, 300) instead of 3x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plots(report: dict) -> dict[str, Figure]:
    """Figures for the results present: file stem -> Figure (titles, labelled axes, units)."""
    results, figs = report["results"], {}
    if "lora_vs_full" in results and results["lora_vs_full"]["widths"]:
        rows = results["lora_vs_full"]["widths"]
        d = [x["d_model"] for x in rows]
        fig = Figure(figsize=(10.0, 4.0), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(d, [x["full_ms"] for x in rows], "o-", color="#D55E00", label="full fine-tuning")
        ax1.plot(d, [x["lora_ms"] for x in rows], "s--", color="#0072B2",
                 label=f"LoRA r{rows[0]['rank']} (q, v)")  # fmt: skip
        ax1.set(
            xscale="log",
            yscale="log",
            title="Training step time vs width",
            xlabel="d_model (log scale)",
            ylabel="median step time (ms, log scale)",
        )
        ax1.legend()
        ax1.grid(True, alpha=0.3)
        ax2.plot(d, [x["time_ratio"] for x in rows], "o-", color="#009E73", label="time, measured")
        ax2.plot(d, [x["flop_ratio"] for x in rows], ":", color="#009E73", label="FLOP limit")
        ax2.plot(d, [x["memory_ratio"] for x in rows], "s-", color="#CC79A7",
                 label="peak memory, measured")  # fmt: skip
        ax2.plot(d, [x["lora_analytic_bytes"] / x["full_analytic_bytes"] for x in rows], "--",
                 color="#CC79A7", label="memory, analytic")  # fmt: skip
        ax2.set(
            xscale="log",
            ylim=(0, 1.05),
            title="LoRA / full fine-tuning",
            xlabel="d_model (log scale)",
            ylabel="ratio (LoRA / full)",
        )
        ax2.legend()
        ax2.grid(True, alpha=0.3)
        for ax in (ax1, ax2):
            _width_ticks(ax, d)
        _plain_log_y(ax1)
        figs["lora_vs_full"] = fig
    if "lora_vs_full" in results and results["lora_vs_full"]["ranks"]:
        rows = results["lora_vs_full"]["ranks"]
        ranks = [x["rank"] for x in rows]
        fig = Figure(figsize=(10.0, 4.0), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        width = rows[0]["d_model"]
        ax1.plot(ranks, [x["lora_ms"] for x in rows], "s--", color="#0072B2", label="LoRA (q, v)")
        ax1.axhline(rows[0]["full_ms"], color="#D55E00", label="full fine-tuning")
        top_ms = 1.15 * max([rows[0]["full_ms"]] + [x["lora_ms"] for x in rows])
        peaks = [rows[0]["full_peak_bytes"]] + [x["lora_peak_bytes"] for x in rows]
        top_mib = 1.15 * max(peaks) / MIB
        ax1.set(
            xscale="log",
            ylim=(0, top_ms),
            title=f"Training step time vs rank (d_model {width})",
            xlabel="LoRA rank (log scale)",
            ylabel="median step time (ms)",
        )
        ax2.plot(ranks, [x["lora_peak_bytes"] / MIB for x in rows], "s-", color="#0072B2",
                 label="LoRA, measured")  # fmt: skip
        ax2.plot(ranks, [x["lora_analytic_bytes"] / MIB for x in rows], ":", color="#0072B2",
                 label="LoRA, analytic")  # fmt: skip
        ax2.axhline(rows[0]["full_peak_bytes"] / MIB, color="#D55E00",
                    label="full fine-tuning, measured")  # fmt: skip
        ax2.set(
            xscale="log",
            ylim=(0, top_mib),
            title=f"Step memory vs rank (d_model {width})",
            xlabel="LoRA rank (log scale)",
            ylabel="peak memory (MiB)",
        )
        for ax in (ax1, ax2):
            _width_ticks(ax, ranks)
            ax.legend(fontsize="small")
            ax.grid(True, alpha=0.3)
        figs["ranks"] = fig
    if "growth" in results:
        r = results["growth"]
        fig = Figure(figsize=(10.0, 4.0), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        d = [x["d_model"] for x in r["rows"]]
        ax1.plot(d, [x["parameters"] for x in r["rows"]], "o-", color="#D55E00",
                 label="full fine-tuning")  # fmt: skip
        styles = ("--", "-.", ":", "--", "-.")
        for i, k in enumerate(r["settings"]["ranks"]):
            pts = [
                (x["d_model"], x[f"r{k}_trainable"]) for x in r["rows"] if f"r{k}_trainable" in x
            ]
            ax1.plot(*zip(*pts, strict=True), styles[i % 5], marker="s", label=f"LoRA r{k}")
        ax1.set(
            xscale="log",
            yscale="log",
            title="Trainable parameters vs width",
            xlabel="d_model (log scale)",
            ylabel="trainable parameters (log scale)",
        )
        ax1.legend(fontsize="small")
        ax1.grid(True, alpha=0.3)
        m = r["measured_memory"]
        if m:
            dm = [x["d_model"] for x in m]
            ax2.plot(dm, [x["full_peak_bytes"] / MIB for x in m], "o-", color="#D55E00",
                     label="full, measured")  # fmt: skip
            ax2.plot(dm, [x["full_analytic_bytes"] / MIB for x in m], ":", color="#D55E00",
                     label="full, analytic")  # fmt: skip
            ax2.plot(dm, [x["lora_peak_bytes"] / MIB for x in m], "s-", color="#0072B2",
                     label=f"LoRA r{m[0]['rank']}, measured")  # fmt: skip
            ax2.plot(dm, [x["lora_analytic_bytes"] / MIB for x in m], ":", color="#0072B2",
                     label=f"LoRA r{m[0]['rank']}, analytic")  # fmt: skip
            ax2.legend(fontsize="small")
        else:
            ax2.text(0.5, 0.5, "run lora_vs_full for measured memory", ha="center",
                     transform=ax2.transAxes)  # fmt: skip
        ax2.set(
            xscale="log",
            yscale="log",
            title="Training step memory vs width",
            xlabel="d_model (log scale)",
            ylabel="peak memory (MiB, log scale)",
        )
        ax2.grid(True, alpha=0.3)
        _width_ticks(ax1, d)
        if m:
            _width_ticks(ax2, dm)
            _plain_log_y(ax2)
        figs["growth"] = fig
    if "sweep" in results:
        r = results["sweep"]
        fig, ax = _figure(
            "Batched sweeps: cost per configuration as the grid grows",
            "configurations trained together",
            "ms per configuration-step",
        )
        for i, batch in enumerate(sorted({x["batch_size"] for x in r["scaling"]}, reverse=True)):
            rows = [x for x in r["scaling"] if x["batch_size"] == batch]
            k = [x["configs"] for x in rows]
            color = ("#0072B2", "#E69F00", "#009E73")[i % 3]
            ax.plot(k, [x["ms_per_config_step"] for x in rows], "o-", color=color,
                    label=f"all in one step, batch {batch}")  # fmt: skip
            ax.plot(k, [x["alone_ms_per_config_step"] for x in rows], "s--", color=color,
                    label=f"one after another, batch {batch}")  # fmt: skip
            if rows and "default_ms_per_config_step" in rows[0]:
                ax.plot(k, [x["default_ms_per_config_step"] for x in rows], "^:", color=color,
                        label=f"sweep()'s chunks, batch {batch}")  # fmt: skip
        ax.set_xscale("log", base=2)
        sizes = sorted({x["configs"] for x in r["scaling"]})
        _width_ticks(ax, sizes)  # plain 1, 2, 4, ...
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        figs["sweep"] = fig
    return figs


def write_results(report: dict, out_dir: str | os.PathLike, stem: str = "bench") -> list[Path]:
    """Write <stem>.json, <stem>.md and one PNG per plot into out_dir, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        atomic_write_bytes(out / f"{stem}.json", json.dumps(report, indent=1).encode()),
    ]
    figs = plots(report)
    md = markdown(report)
    if figs:
        md += "\n" + "\n".join(f"![{name}]({stem}_{name}.png)" for name in figs) + "\n"
    paths.append(atomic_write_bytes(out / f"{stem}.md", md.encode()))
    for name, fig in figs.items():
        from lab.plots import savefig_bytes

        paths.append(atomic_write_bytes(out / f"{stem}_{name}.png", savefig_bytes(fig)))
    return paths


# ---------------------------------------------------------------------------------------------
# Command line: python -m benchmarks.bench [names] [--quick] [--device] [--out] [--stem]
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Run the lab's benchmarks; write JSON, markdown and plots.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        default=list(BENCHMARKS),
        help=f"which benchmarks (default all): {', '.join(BENCHMARKS)}; GPU-sized: "
        f"{', '.join(EXTRA)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--out", default="benchmarks/results", help="where results are written")
    parser.add_argument("--stem", default=None, help="file name stem (default: bench, bench-quick)")
    parser.add_argument(
        "--threads", type=_positive_int("--threads"), default=None,
        help="torch CPU threads (default: torch's own); 1 keeps timings steadier on a busy "
        "machine, where threads wait for each other",
    )  # fmt: skip
    for flag, what in (("--batch-size", "batch size"), ("--repeats", "timed rounds")):
        parser.add_argument(
            flag, type=_positive_int(flag), default=None,
            help=f"{what} for every chosen benchmark that has one (default: each its own)",
        )  # fmt: skip
    return parser


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} {value} must be at least 1")
        return value

    return parse


def _overrides(names: Sequence[str], **values: int | None) -> dict[str, dict]:
    """{name: {setting: value}} for the given settings each named benchmark takes."""
    out: dict[str, dict] = {}
    for name in names:
        fn = bench_growth if name == "growth" else globals()[f"bench_{name}"]
        takes = inspect.signature(fn).parameters
        out[name] = {k: v for k, v in values.items() if v is not None and k in takes}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named benchmarks and write <stem>.json, .md and plots; 0 on success.

    Bad settings (an unknown name or device, a stem with a folder in it, an output folder that
    cannot be written) are one line on stderr and exit status 2 (1 for the folder), before
    anything runs.
    """
    args = _parser().parse_args(argv)
    try:
        stem = args.stem or ("bench-quick" if args.quick else "bench")
        if not stem or os.sep in stem or (os.altsep and os.altsep in stem) or stem[0] == ".":
            raise ValueError(f"--stem {stem!r}: expected a plain file name stem such as 'bench'")
        unknown = sorted(set(args.names) - set(EXTRA + BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown benchmarks {unknown}; valid: {', '.join(BENCHMARKS)}")
        device = resolve_device(args.device)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        check_writable_dir(out, "benchmark output folder", "choose another folder with --out")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # recorded in the report's machine
    overrides = _overrides(args.names, batch_size=args.batch_size, repeats=args.repeats)
    report = run_all(args.names, quick=args.quick, device=str(device), overrides=overrides)
    for path in write_results(report, out, stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
