"""Small measurements the notebooks show: timings, spectra, LoRA parameter counts, tables.

Pure functions (data in, numbers out); `lab.widgets.count_explorer` shows `lora_counts` live.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .lora import LoRALinear
from .memory import analytic_flops
from .model import ModelConfig, ToyTransformer, get_preset
from .surgery import add_lora, count_parameters
from .tasks import EOS, SEP, Task, decode
from .text import format_bytes

__all__ = [
    "canonical_targets",
    "format_decimal_bytes",
    "spread",
    "time_calls",
    "timing_summary",
    "timing_verdict",
    "count_full",
    "count_lora",
    "describe_counts",
    "ATTENTION",
    "PAPER_GPT3",
    "answers",
    "checkpoint_bytes",
    "energy_captured",
    "format_table",
    "lora_counts",
    "lora_flop_share",
    "paper_counts",
    "rank_for_energy",
    "singular_values",
    "subspace_similarity",
    "time_forward",
    "time_models",
    "update_norms",
]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_ORDER = {name: i for i, name in enumerate((*ATTENTION, "up_proj", "down_proj"))}


def canonical_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Targets once each, in the lab's order q, k, v, o, up, down (others after, by name)."""
    return tuple(sorted(set(targets), key=lambda t: (_ORDER.get(t, len(_ORDER)), t)))


# The LoRA paper's GPT-3 175B adapters (Hu et al. 2021): (targets, rank, what it reports).
PAPER_GPT3: tuple[tuple[tuple[str, ...], int, str], ...] = (
    (("q_proj", "v_proj"), 1, "4.7M (Table 4)"),
    (("q_proj", "v_proj"), 8, "37.7M (Table 4)"),
    (("q_proj",), 8, "18M budget (Table 5)"),
    (("k_proj",), 8, "18M budget (Table 5)"),
    (("v_proj",), 8, "18M budget (Table 5)"),
    (("o_proj",), 8, "18M budget (Table 5)"),
    (("q_proj", "k_proj"), 4, "18M budget (Table 5)"),
    (("q_proj", "v_proj"), 4, "18M budget (Table 5)"),
    (ATTENTION, 2, "18M budget (Table 5)"),
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device | str | None) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing to wait for on a CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, mean, min, max and interquartile range (see `spread`) of timings, in seconds."""
    lo, median, hi = timing_summary(seconds)
    return {
        "median_s": median,
        "mean_s": statistics.fmean(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "iqr_s": hi - lo,
        "repeats": len(seconds),
    }


def time_calls(
    calls: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Wall seconds of each call, taken in turns (a, b, a, b, ...) so that load hits all alike.

    Each call runs `warmup` untimed times first; returns label -> `repeats` timings in seconds.
    With a CUDA `device`, each timing waits for the GPU to finish the call's work.
    """
    bad = [v for v in (repeats, warmup) if isinstance(v, bool) or not isinstance(v, int)]
    if bad or repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats!r}, warmup={warmup!r}: expected ints >= 1 and >= 0")
    if not calls:
        raise ValueError("calls is empty: give at least one label -> function")
    for call in calls.values():
        for _ in range(warmup):
            call()
    _sync(device)
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call()
            _sync(device)
            times[label].append(time.perf_counter() - start)
    return times


