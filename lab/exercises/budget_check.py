"""Exercise 4: targets and a rank that fit a parameter budget and still learn the task."""

from __future__ import annotations

import functools
import numbers

import torch
from torch import nn

from ..base import load_base_model
from ..engine.points import ALL_TARGETS
from ..lora import LoRALinear
from ..model import PRESETS, ToyTransformer
from ..surgery import add_lora, lora_layers
from ..tasks import get_task
from ..training import train
from .count_check import _lab_count
from .feedback import Feedback, _no, _safe

__all__ = [
    "BUDGET",
    "BUDGET_ACCURACY",
    "BUDGET_TASK",
    "check_budget",
    "train_budget",
]


BUDGET = 4096  # exercise 4: trainable parameters allowed (q and v at rank 4 fit exactly)
BUDGET_TASK, BUDGET_ACCURACY = "rotate", 0.9

SHORT_TARGETS = {t.removesuffix("_proj"): t for t in ALL_TARGETS}  # q -> q_proj, ..., down
BUDGET_STEPS, BUDGET_LR, BUDGET_ALPHA = 300, 2e-2, 16.0


def _budget_targets(targets: object) -> tuple[tuple[str, ...], Feedback | None]:
    """Full target names from TARGETS (short names q, k, v, o, up, down welcome), or feedback."""
    valid = ", ".join(f"{t} ({s})" for s, t in SHORT_TARGETS.items())
    if isinstance(targets, str):  # one name, or names separated by commas or spaces
        targets = tuple(t for t in targets.replace(",", " ").split() if t)
    if not isinstance(targets, tuple | list | set | frozenset):
        return (), _no(f"TARGETS should be a tuple of names, got {targets!r}; choose among {valid}")
    names, unknown = [], []
    for t in targets:
        name = SHORT_TARGETS.get(t, t) if isinstance(t, str) else t
        (names if name in ALL_TARGETS else unknown).append(name if name in ALL_TARGETS else t)
    if unknown:
        return (), _no(f"TARGETS: {unknown!r} are not LoRA targets here; choose among {valid}")
    if not names:
        return (), _no(f"TARGETS is empty; choose among {valid}")
    return tuple(sorted(set(names), key=ALL_TARGETS.index)), None


def train_budget(targets: object, rank: object, steps: object = 150) -> object:
    """Exercise 4's model: the shipped base with LoRA on `targets` at `rank` (alpha 16, seed 0),
    trained `steps` steps on rotate at lr 2e-2, as notebook 4 does with lab.add_lora and
    lab.train. None while nothing is chosen; a Feedback (what to fix) for a choice that cannot
    be trained, or is over the budget, without training anything.
    """
    if not targets and not rank:
        return None
    names, problem = _budget_targets(targets)
    if problem:
        return problem
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or not 1 <= rank <= 128:
        return _no(f"RANK should be a whole number from 1 to 128 (d_model), got {rank!r}")
    rank = int(rank)  # a numpy integer is a whole number too
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= BUDGET_STEPS:
        return _no(f"STEPS should be a whole number from 1 to {BUDGET_STEPS}, got {steps!r}")
    cost, _ = _lab_count(PRESETS["cpu"], names, rank)
    if cost > BUDGET:
        return _no(
            f"rank {rank} on {', '.join(names)} costs {cost:,} parameters, over the budget of "
            f"{BUDGET:,} (not trained). Each adapted layer costs r * (in + out) in each of the "
            "2 blocks: q, k, v, o are 128 -> 128, up and down 128 <-> 512"
        )
    torch.manual_seed(0)  # A's random initialisation
    model = load_base_model("cpu")
    add_lora(model, targets=names, rank=rank, alpha=BUDGET_ALPHA)
    train(
        model,
        get_task(BUDGET_TASK),
        steps=steps,
        lr=BUDGET_LR,
        progress=False,
        measure_memory=False,
    )
    return model


@functools.cache
def _shipped_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in load_base_model("cpu").state_dict().items()}


@functools.cache
def _shipped_modules() -> dict[str, type]:
    return {n: type(m) for n, m in load_base_model("cpu").named_modules()}


def _structure_problem(model: ToyTransformer) -> Feedback | None:
    """Feedback if the model is not the shipped architecture with LoRALinears on its linears."""
    shipped = _shipped_modules()
    seen = set()
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in seen):
            continue  # a LoRALinear's own insides (base, dropout)
        if isinstance(module, LoRALinear):
            if shipped.get(name) is not nn.Linear:
                return _no(f"{name} is a LoRA layer where the shipped base has none: remove it")
            seen.add(name)
            continue
        if shipped.get(name) is not type(module):
            got = type(module).__name__
            return _no(f"{name or 'the model'} is a {got}, not the shipped base's: use add_lora")
        if "forward" in vars(module):
            return _no(f"{name or 'the model'} has its forward replaced: keep the model's own")
    if missing := [n for n in shipped if n and n not in dict(model.named_modules())]:
        return _no(f"the model lacks {missing[0]}, which the shipped base has")
    return None


