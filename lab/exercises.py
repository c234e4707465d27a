"""Classroom exercises: each `check_*` says what is wrong with an answer, not only that it is.

A checker never raises on a wrong answer (None, a stub that raises, wrong shapes or types): it
returns a `Feedback` whose repr is "passed: ..." or "not yet: ...", so a notebook cell that ends
with the check shows it. A passing message holds no machine-dependent numbers (nbval compares it).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import format_table
from .base import load_base_model
from .lora import LoRALinear, add_lora, count_parameters, lora_layers
from .memory import analytic_memory, format_bytes, measure_step_memory
from .model import PRESETS, ModelConfig, ToyTransformer, get_preset
from .sweep import ALL_TARGETS, load_grid_file, select
from .tasks import get_task

__all__ = [
    "BUDGET",
    "BUDGET_ACCURACY",
    "BUDGET_TASK",
    "SWEEP_CHOICES",
    "Feedback",
    "check_budget",
    "check_count",
    "check_forward",
    "check_memory",
    "check_merge",
    "check_sweep_answer",
    "sweep_evidence",
]

BUDGET = 4096  # exercise 4: trainable parameters allowed (q and v at rank 4 fit exactly)
BUDGET_TASK, BUDGET_ACCURACY = "rotate", 0.9
MEMORY_TARGETS, MEMORY_RANK = ("q_proj", "v_proj"), 8  # exercise 6's LoRA setting
TOLERANCE = 0.15  # exercise 6: a prediction within 15% passes


@dataclass(frozen=True)
class Feedback:
    """A checker's verdict; its repr ("passed: ..." or "not yet: ...") is what a cell shows."""

    passed: bool
    message: str

    def __str__(self) -> str:
        return f"{'passed' if self.passed else 'not yet'}: {self.message}"

    __repr__ = __str__  # what a notebook cell ending with a check displays


def _no(message: str) -> Feedback:
    return Feedback(False, message)


def _describe(exc: Exception) -> str:
    """'TypeError: first line of the message', kept short."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _call(
    fn: object, name: str, todo: str, *args: object, hints: dict[str, str] | None = None
) -> tuple[object, Feedback | None]:
    """(fn(*args), None), or (None, feedback) if fn is not a function, is the stub, or raises.

    `hints` maps a word of the exception's text to advice appended to the feedback.
    """
    if not callable(fn):
        return None, _no(f"{name} should be a function, got {type(fn).__name__}. {todo}")
    try:
        with warnings.catch_warnings():  # the student's warnings would litter the output
            warnings.simplefilter("ignore")
            return fn(*args), None
    except NotImplementedError:
        return None, _no(f"{name} is still the stub (it raises NotImplementedError). {todo}")
    except Exception as exc:  # a wrong answer is feedback, never an error in the notebook
        advice = [f". {tip}" for word, tip in (hints or {}).items() if word in str(exc)]
        return None, _no(f"{name} raised {_describe(exc)}" + "".join(advice[:1]))


def _safe(check: Callable[..., Feedback]) -> Callable[..., Feedback]:
    """Wrap a checker so that an answer which breaks the checking itself is feedback too."""

    @functools.wraps(check)
    def wrapper(*args: object, **kwargs: object) -> Feedback:
        try:
            return check(*args, **kwargs)
        except Exception as exc:  # e.g. a layer whose .base the student replaced by None
            return _no(
                f"your answer could not be checked ({_describe(exc)}): is it what was asked?"
            )

    return wrapper


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


def _bad_tensor(out: object, name: str, want: torch.Tensor) -> Feedback | None:
    """Feedback when `out` is not a finite tensor with want's shape and dtype."""
    if out is None:
        return _no(f"{name} returned None: return the output tensor")
    if not isinstance(out, torch.Tensor):
        return _no(f"{name} returned a {type(out).__name__}; expected a torch.Tensor")
    if out.shape != want.shape:
        return _no(f"{name} returned shape {tuple(out.shape)}; expected {tuple(want.shape)}")
    if out.dtype != want.dtype:
        return _no(f"{name} returned {out.dtype}; expected {want.dtype}, the base's dtype")
    if not bool(torch.isfinite(out).all()):
        return _no(f"{name} returned inf or nan values")
    return None