def spread(seconds: Sequence[float]) -> tuple[float, float]:
    """The range most timings fall in: the quartiles from 4 timings on, else min and max."""
    problem = ValueError(f"timings must be finite seconds >= 0, at least one; got {seconds!r}")
    if isinstance(seconds, str | bytes | Mapping) or any(isinstance(s, bool) for s in seconds):
        raise problem
    try:
        values = sorted(float(s) for s in seconds)
    except (TypeError, ValueError):  # not numbers
        raise problem from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise problem
    if len(values) < 4:
        return values[0], values[-1]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def timing_summary(seconds: Sequence[float]) -> tuple[float, float, float]:
    """(low, median, high) of timings: the median and the `spread` around it.

    The one summary that a notebook's table and plot and `timing_verdict` all use, so that
    they show the same median (with an even count, the mean of the two middle timings).
    """
    low, high = spread(seconds)  # also refuses bad timings
    return low, statistics.median(float(s) for s in seconds), high


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def timing_verdict(label_a: str, a: Sequence[float], label_b: str, b: Sequence[float]) -> str:
    """How a's time compares with b's, said only as firmly as the timings' spread allows.

    Medians are compared; the difference counts only when the two spreads (`spread`) do not
    overlap. Otherwise the verdict says the difference is within the noise of this machine.
    """
    (lo_a, ma, hi_a), (lo_b, mb, hi_b) = timing_summary(a), timing_summary(b)
    ranges = (
        f"{label_a} {_seconds(ma)} (spread {_seconds(lo_a)}-{_seconds(hi_a)}), "
        f"{label_b} {_seconds(mb)} (spread {_seconds(lo_b)}-{_seconds(hi_b)})"
    )
    if hi_a < lo_b or hi_b < lo_a:
        faster, slower, ratio = (
            (label_a, label_b, mb / ma) if ma < mb else (label_b, label_a, ma / mb)
        )
        return f"{ranges}: {faster} is {ratio:.2f}x faster than {slower}"
    return (
        f"{ranges}: the difference ({_seconds(abs(ma - mb))}) is within the spread of the "
        "timings, too small to tell apart on this machine now"
    )


@torch.inference_mode()
def time_models(
    models: Mapping[str, nn.Module], inputs: torch.Tensor, repeats: int = 30, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Time each model's forward on `inputs`, interleaved so that machine noise hits all alike.

    Each model runs `warmup` untimed forwards, then the models take turns for `repeats` rounds;
    returns label -> timing statistics (see `time_forward`). Models are put in eval mode.
    """
    if not models:
        raise ValueError("models is empty: give at least one label -> model")
    for model in models.values():
        model.eval()
    calls = {label: (lambda m=model: m(inputs)) for label, model in models.items()}
    times = time_calls(calls, repeats, warmup, device=inputs.device)
    return {label: _stats(t) for label, t in times.items()}


def time_forward(
    model: nn.Module, inputs: torch.Tensor, repeats: int = 30, warmup: int = 3
) -> dict[str, float]:
    """Forward-pass wall time: median_s, mean_s, min_s, max_s, iqr_s (seconds) and repeats."""
    return time_models({"model": model}, inputs, repeats, warmup)["model"]


# --------------------------------------------------------------------------------------------
# Spectra: how low-rank is an update?
# --------------------------------------------------------------------------------------------


def singular_values(delta: torch.Tensor) -> list[float]:
    """Singular values of a 2-D tensor (out, in), largest first, computed in float64."""
    if delta.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(delta.shape)}")
    return torch.linalg.svdvals(delta.detach().to("cpu", torch.float64)).tolist()


def energy_captured(sv: Sequence[float]) -> list[float]:
    """Cumulative fraction of the squared Frobenius norm held by the top 1, 2, ... directions."""
    squares = [float(s) ** 2 for s in sv]
    total = math.fsum(squares)
    if not squares or total <= 0:
        raise ValueError("all singular values are zero: the matrix has no energy to capture")
    out, running = [], 0.0
    for sq in squares:
        running += sq
        out.append(min(1.0, running / total))
    out[-1] = 1.0  # exactly, whatever the rounding
    return out


def rank_for_energy(sv: Sequence[float], fraction: float) -> int:
    """The fewest top directions whose squared singular values reach `fraction` of the total."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}: expected a number in (0, 1]")
    energy = energy_captured(sv)
    return next(k for k, e in enumerate(energy, start=1) if e >= fraction - 1e-12)


