"""Tests for lab.memory: measured memory agrees with the analytic prediction, FLOP counting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lab.memory import (
    MemoryBreakdown,
    analytic_flops,
    analytic_memory,
    flops_per_step,
    format_bytes,
    measure_step_memory,
)
from lab.model import ToyTransformer, get_preset
from lab.surgery import add_lora, count_parameters

# d_model 128, 2 layers: 1.6 MB of weights, so a few bytes of bookkeeping cannot hide an error.
CONFIG = get_preset("cpu")
BATCH, SEQ = 8, 32
TARGETS, RANK = ("q_proj", "v_proj"), 8


def _batch(config, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    return inputs, targets


def _model(config, lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ToyTransformer(config)
    if lora:
        add_lora(model, TARGETS, rank=RANK)
        # B starts at zero; make it non-zero so that A gets a gradient too (a realistic step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0.0, 0.02)
    return model


def _run_step(lora: bool) -> dict:
    model = _model(CONFIG, lora)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    measured = measure_step_memory(model, *_batch(CONFIG, BATCH, SEQ), optimizer)
    after = dict(model.named_parameters())
    return {
        "measured": measured,
        "predicted": analytic_memory(
            CONFIG, BATCH, SEQ, lora_targets=TARGETS if lora else None, lora_rank=RANK
        ),
        "model": model,
        "trainable_changed": all(not torch.equal(v, after[n]) for n, v in trainable.items()),
        "frozen_unchanged": all(torch.equal(v, after[n]) for n, v in frozen.items()),
        "n_trainable": count_parameters(model).trainable,
    }


@pytest.fixture(scope="module")
def steps() -> dict[str, dict]:
    return {"full": _run_step(lora=False), "lora": _run_step(lora=True)}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_measured_matches_analytic(steps, kind):
    step = steps[kind]
    measured, predicted = step["measured"], step["predicted"]
    assert measured.method == "MemTracker (cpu)" and measured.device == "cpu"
    for name in ("parameters", "gradients", "optimizer"):
        got, want = getattr(measured, name), getattr(predicted, name)
        assert want > 0 and got == pytest.approx(want, rel=0.15), (name, got, want)
    # the activation formula is an estimate, but it should be a good one for this model
    assert measured.activations == pytest.approx(predicted.activations, rel=0.25)
    # gradients are fp32 and one per trainable parameter; Adam keeps two moments each
    assert measured.gradients == 4 * step["n_trainable"]
    assert measured.optimizer >= 8 * step["n_trainable"]
    assert measured.peak > measured.parameters
    assert measured.loss is not None and measured.loss > 0


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_step_updates_only_trainable_parameters(steps, kind):
    assert steps[kind]["trainable_changed"]
    assert steps[kind]["frozen_unchanged"]
    assert all(p.grad is None for p in steps[kind]["model"].parameters())  # zero_grad ran


def test_lora_shrinks_gradients_and_optimizer_state(steps):
    full, lora = steps["full"]["measured"], steps["lora"]["measured"]
    assert lora.gradients + lora.optimizer < 0.1 * (full.gradients + full.optimizer)
    assert lora.parameters >= full.parameters  # the frozen base model is still all there


def test_activations_grow_with_batch_size():
    config = get_preset("tiny")
    activations = []
    for batch in (2, 8):
        model = _model(config, lora=False)
        optimizer = torch.optim.AdamW(model.parameters())
        result = measure_step_memory(model, *_batch(config, batch, 16), optimizer)
        activations.append(result.activations)
    assert 0 < activations[0] < activations[1]


def test_autocast_step():
    config = get_preset("tiny")
    model = _model(config, lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, targets = _batch(config, 4, 16)
    result = measure_step_memory(model, inputs, targets, optimizer, autocast_dtype=torch.bfloat16)
    assert result.activations > 0 and math.isfinite(result.loss)
    params = dict(model.named_parameters())
    assert all(not torch.equal(v, params[n]) for n, v in before.items())


def test_flops_of_a_linear_layer_are_exact():
    batch, seq, d_in, d_out = 3, 5, 16, 24
    layer = nn.Linear(d_in, d_out, bias=False)
    inputs = torch.randn(batch, seq, d_in)
    targets = torch.randint(0, d_out, (batch, seq))
    flops = flops_per_step(layer, inputs, targets)
    assert flops["forward"] == 2 * batch * seq * d_in * d_out
    assert flops["backward"] == flops["forward"]  # only the weight gradient: inputs need none
    assert flops["total"] == flops["forward"] + flops["backward"]
    assert layer.weight.grad is None


def test_flops_full_vs_lora():
    config = get_preset("tiny")
    inputs, targets = _batch(config, 4, 16)
    full_model, lora_model = _model(config, lora=False), _model(config, lora=True)
    full = flops_per_step(full_model, inputs, targets)
    lora = flops_per_step(lora_model, inputs, targets)
    assert lora["backward"] < full["backward"]
    assert all(p.grad is None for m in (full_model, lora_model) for p in m.parameters())
    # on CPU only the linear layers are counted, which is exactly what analytic_flops predicts
    assert full == analytic_flops(config, 4, 16)
    predicted = analytic_flops(config, 4, 16, lora_targets=TARGETS, lora_rank=RANK)
    assert lora["forward"] == predicted["forward"]
    assert lora == predicted  # including the first layer, which needs no backward for q/k/v


def test_flops_per_step_restores_existing_gradients():
    config = get_preset("tiny")
    model = _model(config, lora=False)
    grads = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    flops_per_step(model, *_batch(config, 2, 8))
    assert all(
        p.grad is grads[n] and bool((p.grad == 0.5).all()) for n, p in model.named_parameters()
    )


def test_analytic_memory_gpt3():
    config = get_preset("gpt3-175b")
    full = analytic_memory(config, 1, 2048, param_bytes=2)
    assert full.parameters == pytest.approx(175e9 * 2, rel=0.01)
    assert full.gradients == full.parameters * 2  # fp32 gradients for every parameter
    lora = analytic_memory(
        config, 1, 2048, lora_targets=("q_proj", "v_proj"), lora_rank=4, param_bytes=2
    )
    trainable = 18_874_368  # 96 layers * 2 matrices * rank 4 * (12288 + 12288)
    assert lora.gradients == trainable * 4
    assert lora.optimizer == trainable * 8
    assert lora.parameters == full.parameters + trainable * 4
    assert lora.activations < full.activations  # frozen layers keep fewer inputs
    assert lora.method == "analytic" and lora.peak == lora.total


def test_analytic_memory_options():
    config = get_preset("tiny")
    adam = analytic_memory(config, 2, 8)
    assert analytic_memory(config, 2, 8, optimizer="adam").optimizer == adam.optimizer
    assert analytic_memory(config, 2, 8, optimizer="sgd").optimizer == 0
    assert analytic_memory(config, 2, 8, optimizer="sgd_momentum").optimizer == adam.gradients
    assert analytic_memory(config, 4, 8).activations == 2 * adam.activations
    biased = analytic_memory(get_preset("tiny", bias=True), 2, 8)
    assert biased.parameters > adam.parameters
    one = analytic_memory(config, 2, 8, lora_targets="q_proj", lora_rank=4)
    assert one == analytic_memory(config, 2, 8, lora_targets=("q_proj",), lora_rank=4)
    with pytest.raises(ValueError, match="optimizer"):
        analytic_memory(config, 2, 8, optimizer="lion")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        analytic_memory(config, 2, 8, lora_targets=("query",), lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank"):
        analytic_memory(config, 2, 8, lora_targets=("q_proj",))


def test_memory_breakdown_helpers():
    mem = MemoryBreakdown(
        parameters=2**20, gradients=2**20, optimizer=2**21, activations=2**19, other=2**19,
        peak=3 * 2**20, method="analytic", device="any",
    )  # fmt: skip
    assert mem.total == 5 * 2**20
    mib = mem.as_mib()
    assert mib["parameters"] == 1.0 and mib["total"] == 5.0 and mib["peak"] == 3.0
    data = json.loads(json.dumps(mem.to_dict()))
    assert data["total"] == mem.total and data["method"] == "analytic"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (int(12.3 * 2**20), "12.3 MiB"),
        (2**30, "1.0 GiB"),
        (350 * 10**9, "326.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def _measure_batch(config, inputs, targets, lora: bool) -> MemoryBreakdown:
    model = _model(config, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return measure_step_memory(model, inputs, targets, optimizer)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sliced_batch_measures_like_its_copy(lora):
    # A batch sliced from a big data set shares its storage; only the batch may be counted.
    data_x, data_y = _batch(CONFIG, 4000, 16, seed=1)
    view_x, view_y = data_x[:BATCH], data_y[:BATCH]
    before = (data_x.clone(), data_y.clone())
    sliced = _measure_batch(CONFIG, view_x, view_y, lora)
    copied = _measure_batch(CONFIG, view_x.clone(), view_y.clone(), lora)
    assert sliced.activations == pytest.approx(copied.activations, rel=0.02)
    assert sliced.peak == pytest.approx(copied.peak, rel=0.02)
    # the caller's tensors are left as they were
    assert torch.equal(data_x, before[0]) and torch.equal(data_y, before[1])
    assert view_x.untyped_storage().data_ptr() == data_x.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    ("inputs", "targets", "error", "words"),
    [
        ([[1, 2, 3]], torch.zeros(1, 3, dtype=torch.long), TypeError, ("inputs", "list")),
        (torch.zeros(1, 3, dtype=torch.long), None, TypeError, ("targets", "NoneType")),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 4, dtype=torch.long),
            ValueError,
            ("same shape", "(2, 3)", "(2, 4)"),
        ),
    ],
)
def test_measure_step_memory_refuses_bad_batches(inputs, targets, error, words):
    model = _model(get_preset("tiny"), lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(error) as info:
        measure_step_memory(model, inputs, targets, optimizer)
    assert all(w in str(info.value) for w in words), str(info.value)
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in before.items())
    assert not optimizer.state and all(p.grad is None for p in model.parameters())