# ---------------------------------------------------------------------------------------------
# Exercise 1: the forward pass
# ---------------------------------------------------------------------------------------------

IN, OUT, RANK, ALPHA = 16, 12, 4, 6.0  # not square: swapping A and B cannot go unnoticed
SCALING = ALPHA / RANK  # 1.5, distinct from 1/scaling, sqrt(rank), rank and 1/rank
_FORWARD_FACTORS = {  # the update came out k times the expected one: what that usually means
    0.0: "your output is the frozen layer's alone: add the low-rank path",
    1 / SCALING: "the scaling is not applied: multiply the low-rank path by `scaling`",
    SCALING: "the scaling is applied twice",
    1 / RANK: "you divided by the rank again: `scaling` already is alpha / r",
    math.sqrt(RANK): "that is alpha / sqrt(r), rsLoRA's rule: use `scaling` as given (alpha / r)",
    float(RANK): "you multiplied by the rank: that gives alpha, not alpha / r",
    -1.0: "the low-rank path has the wrong sign: it is added to the frozen path",
}


class _FixedDropout(nn.Dropout):
    """nn.Dropout whose mask is fixed (so train mode has one right answer); logs input shapes."""

    def __init__(self, p: float, mask: torch.Tensor) -> None:
        super().__init__(p)
        self.mask, self.shapes = mask, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        if not self.training:
            return x
        if x.shape != self.mask.shape:  # applied to something other than x: random, as usual
            return F.dropout(x, self.p, True)
        return x * self.mask / (1 - self.p)


def _forward_case() -> tuple[LoRALinear, torch.Tensor]:
    """A lab LoRALinear (bias, non-zero B, dropout 0.5) and an input (2, 3, IN); seeded."""
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(IN, OUT), RANK, ALPHA, dropout=0.5)
    with torch.no_grad():
        for t in (layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B):
            t.copy_(0.3 * torch.randn(t.shape, generator=g))
    x = torch.randn(2, 3, IN, generator=g)
    layer.dropout = _FixedDropout(0.5, (torch.rand(x.shape, generator=g) > 0.5).float())
    return layer, x