def subspace_similarity(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Overlap in [0, 1] of the top-k left singular subspaces of two (out, in) matrices.

    ‖U_a[:, :k]ᵀ U_b[:, :k]‖²_F / k, the LoRA paper's measure (Section 7): 1 when the k
    directions are the same, about k / out for unrelated random subspaces.
    """
    if a.shape[0] != b.shape[0] or not 1 <= k <= min(*a.shape, *b.shape):
        raise ValueError(f"shapes {tuple(a.shape)}, {tuple(b.shape)} and k={k} do not fit")
    ua = torch.linalg.svd(a.detach().to("cpu", torch.float64), full_matrices=False).U[:, :k]
    ub = torch.linalg.svd(b.detach().to("cpu", torch.float64), full_matrices=False).U[:, :k]
    return float((ua.T @ ub).square().sum() / k)


def update_norms(
    ranks: Iterable[int],
    *,
    features: int = 128,
    alpha: float = 16.0,
    rslora: bool = False,
    b_std: float = 0.02,
    trials: int = 4,
    seed: int = 0,
) -> list[float]:
    """Mean ‖ΔW‖_F of a LoRALinear(features -> features) per rank, with B drawn at random.

    A keeps its Kaiming init and B's entries are N(0, b_std²) at every rank, as if trained:
    then ‖B A‖ grows like sqrt(rank), so alpha/rank shrinks ΔW like 1/sqrt(rank) and
    rsLoRA's alpha/sqrt(rank) keeps it about constant.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = []
    for rank in ranks:
        total = 0.0
        for _ in range(trials):
            layer = LoRALinear(nn.Linear(features, features, bias=False), rank, alpha, 0.0, rslora)
            with torch.no_grad():
                bound = 1 / math.sqrt(features)  # Kaiming-uniform(a=sqrt(5)) bound for A
                layer.lora_A.uniform_(-bound, bound, generator=generator)
                layer.lora_B.normal_(0.0, b_std, generator=generator)
                total += float(layer.delta_weight().norm())
        norms.append(total / trials)
    return norms


# --------------------------------------------------------------------------------------------
# Counting: LoRA on any preset, built on the meta device (shapes only, no memory)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)  # widgets ask again on every redraw
def count_lora(config: ModelConfig, rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(LoRA's trainable parameters, the adapted model's total) for `config`, counted exactly.

    The model is built on the meta device (shapes only: no memory, no initialisation), LoRA is
    added with `add_lora` and counted with `count_parameters`. The one counter that notebooks,
    widgets, sweeps and benchmarks share.
    """
    with torch.device("meta"):
        model = ToyTransformer(config)
        add_lora(model, targets, rank=rank)
        counts = count_parameters(model)
    return counts.trainable, counts.total


@functools.lru_cache(maxsize=64)
def count_full(config: ModelConfig) -> int:
    """All parameters of a ToyTransformer with `config` (tied weights once), on the meta device."""
    with torch.device("meta"):
        return count_parameters(ToyTransformer(config)).total


def checkpoint_bytes(n_params: int, bytes_per_param: int = 2) -> int:
    """Bytes of the tensors in a checkpoint of n_params values (2 per value in fp16/bf16)."""
    return n_params * bytes_per_param


def lora_counts(preset: str, rank: int, targets: str | Iterable[str]) -> dict:
    """LoRA's trainable parameters on a preset, counted with add_lora on the meta device.

    Returns preset, rank, targets, trainable, base (the frozen model's parameters), fraction
    (trainable / base), and checkpoint sizes in fp16: adapter_bytes and base_bytes.
    """
    targets = (targets,) if isinstance(targets, str) else targets
    targets = canonical_targets(targets)
    if not targets:
        raise ValueError("targets is empty; pick at least one of " + ", ".join(ATTENTION))
    get_preset(preset)  # a clear error for an unknown preset
    trainable, total = count_lora(get_preset(preset), rank, targets)
    base = total - trainable
    return {
        "preset": preset,
        "rank": rank,
        "targets": targets,
        "trainable": trainable,
        "base": base,
        "fraction": trainable / base,
        "adapter_bytes": checkpoint_bytes(trainable),
        "base_bytes": checkpoint_bytes(base),
    }


def paper_counts() -> list[dict]:
    """The LoRA paper's GPT-3 175B adapters (PAPER_GPT3), each counted by `lora_counts`."""
    return [
        {**lora_counts("gpt3-175b", rank, targets), "paper": reported}
        for targets, rank, reported in PAPER_GPT3
    ]


def lora_flop_share(config: ModelConfig, targets: str | Iterable[str], rank: int) -> float:
    """Extra forward FLOPs of unmerged LoRA as a fraction of the base's forward FLOPs.

    Per token and adapted layer, LoRA adds 2 * rank * (in + out) FLOPs (x @ Aᵀ, then @ Bᵀ).
    """
    base = analytic_flops(config, 1, 1)["forward"]
    lora = analytic_flops(config, 1, 1, lora_targets=targets, lora_rank=rank)["forward"]
    return (lora - base) / base


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def answers(model: nn.Module, task: Task, n: int = 4, max_new: int = 10) -> list[dict[str, str]]:
    """The model's greedy answers to the first n held-out prompts: prompt, expected, answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for ids in task.heldout_inputs[:n].tolist():
        sep = ids.index(SEP)
        seq = ids[: sep + 1]
        for _ in range(max_new):  # one token at a time, the most likely each time
            logits = model(torch.tensor([seq], device=device))
            token = int(logits[0, -1].argmax())
            if token == EOS:
                break
            seq.append(token)
        expected, answer = decode(ids[sep + 1 :]), decode(seq[sep + 1 :])
        rows.append(
            {
                "prompt": decode(ids[:sep]),
                "expected": expected,
                "answer": answer,
                "correct": answer == expected,
            }
        )
    model.train(was_training)
    return rows


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?")  # 8,192  0.25  1e-06  98%


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
    *,
    markdown: bool = False,
) -> str:
    """Rows of dicts as an aligned text table; numbers align right, ints get thousands commas.

    markdown=True writes the same table with pipes (`| a | b |`, numbers right-aligned with
    `---:`), for reports such as benchmarks/results/*.md; strings are written as they are.
    """
    if not isinstance(markdown, bool):
        raise TypeError(f"markdown must be True or False, got {markdown!r}")
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    if markdown:  # a pipe inside a cell would end the cell early
        cells = [[v.replace("|", "\\|") for v in r] for r in cells]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(_NUMBER.fullmatch(r[i]) for r in cells) for i in range(len(columns))]

    def pad(values: Sequence[str]) -> list[str]:
        return [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]

    if markdown:
        rule = (
            "|"
            + "|".join(
                "-" * (w + 1) + ":" if right else "-" * (w + 2)
                for w, right in zip(widths, numeric, strict=True)
            )
            + "|"
        )
        rows_md = ["| " + " | ".join(pad(r)) + " |" for r in [columns, *cells]]
        return "\n".join([rows_md[0], rule, *rows_md[1:]])
    rule = "  ".join("-" * w for w in widths)
    return "\n".join(
        ["  ".join(pad(r)).rstrip() for r in [columns]]
        + [rule]
        + ["  ".join(pad(r)).rstrip() for r in cells]
    )


def format_decimal_bytes(n: float) -> str:
    """A file size in the unit that suits it (1000s): '512 B', '33.8 KB', '75.5 MB', '350 GB'."""
    return format_bytes(n, decimal=True)


def describe_counts(counts: dict) -> str:
    """The count explorer's readout: trainable parameters and fp16 file sizes, in fitting units."""
    return (
        f"{counts['preset']}, rank {counts['rank']} on {', '.join(counts['targets'])}\n"
        f"trainable parameters: {counts['trainable']:,} "
        f"({100 * counts['fraction']:.4f}% of {counts['base']:,})\n"
        f"adapter file (fp16): {format_decimal_bytes(counts['adapter_bytes'])}; "
        f"base checkpoint (fp16): {format_decimal_bytes(counts['base_bytes'])}"
    )