@_safe
def check_budget(model: object) -> Feedback:
    """Exercise 4: LoRA on the shipped base, adapters <= BUDGET values, accuracy on BUDGET_TASK.

    The budget counts the adapter's size: every value of every lora_A and lora_B, whether or not
    it requires grad, and any other parameter that differs from the shipped base.
    """
    todo = (
        f"Choose targets and a rank that train at most {BUDGET:,} parameters, add them to "
        f"lab.load_base_model() and train on {BUDGET_TASK!r} to held-out accuracy "
        f">= {BUDGET_ACCURACY:.2f}. Exercise 3's count gives the cost before you train."
    )
    if isinstance(model, Feedback):  # train_budget's word on a choice it did not train
        if not model.passed:  # train_budget never returns a passing one: that is no model
            return model
        return _no(f"check_budget wants the trained model that train_budget returns. {todo}")
    if model is None:
        return _no(f"no trained model yet. {todo}")
    if not isinstance(model, ToyTransformer) or model.config != PRESETS["cpu"]:
        return _no(f"expected the shipped base (lab.load_base_model()), got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        return _no(f"the model has no LoRA layers: call lab.add_lora before training. {todo}")
    leaves = sorted({name.rpartition(".")[2] for name in layers}, key=_target_order)
    if invalid := [t for t in leaves if t not in ALL_TARGETS]:
        return _no(f"{invalid} are not LoRA targets here; choose among {', '.join(ALL_TARGETS)}")
    if problem := _structure_problem(model):
        return problem
    if any(layer.merged is not False for layer in layers.values()):
        return _no("the adapters are merged: call lab.unmerge_lora(model) so they can be checked")
    adapters = {id(p): p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if extra:
        more = " and more" if len(extra) > 1 else ""
        return _no(f"parameters outside the adapters train ({extra[0]}{more}): freeze them")
    shipped = _shipped_weights()
    state = model.state_dict()
    for name, value in state.items():
        key = name.replace(".base.", ".")
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if key not in shipped:
            return _no(f"the model has {name}, which the shipped base lacks: add only LoRA")
        same = value.dtype == shipped[key].dtype and value.shape == shipped[key].shape
        if not (same and torch.equal(value.detach().cpu(), shipped[key])):
            return _no(f"{key} differs from the shipped base: train only the adapters")
    size = sum(p.numel() for p in adapters.values())
    frozen = [n for n, p in model.named_parameters() if id(p) in adapters and not p.requires_grad]
    ranks = "/".join(str(r) for r in sorted({layer.lora_A.shape[0] for layer in layers.values()}))
    plan = f"rank {ranks} on {', '.join(leaves)}"
    if size > BUDGET:
        froze = (
            f" Freezing {frozen[0].rpartition('.')[2]} does not make it cheaper: the budget "
            "counts the adapter's size, every value of A and B, trained or not (a frozen A "
            "is still random numbers the adapter must store)."
            if frozen
            else ""
        )
        return _no(
            f"{plan}: its adapters hold {size:,} values, over the budget of {BUDGET:,}.{froze} "
            "Each adapted layer costs r * (in + out) in each of the 2 blocks: q, k, v, o are "
            "128 -> 128, up and down 128 <-> 512. Lower the rank or adapt fewer layers"
        )
    if not all(bool(torch.isfinite(p).all()) for p in adapters.values()):
        return _no(f"{plan}: the adapters hold inf or nan: train again with a smaller lr")
    accuracy = get_task(BUDGET_TASK).evaluate(model)["accuracy"]
    if not accuracy >= BUDGET_ACCURACY:
        return _no(
            f"{plan} ({size:,} parameters) reaches held-out accuracy {accuracy:.2f} on "
            f"{BUDGET_TASK}, below {BUDGET_ACCURACY:.2f}: train longer (up to "
            f"{BUDGET_STEPS} steps, lr 2e-2), or spend the budget on other layers"
        )
    return Feedback(
        True,
        f"{plan}: {size:,} adapter parameters (budget {BUDGET:,}), held-out accuracy "
        f"on {BUDGET_TASK} at least {BUDGET_ACCURACY:.2f}, the base untouched.",
    )


def _target_order(name: str) -> int:
    return ALL_TARGETS.index(name) if name in ALL_TARGETS else len(ALL_TARGETS)