@_safe
def check_forward(fn: Callable) -> Feedback:
    """Exercise 1: fn(x, base, A, B, scaling, dropout) must equal lab.LoRALinear's forward."""
    todo = "Write the body: the frozen layer plus the scaled low-rank update dropout(x) Aᵀ Bᵀ."
    layer, x = _forward_case()
    base, A, B, drop = layer.base, layer.lora_A, layer.lora_B, layer.dropout
    shapes = f"A is (r, in) = {tuple(A.shape)} and B is (out, r) = {tuple(B.shape)}"
    hints = {w: f"{shapes}: the update is x @ A.T @ B.T" for w in ("shape", "size")}
    inputs = {"x": x, "base.weight": base.weight, "A": A, "B": B}

    def run(train: bool) -> tuple[torch.Tensor | None, Feedback | None]:
        """The student's output with dropout in train or eval mode, or feedback."""
        drop.train(train)
        saved = {k: v.detach().clone() for k, v in inputs.items()}
        args = (x, base, A, B, layer.scaling, drop)
        out, problem = _call(fn, "your function", todo, *args, hints=hints)
        if problem:
            return None, problem
        if isinstance(out, torch.Tensor) and out.shape[-1:] == (RANK,):
            return None, _no(f"your output has shape {tuple(out.shape)}: x @ A.T; apply B too")
        changed = [k for k, v in inputs.items() if not torch.equal(v.detach(), saved[k])]
        if changed:
            return None, _no(f"your function changed {changed[0]} in place: a forward must not")
        problem = _bad_tensor(out, "your function", x.new_empty(*x.shape[:-1], OUT))
        return (None, problem) if problem else (out.detach(), None)

    with torch.no_grad():
        frozen, ref = base(x), layer.eval()(x)
    out, problem = run(train=False)
    if problem:
        return problem
    again, _ = run(train=False)
    if again is not None and not torch.equal(again, out):
        return _no(
            "in eval mode two calls gave different outputs: dropout is active at evaluation. "
            "Call the `dropout` module (off in eval mode); F.dropout defaults to training=True"
        )
    if not _close(out, ref):
        k = _factor(out - frozen, ref - frozen)
        if hint := _match_factor(k, _FORWARD_FACTORS):
            return _no(hint)
        if _close(out, ref - frozen):
            return _no("you returned only the low-rank update: add the frozen path base(x)")
        if _close(out, SCALING * frozen + (ref - frozen)):
            return _no("you scaled the frozen path too: only the low-rank update gets `scaling`")
        hint = f"the update is {k:.3g} times the expected one" if k else "is the scaling applied?"
        return _no(f"your output differs from the reference {_where(out - ref)}: {hint}")

    # Train mode with B = 0: whatever dropout does, the output must be the frozen layer's.
    with torch.no_grad():
        b_trained = B.clone()
        B.zero_()
    out, problem = run(train=True)
    if problem:
        return problem
    if not _close(out, frozen):
        return _no(
            "in train mode with B = 0 your output differs from base(x): dropout reached the "
            "frozen path. Apply it to the adapter's input only: base(x) + dropout(x) @ A.T ..."
        )
    with torch.no_grad():
        B.copy_(b_trained)
        ref_train = layer.train()(x)
    drop.shapes.clear()
    out, problem = run(train=True)
    if problem:
        return problem
    if not _close(out, ref_train):
        if _close(out, ref):
            return _no("in train mode your output ignores dropout: use dropout(x) on the adapter")
        if not drop.shapes:  # e.g. F.dropout(x, p, training): right idea, but its own mask
            return _no(
                "in train mode your output differs from the reference: call the `dropout` module "
                "you were given, dropout(x); the check fixes its mask so the answer is unique"
            )
        if x.shape[:-1] + (RANK,) in drop.shapes:
            return _no("you applied dropout to x @ A.T; LoRA drops the adapter's input x")
        return _no(
            f"in train mode your output differs from the reference {_where(out - ref_train)}"
        )
    return Feedback(
        True,
        "your forward equals lab.LoRALinear's in eval and train mode: the frozen path is "
        "untouched, dropout acts on the adapter's input only, the update is scaled by alpha / r.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 2: merge
# ---------------------------------------------------------------------------------------------


def _merge_case(dtype: torch.dtype) -> LoRALinear:
    """A LoRALinear whose ΔW is as large as W, so that rounding twice shows in bf16."""
    g = torch.Generator().manual_seed(2)
    layer = LoRALinear(nn.Linear(IN, OUT, bias=False).to(dtype), RANK, ALPHA)
    with torch.no_grad():
        for t, std in ((layer.base.weight, 1.0), (layer.lora_A, 0.5), (layer.lora_B, 0.5)):
            t.copy_(std * torch.randn(t.shape, generator=g))
    return layer


@_safe
def check_merge(fn: Callable) -> Feedback:
    """Exercise 2: fn(layer) folds scaling * B @ A into layer.base.weight, like LoRALinear.merge."""
    todo = "Add scaling * B @ A to layer.base.weight in place, then set layer.merged = True."
    hints = dict.fromkeys(("grad", "leaf"), "Do the update inside `with torch.no_grad():`")
    restored = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer = _merge_case(dtype)
        ref = copy.deepcopy(layer)
        ref.merge()
        w0 = layer.base.weight.detach().clone()
        x = torch.randn(5, IN, generator=torch.Generator().manual_seed(3)).to(dtype)
        with torch.no_grad():
            before = layer(x)
        returned, problem = _call(fn, "my_merge", todo, layer, hints=hints)
        if problem:
            return problem
        w, want = layer.base.weight, ref.base.weight
        if not isinstance(w, torch.Tensor) or w.shape != w0.shape:
            return _no("layer.base.weight is no longer a weight of the same shape")
        if w.dtype != dtype:
            return _no(
                f"layer.base.weight is now {w.dtype}, was {dtype}: cast the merged weight back "
                "to the base's dtype (the adapters are float32 on a bfloat16 base)"
            )
        if w.requires_grad:
            return _no(
                "layer.base.weight now requires grad, so the frozen base would train: update "
                "it in place under torch.no_grad() rather than making a new nn.Parameter"
            )
        w = w.detach()
        if torch.equal(w, w0):
            if isinstance(returned, torch.Tensor) and _close(returned.detach(), want):
                return _no("you returned the merged weight but left layer.base.weight as it was")
            return _no(f"layer.base.weight did not change. {todo}")
        if dtype == torch.float32 and not _close(w, want):
            k = _factor(w - w0, want - w0)
            known = {
                2.0: "ΔW was added twice",
                1 / SCALING: "the scaling is not applied",
                -1.0: "you subtracted ΔW: that is unmerge",
            }
            hint = _match_factor(k, known) or "is it W + scaling * B @ A?"
            return _no(f"your merged weight differs from the reference {_where(w - want)}: {hint}")
        # In bf16, rounding once gives exactly the lab's result; a few entries may still differ
        # when a float32 sum rounded to the other side of a bf16 boundary.
        wrong = (w != want).float().mean().item()
        if dtype == torch.bfloat16 and wrong > 0.01:
            # bf16 keeps 8 significant bits: rounding W, ΔW or their sum moves each entry by at
            # most 2**-8 of the larger of |W| and |ΔW|; a formula error moves it further.
            w0f, wantf = w0.float(), want.float()
            steps = 2.0**-6 * (w0f.abs() + (wantf - w0f).abs())
            if bool(((w.float() - wantf).abs() <= steps).all()):
                return _no(
                    "in bfloat16 many of your merged entries are one rounding step off: "
                    "you rounded twice, casting ΔW to bfloat16 before adding (delta_weight() "
                    "does that). Add in float32, round once: (W.float() + ΔW).to(W.dtype)"
                )
            return _no(f"in bfloat16 your merged weight differs {_where(w.float() - want.float())}")
        if layer.merged is not True:
            return _no(
                "layer.merged is still False: set it, or the forward adds B A x a second time "
                "on top of the merged weight"
            )
        with torch.no_grad():
            after = layer(x)
        if dtype == torch.float32 and not _close(after, before):
            return _no(f"after merging, the layer's output changed {_where(after - before)}")
        w1 = w.clone()
        _, problem = _call(fn, "my_merge", todo, layer, hints=hints)
        if problem:
            return _no(f"on an already merged layer, {problem.message}")
        if not torch.equal(layer.base.weight.detach(), w1):
            return _no(
                "calling my_merge on a merged layer changed W again: ΔW is now in it twice. "
                "Check layer.merged first and return without doing anything"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.unmerge()  # the lab's unmerge: how close does W come back?
        restored[dtype] = (layer.base.weight.float() - w0.float()).abs().max().item()
    fp32 = "within 1e-6" if restored[torch.float32] < 1e-6 else "almost exactly"
    bf16 = "by more than 1e-3" if restored[torch.bfloat16] > 1e-3 else "slightly"
    return Feedback(
        True,
        "my_merge folds scaling * B @ A into W in place, rounds once, keeps the dtype, sets "
        "merged, and a second call changes nothing. After merge and the lab's unmerge, W comes "
        f"back {fp32} in float32 but is off {bf16} in bfloat16: each step rounds to 8 "
        "significant bits, and the second rounding does not undo the first.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 3: counting trainable parameters
# ---------------------------------------------------------------------------------------------

COUNT_CASES: tuple[tuple[str, dict, tuple[str, ...], int], ...] = (
    ("cpu", {}, ("q_proj", "v_proj"), 8),
    ("cpu", {}, ("up_proj", "down_proj"), 4),
    ("cpu", {"bias": True}, ("q_proj", "k_proj", "v_proj", "o_proj"), 2),
    ("tiny", {}, ("k_proj", "o_proj", "up_proj"), 3),
    ("gpt3-175b", {}, ("q_proj", "v_proj"), 1),  # the LoRA paper's 4.7M (Table 4)
)


@functools.cache
def _lab_count(config: ModelConfig, targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """(trainable, total) from the lab: add_lora on the meta device, then count_parameters."""
    with torch.device("meta"):
        model = ToyTransformer(config)
    add_lora(model, targets, rank=rank)
    counts = count_parameters(model)
    return counts.trainable, counts.total


def _count_hint(answer: int, config: ModelConfig, targets: Sequence[str], rank: int) -> str:
    """Why `answer` might differ from the lab's count: the usual mistakes, known by their value."""
    d, f, n = config.d_model, config.d_ff, config.n_layers
    dims = [{"up_proj": (d, f), "down_proj": (f, d)}.get(t, (d, d)) for t in targets]
    ins, outs = sum(i for i, _ in dims), sum(o for _, o in dims)
    expected, total = _lab_count(config, tuple(targets), rank)
    known = [  # first match wins
        (total, "that counts every parameter: the frozen base does not train, only A and B"),
        (total - expected, "that is the frozen base's size: count only the adapters A and B"),
        (expected + n * outs, "you counted one bias per output: A and B have none"),
        (expected // n, f"that is one layer's worth: the model has n_layers = {n}"),
        (n * rank * sum(i * o for i, o in dims), "A (r x in) and B (out x r): r * (in + out)"),
        (n * rank * ins, "that counts only A (r x in): add B (out x r)"),
        (n * rank * outs, "that counts only B (out x r): add A (r x in)"),
        (n * rank * 2 * d * len(dims), f"up_proj is d_model -> d_ff ({d} -> {f}), down_proj back"),
        (2 * expected, "twice the right count: is each adapter counted twice?"),
    ]
    return next((hint for value, hint in known if answer == value), "")


@_safe
def check_count(fn: Callable) -> Feedback:
    """Exercise 3: fn(config, targets, rank) -> trainable parameters, checked on COUNT_CASES."""
    todo = "Return the number of trainable parameters, an int: count what A and B hold."
    rows = []
    for preset, overrides, targets, rank in COUNT_CASES:
        config = get_preset(preset, **overrides)
        expected, _ = _lab_count(config, targets, rank)
        name = preset + (" with biases" if overrides.get("bias") else "")
        answer, problem = _call(fn, "my_count", todo, config, targets, rank)
        if problem:
            return problem
        if isinstance(answer, torch.Tensor) and answer.numel() == 1:
            answer = answer.item()
        if answer is None:
            return _no(f"my_count returned None. {todo}")
        if not isinstance(answer, numbers.Real) or isinstance(answer, bool):
            return _no(f"my_count returned a {type(answer).__name__}; expected an int")
        if not (math.isfinite(answer) and answer == int(answer)):
            return _no(f"my_count returned {answer!r}; a parameter count is a whole number")
        if int(answer) != expected:
            hint = _count_hint(int(answer), config, targets, rank)
            return _no(
                f"for {name}, targets {', '.join(targets)}, rank {rank}: you count "
                f"{int(answer):,}, the lab counts {expected:,}" + (f". {hint}" if hint else "")
            )
        row = {"model": name, "targets": ", ".join(targets), "rank": rank, "trainable": expected}
        rows.append(row)
    return Feedback(
        True,
        "your counts match the lab's on every case (the last is the LoRA paper's 4.7M):\n"
        + format_table(rows),
    )


# ---------------------------------------------------------------------------------------------
# Exercise 4: a parameter budget
# ---------------------------------------------------------------------------------------------


@functools.cache
def _shipped_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load_base_model("cpu").state_dict().items()}


@_safe
def check_budget(model: object) -> Feedback:
    """Exercise 4: LoRA on the shipped base, <= BUDGET trainable, accuracy on BUDGET_TASK."""
    todo = (
        f"Choose targets and a rank that train at most {BUDGET:,} parameters, add them to "
        f"lab.load_base_model() and train on {BUDGET_TASK!r} to held-out accuracy "
        f">= {BUDGET_ACCURACY:.2f}. Exercise 3's count gives the cost before you train."
    )
    if model is None:
        return _no(f"no trained model yet. {todo}")
    if not isinstance(model, ToyTransformer) or model.config != PRESETS["cpu"]:
        return _no(f"expected the shipped base (lab.load_base_model()), got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        return _no(f"the model has no LoRA layers: call lab.add_lora before training. {todo}")
    leaves = sorted({name.rpartition(".")[2] for name in layers})
    if invalid := [t for t in leaves if t not in ALL_TARGETS]:
        return _no(f"{invalid} are not LoRA targets here; choose among {', '.join(ALL_TARGETS)}")
    if any(layer.merged for layer in layers.values()):
        return _no("the adapters are merged: call lab.unmerge_lora(model) so they can be checked")
    adapters = {id(p) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if extra:
        more = " and more" if len(extra) > 1 else ""
        return _no(f"parameters outside the adapters train ({extra[0]}{more}): freeze them")
    trainable = count_parameters(model).trainable
    ranks = "/".join(str(r) for r in sorted({layer.rank for layer in layers.values()}))
    plan = f"rank {ranks} on {', '.join(leaves)}"
    if trainable > BUDGET:
        return _no(
            f"{plan} trains {trainable:,} parameters, over the budget of {BUDGET:,}. Each adapted "
            "layer costs r * (in + out) in each of the 2 blocks: q, k, v, o are 128 -> 128, "
            "up and down 128 <-> 512. Lower the rank or adapt fewer layers"
        )
    shipped = _shipped_weights()
    for name, value in model.state_dict().items():
        key = name.replace(".base.", ".")
        if key in shipped and not torch.equal(value.detach().cpu(), shipped[key]):
            return _no(f"{key} differs from the shipped base: train only the adapters")
    accuracy = get_task(BUDGET_TASK).evaluate(model)["accuracy"]
    if accuracy < BUDGET_ACCURACY:
        return _no(
            f"{plan} ({trainable:,} parameters) reaches held-out accuracy {accuracy:.2f} on "
            f"{BUDGET_TASK}, below {BUDGET_ACCURACY:.2f}: train longer (up to 300 steps, lr 2e-2), "
            "or spend the budget on other layers"
        )
    return Feedback(
        True,
        f"{plan}: {trainable:,} trainable parameters (budget {BUDGET:,}), held-out accuracy "
        f"on {BUDGET_TASK} at least {BUDGET_ACCURACY:.2f}, the base untouched.",
    )


# ---------------------------------------------------------------------------------------------
# Exercise 5: explaining a sweep
# ---------------------------------------------------------------------------------------------

SWEEP_CHOICES: dict[str, tuple[str, str]] = {  # letter -> (choice, why it is right or wrong)
    "A": (
        "At rank 64 rsLoRA trains more parameters, so it overfits the training set.",
        "both rules train the same 65,536 parameters (the scaling is a number, not a "
        "parameter), and rsLoRA's training loss stays high too: it underfits, it does not overfit",
    ),
    "B": (
        "alpha / sqrt(r) makes the update 8 times larger at rank 64 (scaling 2 instead of 0.25); "
        "Adam moves B by about lr per step whatever the scale, so ΔW moves 8 times faster, and "
        "lr 2e-2, tuned for alpha / r, is too large a step.",
        "with Adam the scaling acts like a learning-rate multiplier on ΔW; rsLoRA needs a "
        "smaller lr (or alpha) at high rank, alpha / r shrinks its step as the rank grows",
    ),
    "C": (
        "alpha / r makes ΔW grow with the rank, which is why alpha / r improves up to rank 64.",
        "alpha / r shrinks the scaling as the rank grows (2 at rank 8, 0.25 at rank 64); it "
        "improves because more rank means more capacity, at a step size that stays tame",
    ),
    "D": (
        "Rank 64 is more than a 128 x 128 layer can use, so rsLoRA's extra rank is thrown away.",
        "rank 64 is below min(in, out) = 128, and alpha / r at the same rank reaches 0.91: "
        "the rank itself is usable",
    ),
    "E": (
        "It is seed noise: one unlucky run.",
        "the rsLoRA column falls steadily as the rank grows, and the repeated rank-8 runs agree "
        "within a couple of points: a drop of about 60 points is not noise",
    ),
}
SWEEP_ANSWER = "B"


def sweep_evidence() -> str:
    """The shipped grid on sort_desc at alpha 16: accuracy and final loss by rank, both rules."""
    results = select(load_grid_file(), task="sort_desc", alpha=16.0, dropout=0.0, seed=0)
    rows = []
    for rank in (8, 16, 32, 64):
        row: dict[str, object] = {"rank": rank}
        for rslora, label in ((False, "LoRA"), (True, "rsLoRA")):
            hits = [r for r in results if r.point.rank == rank and r.point.rslora == rslora]
            if hits:
                tail = hits[0].losses[-50:]  # the training loss where training ended
                row[f"{label} scaling"] = f"{16 / (math.sqrt(rank) if rslora else rank):.2f}"
                row[f"{label} acc"] = f"{hits[0].heldout['accuracy']:.2f}"
                row[f"{label} loss"] = f"{sum(tail) / len(tail):.2f}"
        rows.append(row)
    return format_table(rows)


@_safe
def check_sweep_answer(answer: object) -> Feedback:
    """Exercise 5: the letter of the explanation in SWEEP_CHOICES; every wrong one is explained."""
    letters = ", ".join(SWEEP_CHOICES)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return _no(f"no answer yet: set ANSWER to one letter, {letters}")
    letter = answer.strip().strip(".)").upper() if isinstance(answer, str) else None
    if letter not in SWEEP_CHOICES:
        return _no(f"answer one letter of {letters}; got {answer!r}")
    _, why = SWEEP_CHOICES[letter]
    if letter == SWEEP_ANSWER:
        return Feedback(True, f"{letter}: {why}.")
    return _no(f"{letter} is not it: {why}.")


# ---------------------------------------------------------------------------------------------
# Exercise 6: predicting the memory LoRA saves
# ---------------------------------------------------------------------------------------------


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


def _bytes_hint(guess: float, n: int, n_frozen: int) -> str:
    """Why a byte count might be off: its value per trainable parameter says a lot."""
    per = guess / n
    known = {
        4: "that is the gradients alone: AdamW also keeps two moments per parameter",
        8: "one fp32 value per parameter is missing: a gradient and two Adam moments",
        16: "you included the weights themselves: the question is gradients + optimizer state",
        1: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        3: "that is a count of values, not bytes: each fp32 value takes 4 bytes",
        6: "the lab trains in float32: 4 bytes per value, not 2",
    }
    if hint := next((h for v, h in known.items() if math.isclose(per, v, rel_tol=0.02)), None):
        return hint
    if math.isclose(guess / (n + n_frozen), 12, rel_tol=0.05):
        return "you counted the frozen base too: only A and B get gradients and Adam moments"
    if guess < 1e4:
        return "that is very small: give bytes, not KiB or MiB"
    return "count the trainable parameters, then bytes for a gradient and two Adam moments"


@_safe
def check_memory(full_bytes: object, lora_bytes: object) -> Feedback:
    """Exercise 6: predicted bytes of gradients + AdamW state, full fine-tuning and LoRA."""
    guesses = {"full": full_bytes, "lora": lora_bytes}
    for kind, guess in guesses.items():
        if guess is None:
            return _no(
                f"no prediction for {kind} yet: give a number of bytes for FULL_BYTES and "
                "LORA_BYTES (gradients + AdamW state on the 'cpu' preset)"
            )
        number = isinstance(guess, numbers.Real) and not isinstance(guess, bool)
        if not number or not math.isfinite(guess) or guess <= 0:
            return _no(f"the {kind} prediction should be a positive number of bytes: {guess!r}")
    state = _state_bytes()
    full, lora = state["full"], state["lora"]
    names = {"full": "full fine-tuning", "lora": f"LoRA r={MEMORY_RANK} on q, v"}
    for kind, guess in guesses.items():
        want = state[kind]["analytic"]  # the measurement agrees to a few bytes; check both
        if any(abs(guess - v) > TOLERANCE * v for v in (want, state[kind]["measured"])):
            n, frozen = state[kind]["trainable"], full["trainable"] - state[kind]["trainable"]
            return _no(
                f"{names[kind]}: you predict {format_bytes(guess)}, the lab's count is "
                f"{format_bytes(want)}: {_bytes_hint(float(guess), n, frozen)}"
            )
    return Feedback(
        True,
        f"within {TOLERANCE:.0%} of the lab on both. Gradients + AdamW state: full fine-tuning "
        f"{full['trainable']:,} x 12 bytes = {format_bytes(full['analytic'])} (measured "
        f"{format_bytes(full['measured'])}), LoRA {lora['trainable']:,} x 12 bytes = "
        f"{format_bytes(lora['analytic'])} (measured {format_bytes(lora['measured'])}): "
        f"{full['analytic'] / lora['analytic']:.0f} times less. The frozen weights and the "
        "activations are still there in both: LoRA saves only on what trains.",
    )
