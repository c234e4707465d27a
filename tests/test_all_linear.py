"""targets="all-linear": every linear of the transformer blocks, never the output head."""

import pytest
import torch
from torch import nn

import lab
from lab.engine.batched import AdapterSpec, train_batched
from lab.surgery import all_linear_modules
from lab.sweeps import ALL_TARGETS

SIX = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def test_all_linear_adapts_every_block_linear_and_not_the_head():
    model = lab.ToyTransformer(lab.get_preset("tiny", n_layers=2))
    names = lab.add_lora(model, targets="all-linear", rank=2, alpha=5)
    parts = [("attn", t) for t in SIX[:4]] + [("mlp", t) for t in SIX[4:]]
    assert names == [f"blocks.{i}.{part}.{leaf}" for i in range(2) for part, leaf in parts]
    assert not isinstance(model.head, lab.LoRALinear)
    assert model.head.weight is model.tok_emb.weight  # still tied, untouched


def test_all_linear_equals_naming_the_six_layers():
    torch.manual_seed(0)
    a = lab.ToyTransformer(lab.get_preset("tiny"))
    b = lab.ToyTransformer(lab.get_preset("tiny"))
    b.load_state_dict(a.state_dict())
    torch.manual_seed(1)
    lab.add_lora(a, targets="all-linear", rank=3, alpha=5)
    torch.manual_seed(1)
    lab.add_lora(b, targets=SIX, rank=3, alpha=5)
    assert lab.count_parameters(a).trainable == lab.count_parameters(b).trainable
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_config_keeps_all_linear_and_refuses_mixing():
    config = lab.LoRAConfig(rank=4, alpha=6, targets="all-linear")
    assert config.targets == ("all-linear",)
    assert lab.LoRAConfig.from_dict(config.to_dict()) == config
    assert "all-linear" in config.describe()
    with pytest.raises(ValueError, match="all-linear.*alone"):
        lab.LoRAConfig(targets=("all-linear", "q_proj"))
    with pytest.raises(ValueError, match="all-linear"):
        lab.SweepPoint("rotate", 4, targets=("all-linear", "up"))


def test_sweep_point_all_linear_is_the_six_layers():
    p = lab.SweepPoint("shift", 4, targets="all-linear")
    assert p == lab.SweepPoint("shift", 4, targets=SIX)
    assert p.key == lab.SweepPoint("shift", 4, targets=tuple(reversed(SIX))).key
    assert set(p.targets) == set(ALL_TARGETS)
    assert "all-linear" in lab.sweeps.describe(p)


def test_all_linear_skips_untied_output_layers_and_weight_reading_parents():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2))  # reads out_proj.weight directly
    model.add_module("head", nn.Linear(8, 3))
    names = [n for n, _ in all_linear_modules(model)]
    assert names == ["body"], names
    assert lab.add_lora(model, targets="all-linear", rank=2, alpha=3) == ["body"]


def test_all_linear_with_no_linear_is_refused_and_model_unchanged():
    model = nn.Sequential(nn.ReLU(), nn.LayerNorm(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="all-linear.*no linear"):
        lab.add_lora(model, targets="all-linear")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_all_linear_on_a_4bit_base():
    model = lab.ToyTransformer(lab.get_preset("tiny"))
    lab.quantize_base(model, scheme="nf4", block_size=32)
    assert len(lab.add_lora(model, targets="all-linear", rank=2, alpha=3)) == 6


def test_all_linear_twice_is_refused():
    model = lab.ToyTransformer(lab.get_preset("tiny"))
    lab.add_lora(model, targets="all-linear", rank=2, alpha=3)
    with pytest.raises(ValueError, match="already has LoRA"):
        lab.add_lora(model, targets="all-linear", rank=2, alpha=3)


def test_batched_all_linear_matches_naming_the_layers():
    """The batched engine adapts the same layers for "all-linear" as for the six names."""
    torch.manual_seed(0)
    base = lab.ToyTransformer(lab.get_preset("tiny"))
    task = lab.get_task("rotate")
    specs = [AdapterSpec(lab.LoRAConfig(rank=2, alpha=5, targets=t), lr=1e-2, seed=3)
             for t in ("all-linear", tuple(SIX))]  # fmt: skip
    run = train_batched(base, task, specs, steps=3, batch_size=4, device="cpu", progress=False)
    torch.testing.assert_close(run.losses[0], run.losses[1], rtol=0, atol=0)
    sa, sb = (lab.lora_state_dict(m) for m in run.models)
    assert sa.keys() == sb.keys() and len(sa) == 12
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_analytic_memory_counts_all_linear_as_the_six():
    config = lab.get_preset("cpu")
    a = lab.analytic_memory(config, 8, 20, lora_targets="all-linear", lora_rank=4)
    b = lab.analytic_memory(config, 8, 20, lora_targets=SIX, lora_rank=4)
    assert a.total == b.total
