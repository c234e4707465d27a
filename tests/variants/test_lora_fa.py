"""LoRA-FA (lab/variants/lora_fa.py): A frozen at its random start, only B trains.

The shared properties (fresh adapter, merge, save/load, 4-bit base, ...) run over it in
tests/variants/test_variants.py's table; these are LoRA-FA's own."""

from __future__ import annotations

import copy

import pytest
import torch
from flavour_cases import OneLinear

import lab
from lab.config import LoRAConfig
from lab.engine.batched import AdapterSpec, batchable, train_batched
from lab.memory import measure_step_memory
from lab.step import make_optimizer
from lab.surgery import count_parameters, lora_layers

TARGETS = ("q_proj", "v_proj")


def model_with(variant: str, seed: int = 0, **fields) -> lab.ToyTransformer:
    model = lab.load_base_model("cpu")
    torch.manual_seed(seed)
    lab.add_lora(model, LoRAConfig(rank=4, alpha=16.0, targets=TARGETS, variant=variant, **fields))
    return model


def test_only_b_trains_a_keeps_its_start_and_a_fresh_adapter_changes_nothing():
    reference = lab.load_base_model("cpu")
    model = model_with("lora-fa")
    x = lab.get_task("sort_desc").heldout_inputs[:8]
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B") for n in trainable), sorted(trainable)
    a0 = {n: layer.lora_A.detach().clone() for n, layer in lora_layers(model).items()}
    lab.train(model, lab.get_task("sort_desc_small"), steps=5, lr=2e-2, batch_size=8,
              weight_decay=0.1, progress=False, measure_memory=False)  # fmt: skip
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_A, a0[name]), f"{name}.lora_A moved"
        assert layer.lora_B.detach().any(), f"{name}.lora_B did not train"


def test_half_the_trainable_numbers_and_less_step_memory_than_lora():
    """On the square q/v layers B is half of A + B. The step keeps no copy of A's input for A's
    gradient: measured with lab.memory, its activations are smaller than LoRA's, and its
    gradients and AdamW moments half of LoRA's."""
    task = lab.get_task("sort_desc")
    x, y = task.train_inputs[:64], task.train_targets[:64]
    measured = {}
    for variant in ("lora", "lora-fa"):
        model = model_with(variant)
        measured[variant] = (
            count_parameters(model).trainable,
            measure_step_memory(model, x, y, make_optimizer(model, 2e-2)),
        )
    (n_lora, lora), (n_fa, fa) = measured["lora"], measured["lora-fa"]
    assert n_fa * 2 == n_lora
    assert fa.gradients * 2 == lora.gradients and fa.optimizer * 2 == lora.optimizer
    assert fa.activations < lora.activations, (fa.activations, lora.activations)


def test_save_load_and_merge_keep_the_frozen_a(tmp_path):
    model = model_with("lora-fa", seed=1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.05)
    x = lab.get_task("sort_desc").heldout_inputs[:8]
    with torch.no_grad():
        before = model(x)
    path = lab.save_adapter(model, tmp_path / "fa.safetensors")
    other = model_with("lora-fa", seed=2)  # another random A: loading must bring the saved one
    summary = lab.load_adapter(other, path)
    assert summary["variant"] == "lora-fa"
    with torch.no_grad():
        torch.testing.assert_close(other(x), before, rtol=0, atol=0)
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    lab.merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_batched_trains_it_exactly_as_alone_with_a_untouched():
    """Its batched form is the stacked LoRA layer with A's rate 0 (weight decay too)."""
    config = LoRAConfig(rank=4, alpha=16.0, targets=TARGETS, variant="lora-fa")
    assert batchable(config)
    specs = [AdapterSpec(config, 2e-2, seed=1), AdapterSpec(config.replace(variant="lora"), 2e-2)]
    base = lab.load_base_model("cpu")
    task = lab.get_task("sort_desc_small")
    run = train_batched(base, task, specs, 4, 8, "cpu", progress=False, weight_decay=0.1)
    model = copy.deepcopy(base)
    specs[0].add_to(model)
    a0 = {n: layer.lora_A.detach().clone() for n, layer in lora_layers(model).items()}
    alone = lab.train(model, task, 4, 2e-2, 8, seed=1, device="cpu", progress=False,
                      measure_memory=False, weight_decay=0.1)  # fmt: skip
    torch.testing.assert_close(run.losses[0], torch.tensor(alone.losses), rtol=1e-5, atol=0)
    for name, layer in lora_layers(run.models[0]).items():
        assert torch.equal(layer.lora_A, a0[name])
        torch.testing.assert_close(layer.lora_B, lora_layers(model)[name].lora_B)
    assert not torch.equal(run.losses[0], run.losses[1])  # the LoRA configuration is not FA's


def test_the_doctor_finds_it_untrained_not_frozen():
    """Its A is frozen by design: only B at zero is reported (with q/v only: attention-only)."""
    model = model_with("lora-fa")
    assert [f.code for f in lab.doctor(model)] == ["untrained-adapter", "attention-only"]


def test_same_weights_same_outputs_and_same_frozen_a_as_peft():
    """PEFT has LoRA-FA as an optimizer, peft.optimizers.create_lorafa_optimizer: it freezes
    every lora_A, as this layer does, so both train only B, and on the same A and B both
    compute the same outputs. PEFT's optimizer also projects B's gradient by (A A^T)^-1 /
    scaling^2, a refinement later than the 2023 paper, so training steps are not compared."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    ours = OneLinear(copy.deepcopy(linear))
    lab.add_lora(ours, LoRAConfig(rank=4, alpha=10.0, targets=("proj",), variant="lora-fa"))
    theirs = peft.get_peft_model(OneLinear(copy.deepcopy(linear)), peft.LoraConfig(
        r=4, lora_alpha=10.0, target_modules=["proj"], init_lora_weights=True))  # fmt: skip
    with torch.no_grad():
        ours.proj.lora_B.normal_()
        layer = theirs.base_model.model.proj
        layer.lora_A["default"].weight.copy_(ours.proj.lora_A)
        layer.lora_B["default"].weight.copy_(ours.proj.lora_B)
    create_lorafa_optimizer(theirs, r=4, lora_alpha=10, lr=1e-3)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for model in (ours, theirs):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_B" in n for n in trainable), trainable
