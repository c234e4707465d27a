"""Exercise 3: counting a model's trainable parameters under LoRA, on models drawn at random."""

from __future__ import annotations

import copy
import functools
import math
import numbers
import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine.points import ALL_TARGETS
from ..model import PRESETS, ModelConfig, ToyTransformer, get_preset
from ..surgery import add_lora, count_parameters
from .feedback import ACTIVE_WATCHES, Feedback, _call, _no, _safe

__all__ = [
    "check_count",
]


# Drawn afresh for every check, so no table of answers can pass: each case is a model of random
# size (blocks, width, MLP width, vocabulary, biases) with random targets and rank. The shapes
# of the draws make the known slips tell apart: one case adapts attention only, one a single
# MLP layer beside attention (so A and B differ in size), one has biases, one many blocks.
PAPER_CASE = ("gpt3-175b", ("q_proj", "v_proj"), 1)  # the LoRA paper's 4.7M (Table 4)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _random_config(rng: random.Random, bias: bool = False, layers: int = 12) -> ModelConfig:
    heads = rng.randint(1, 16)
    d = heads * rng.choice((8, 16, 32, 64))
    return ModelConfig(
        vocab_size=rng.randint(30, 60_000),
        d_model=d,
        n_layers=rng.randint(2, layers),
        n_heads=heads,
        d_ff=rng.randint(d + 1, 6 * d),  # any width, not always 4 x d_model
        max_seq_len=rng.randint(16, 4096),
        bias=bias,
    )


def _count_cases(
    rng: random.Random | None = None,
) -> list[tuple[ModelConfig, tuple[str, ...], int]]:
    """(config, targets, rank) for one check: four random cases, then the paper's."""
    rng = rng or random.SystemRandom()  # the system's entropy: nothing a notebook can seed

    def some(pool: Sequence[str], least: int = 1) -> list[str]:
        return rng.sample(list(pool), rng.randint(least, len(pool)))

    mlp = rng.choice(("up_proj", "down_proj"))
    drawn = [
        (_random_config(rng), some(ATTENTION_TARGETS)),
        (_random_config(rng), [*some(ATTENTION_TARGETS), mlp]),
        (_random_config(rng, bias=True), some(ALL_TARGETS)),
        (_random_config(rng, layers=96), some(ALL_TARGETS, 2)),
    ]
    cases = [  # a rank the lab accepts: at most the smallest side of every adapted layer
        (config, tuple(sorted(targets, key=ALL_TARGETS.index)), rng.randint(1, min(64, d)))
        for config, targets in drawn
        for d in [config.d_model]
    ]
    preset, targets, rank = PAPER_CASE
    return [*cases, (get_preset(preset), targets, rank)]


@functools.lru_cache(maxsize=256)
def _lab_count(config: ModelConfig, targets: tuple[str, ...], rank: int) -> tuple[int, int]:
    """(trainable, total) from the lab: add_lora on the meta device, then count_parameters."""
    with torch.device("meta"):
        model = ToyTransformer(config)
    add_lora(model, targets, rank=rank)
    counts = count_parameters(model)
    return counts.trainable, counts.total


