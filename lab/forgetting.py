"""What fine-tuning costs the base: its pretraining skills measured after training, and replay.

The base model was pretrained on four skills (copy, reverse, sort, add): they are the source
domain of "LoRA Learns Less and Forgets Less" (Biderman et al. 2024) on the toy. After a
fine-tuning run, `forgetting(model)` measures each skill's held-out exact-match accuracy and
loss. Accuracy saturates (an answer is right or wrong), so the loss is the continuous measure
of how far a skill moved.

On the toy, fine-tuning data share nothing with the pretraining skills (a new task token, no
copy/reverse/sort/add examples), so nothing in the loss holds those skills in place: 20 steps
at LoRA's usual learning rate already drop them to a few percent. Practitioners fight this
with *replay*: a small fraction of each batch drawn from the pretraining mixture.
`with_replay(task, fraction)` builds that mixture; `SweepPoint(replay=...)` trains with it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import nn

from .tasks import PRETRAIN_TASKS, VOCAB, Task, get_task

__all__ = ["MAX_REPLAY", "check_replay", "forgetting", "source_summary", "with_replay"]

MAX_REPLAY = 0.5  # above half, the "fine-tuning" run trains mostly on the pretraining mixture
_REPLAY_SEED = 1234  # which pretraining examples are replayed: fixed, the same on every machine
_CACHE: dict[tuple[str, float], Task] = {}


def check_replay(fraction: object) -> float:
    """A fraction in [0, MAX_REPLAY] (not a bool, not a string) as a float, else an error."""
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):
        raise TypeError(
            f"replay={fraction!r}: expected a fraction in [0, {MAX_REPLAY:g}] of each batch "
            f"drawn from the pretraining mixture, got {type(fraction).__name__}"
        )
    if not (math.isfinite(fraction) and 0.0 <= fraction <= MAX_REPLAY):
        raise ValueError(
            f"replay={fraction!r}: expected a fraction in [0, {MAX_REPLAY:g}] (0: none; "
            "practitioners replay 1-10%)"
        )
    return float(fraction)


def with_replay(task: Task, fraction: float) -> Task:
    """`task` with `fraction` of its training examples drawn from the pretraining mixture.

    The training set becomes the task's examples plus n * fraction / (1 - fraction) examples of
    the pretraining mixture (copy, reverse, sort, add in turn, a fixed selection), so a batch
    sampled uniformly holds `fraction` replayed examples on average. The held-out split stays
    the task's own: accuracy still measures the new task. fraction 0 returns `task` itself.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lab Task (lab.get_task(name)), got {type(task).__name__}")
    fraction = check_replay(fraction)
    if fraction == 0.0:
        return task
    key = (task.name, fraction)
    if key not in _CACHE:
        source = get_task("pretrain")
        n = round(task.n_train * fraction / (1.0 - fraction))
        if n > source.n_train:
            raise ValueError(
                f"replay={fraction:g} on {task.name} needs {n:,} pretraining examples; the "
                f"mixture has {source.n_train:,}"
            )
        pick = torch.randperm(source.n_train, generator=torch.Generator().manual_seed(_REPLAY_SEED))
        pick = pick[:n].sort().values
        _CACHE[key] = dataclasses.replace(
            task,
            name=f"{task.name}+replay{fraction:g}",
            description=f"{task.description}, with {fraction:.0%} replay of the pretraining mix",
            train_inputs=torch.cat([task.train_inputs, source.train_inputs[pick]]),
            train_targets=torch.cat([task.train_targets, source.train_targets[pick]]),
        )
    return _CACHE[key]


@torch.no_grad()
def forgetting(model: nn.Module) -> dict[str, dict[str, float]]:
    """Each pretraining skill's held-out accuracy and loss: {"copy": {"accuracy", "loss"}, ...}.

    The shipped base scores 97-100% on each. The model's train/eval mode is kept.
    """
    _check_language_model(model)
    out = {}
    for name in PRETRAIN_TASKS:
        result = get_task(name).evaluate(model)
        out[name] = {"accuracy": float(result["accuracy"]), "loss": float(result["loss"])}
    return out


_WANTED = (
    "a language model like lab.ToyTransformer: token ids (batch, seq) -> logits "
    f"(batch, seq, vocab >= {len(VOCAB)})"
)


def _check_language_model(model: object) -> None:
    """TypeError/ValueError unless `model` scores the lab's token sequences, tried on two."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module ({_WANTED}), got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"model ({type(model).__name__}) has no parameters: expected {_WANTED}")
    if any(p.is_meta for p in params):
        raise ValueError(
            "model is on the meta device (shapes only, no weights to measure): load or build "
            "it with weights, e.g. lab.load_base_model()"
        )
    probe = get_task(PRETRAIN_TASKS[0]).heldout_inputs[:2].to(params[0].device)
    was_training = model.training
    try:
        model.eval()
        logits = model(probe)
    except Exception as exc:  # whatever the model raised, say what it was asked to do
        raise ValueError(
            f"model ({type(model).__name__}) could not score the pretraining skills' token ids "
            f"{tuple(probe.shape)}: {type(exc).__name__}: {exc}. Expected {_WANTED}"
        ) from exc
    finally:
        model.train(was_training)
    if not (
        isinstance(logits, torch.Tensor)
        and logits.is_floating_point()
        and logits.ndim == 3
        and logits.shape[:2] == probe.shape
        and logits.shape[2] >= len(VOCAB)
    ):
        got = (
            f"a {tuple(logits.shape)} {logits.dtype} tensor"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(
            f"model ({type(model).__name__}) returned {got} for token ids {tuple(probe.shape)}: "
            f"expected {_WANTED}"
        )


def source_summary(measured: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean accuracy and mean loss over the pretraining skills of a `forgetting` dict."""
    if not isinstance(measured, dict) or set(measured) != set(PRETRAIN_TASKS):
        raise ValueError(
            f"expected a forgetting dict with the skills {', '.join(PRETRAIN_TASKS)}, "
            f"got {measured!r:.120}"
        )
    for t in PRETRAIN_TASKS:
        entry = measured[t]
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(key), numbers.Real) and not isinstance(entry.get(key), bool)
            for key in ("accuracy", "loss")
        )
        if not ok:
            raise ValueError(
                f"measured[{t!r}] must be a dict with numbers 'accuracy' and 'loss', as "
                f"forgetting(model) gives, got {entry!r:.120}"
            )
    return {
        key: sum(float(measured[t][key]) for t in PRETRAIN_TASKS) / len(PRETRAIN_TASKS)
        for key in ("accuracy", "loss")
    }
