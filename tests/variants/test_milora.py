"""MiLoRA (lab/variants/milora.py): A and B from W's minor singular directions, W keeps the rest.

PEFT 0.21 has no MiLoRA init, so these check the paper's definition (Wang et al. 2024, section 3):
ΔW = scaling * B A is W's minor part, U_r' S_r' V_r'^T over its r smallest singular values, and
base + adapter reproduce W at the start. PEFT's closest relative, MiCA (init_lora_weights="mica"),
puts the same minor left singular vectors in B (unscaled, with A = 0 and W untouched): B's
columns are compared with it. The shared properties run over MiLoRA in
tests/variants/test_variants.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from flavour_cases import OneLinear

import lab
from lab.config import LoRAConfig
from lab.engine.batched import AdapterSpec, batchable, train_batched
from lab.surgery import lora_layers

TARGETS = ("q_proj", "v_proj")


def config(**fields) -> LoRAConfig:
    return LoRAConfig(**{"rank": 2, "alpha": 4.0, "targets": TARGETS, "init": "milora", **fields})


def test_base_plus_adapter_is_w_and_the_adapter_is_ws_minor_part():
    torch.manual_seed(0)
    model = lab.ToyTransformer(lab.get_preset("tiny"))
    reference = copy.deepcopy(model)
    lab.add_lora(model, config())
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-4)
    for name, layer in lora_layers(model).items():
        w = reference.get_submodule(name).weight.detach().double()
        u, s, vh = torch.linalg.svd(w)
        delta = (layer.lora_B @ layer.lora_A).double() * layer.scaling
        minor = u[:, -2:] @ torch.diag(s[-2:]) @ vh[-2:]
        torch.testing.assert_close(delta, minor, rtol=0, atol=1e-5)
        # Both in decreasing order: ΔW's two singular values are W's second smallest, then its
        # smallest.
        torch.testing.assert_close(torch.linalg.svdvals(delta)[:2], s[-2:], rtol=1e-4, atol=1e-8)
        # The frozen residual keeps the principal part: W's largest singular values.
        kept = torch.linalg.svdvals(layer.base.weight.detach().double())
        torch.testing.assert_close(kept[:-2], s[:-2], rtol=1e-4, atol=1e-5)


def test_bs_columns_are_the_minor_left_singular_vectors_peft_mica_starts_from():
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    ours = OneLinear(copy.deepcopy(linear))
    lab.add_lora(ours, LoRAConfig(rank=3, alpha=6.0, targets=("proj",), init="milora"))
    theirs = peft.get_peft_model(OneLinear(copy.deepcopy(linear)), peft.LoraConfig(
        r=3, lora_alpha=6.0, target_modules=["proj"], init_lora_weights="mica"))  # fmt: skip
    mica_b = theirs.base_model.model.proj.lora_B["default"].weight.detach()
    b = ours.proj.lora_B.detach()
    unit = b / b.norm(dim=0, keepdim=True)
    cos = (unit * mica_b).sum(dim=0).abs()  # each column the same vector, up to its sign
    torch.testing.assert_close(cos, torch.ones(3), rtol=0, atol=1e-4)


def test_a_failure_half_way_leaves_the_model_exactly_as_it_was(monkeypatch):
    """All-or-nothing, PiSSA's machinery: an interrupt during the third layer's SVD puts back
    the residuals already written into the first two layers' W."""
    model = lab.load_base_model("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    svd, calls = torch.linalg.svd, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lab.add_lora(model, config())
    assert not lora_layers(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_dropping_it_unmerged_gives_w_back_and_a_4bit_base_is_refused():
    model = lab.load_base_model("cpu")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if n.endswith(TARGETS)}  # fmt: skip
    lab.add_lora(model, config())
    lab.remove_lora(model, merge=False)
    for name, w in weights.items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=1e-6)
    nf4 = lab.load_base_model("cpu")
    lab.quantize_base(nf4, scheme="nf4")
    with pytest.raises(ValueError, match="init='milora' .* full-precision W"):
        lab.add_lora(nf4, config())


def test_a_weight_with_a_zero_singular_value_is_refused_with_the_model_unchanged():
    """Its smallest direction would start with A and B both zero and never train."""

    class OneLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = OneLinear()
    with torch.no_grad():
        model.proj.weight.copy_(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])))
    before = model.proj.weight.detach().clone()
    with pytest.raises(ValueError, match="singular values of exactly zero"):
        lab.add_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("proj",), init="milora"))
    assert not lora_layers(model) and model.proj.weight.requires_grad
    assert torch.equal(model.proj.weight, before)


def test_batched_trains_it_exactly_as_alone():
    """An init: its batched form is its variant's, with each configuration's residual base."""
    cfg = config()
    assert batchable(cfg)
    spec = AdapterSpec(cfg, 2e-2, seed=1)
    base = lab.load_base_model("cpu")
    task = lab.get_task("sort_desc_small")
    run = train_batched(base, task, [spec, AdapterSpec(cfg.replace(init="pissa"))], 4, 8, "cpu",
                        progress=False)  # fmt: skip
    model = copy.deepcopy(base)
    spec.add_to(model)
    alone = lab.train(model, task, 4, 2e-2, 8, seed=1, device="cpu", progress=False,
                      measure_memory=False)  # fmt: skip
    torch.testing.assert_close(run.losses[0], torch.tensor(alone.losses), rtol=1e-5, atol=0)
    assert not torch.equal(run.losses[0], run.losses[1])  # PiSSA's run is another


def test_the_doctor_judges_it_against_its_own_start():
    model = lab.load_base_model("cpu")
    lab.add_lora(model, config())
    finding = [f for f in lab.doctor(model) if f.code == "untrained-adapter"]
    assert finding and "MiLoRA's starting values" in finding[0].detail
    lab.train(model, lab.get_task("sort_desc_small"), steps=3, lr=2e-2, batch_size=8,
              progress=False, measure_memory=False)  # fmt: skip
    assert [f.code for f in lab.doctor(model)] == ["attention-only"]  # q/v only: no MLP