def _count_mistakes(
    config: ModelConfig, targets: Sequence[str], rank: int
) -> list[tuple[str, int]]:
    """(hint, the count that mistake gives on this case), in the order they are tried."""
    d, f, n = config.d_model, config.d_ff, config.n_layers
    dims = [{"up_proj": (d, f), "down_proj": (f, d)}.get(t, (d, d)) for t in targets]
    ins, outs = sum(i for i, _ in dims), sum(o for _, o in dims)
    expected, total = _lab_count(config, tuple(targets), rank)
    dense = sum(i * o for i, o in dims)
    mlp = sum(t in ("up_proj", "down_proj") for t in targets)
    four_d = expected + n * rank * mlp * (4 * d - f)  # the MLP as if d_ff were 4 x d_model
    return [
        ("that counts every parameter: the frozen base does not train, only A and B", total),
        ("that is the frozen base's size: count only the adapters A and B", total - expected),
        ("that counts only A (r x in): add B (out x r)", n * rank * ins),
        ("that counts only B (out x r): add A (r x in)", n * rank * outs),
        ("that is one block's worth: multiply by n_layers, the number of blocks", expected // n),
        ("you counted one bias per output: A and B have none", expected + n * outs),
        ("A (r x in) and B (out x r) hold r * (in + out), not r * in * out", n * rank * dense),
        ("that is the size of the target weights (in x out): LoRA trains A and B", n * dense),
        ("the rank is missing: A has r rows and B r columns", n * (ins + outs)),
        ("up_proj is d_model -> d_ff, down_proj d_ff -> d_model", n * rank * 2 * d * len(dims)),
        ("d_ff is config.d_ff, not 4 x d_model: read it from the config", four_d),
        ("twice the right count: is each adapter counted twice?", 2 * expected),
    ]


def _count_hint(answers: list[int], cases: Sequence[tuple]) -> str:
    """The mistake that explains the answers on every case, or ''."""
    per_case = [_count_mistakes(*case) for case in cases]
    for i, (hint, _) in enumerate(per_case[0]):
        if all(answer == case[i][1] for answer, case in zip(answers, per_case, strict=True)):
            return hint
    return ""


def _describe_case(config: ModelConfig, targets: Sequence[str], rank: int) -> str:
    model = next((n for n, c in PRESETS.items() if c == config), None)
    model = model or (
        f"a model with d_model {config.d_model}, d_ff {config.d_ff}, {config.n_layers} blocks"
        + (", biases on" if config.bias else "")
    )
    return f"{model}, targets {', '.join(targets)}, rank {rank}"


class _BuildsModules:
    """Counts the parameters any nn.Module registers while it is active (a model being built)."""

    kind = "builds_modules"

    def __enter__(self) -> _BuildsModules:
        self.count = 0
        ACTIVE_WATCHES.append(self)

        def hook(module: nn.Module, name: str, param: object) -> None:
            self.count += 1

        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        ACTIVE_WATCHES.remove(self)
        self.handle.remove()


@_safe
def check_count(fn: Callable) -> Feedback:
    """Exercise 3: fn(config, targets, rank) -> trainable parameters, on cases drawn per check."""
    todo = "Return the number of trainable parameters, an int: count what A and B hold."
    call = "my_count(config, targets, rank)"
    cases = _count_cases()
    answers, first_wrong = [], None
    for config, targets, rank in cases:
        expected, _ = _lab_count(config, targets, rank)
        given = copy.deepcopy(config)  # the student's own copy: the check keeps its case
        with _BuildsModules() as built:
            answer, problem = _call(fn, "my_count", todo, given, targets, rank, call=call)
        if problem:
            return problem
        if given != config:
            return _no("my_count changed the config it was given: read it, do not change it")
        if built.count:
            return _no(
                "my_count builds a model (its layers registered parameters): count by hand, "
                "from config.d_model, config.d_ff and config.n_layers, with no model and no "
                "lab.count_parameters"
            )
        if isinstance(answer, torch.Tensor) and answer.numel() == 1:
            answer = answer.item()
        if answer is None:
            return _no(f"my_count returned None. {todo}")
        if not isinstance(answer, numbers.Real) or isinstance(answer, bool):
            return _no(f"my_count returned a {type(answer).__name__}; expected an int")
        if not (math.isfinite(answer) and answer == int(answer)):
            return _no(f"my_count returned {answer!r}; a parameter count is a whole number")
        answers.append(int(answer))
        if int(answer) != expected and first_wrong is None:
            # The expected count is not shown: the case is new every time, but a count the
            # student can read back is one a table could hold.
            side = "more" if int(answer) > expected else "fewer"
            first_wrong = (
                f"for {_describe_case(config, targets, rank)}: you count {int(answer):,}, "
                f"{side} than the lab counts"
            )
    if first_wrong:
        hint = _count_hint(answers, cases) or (
            "each adapted layer has A (r x in) and B (out x r), r * (in + out) numbers, in "
            "each of the n_layers blocks; read in and out from the config"
        )
        return _no(f"{first_wrong}. {hint}")
    paper, _ = _lab_count(*cases[-1])
    return Feedback(
        True,
        f"your counts match the lab's on {len(cases) - 1} models drawn at random for this check "
        "(widths, blocks, biases, targets and ranks all vary) and on GPT-3 175B with LoRA on "
        f"q and v at rank 1: {paper:,}, the LoRA paper's 4.7M.",
    )
