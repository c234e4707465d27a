"""Tests for lab/lora.py: LoRA's defining properties, bad inputs, and adapter files."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lab.config import LoRAConfig
from lab.lora import (
    LoRALinear,
    ParamCount,
    add_lora,
    count_parameters,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from lab.model import ToyTransformer, get_preset

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error budget relative to the size of the terms being summed (see `assert_close_scaled`):
# a few unit roundoffs of each dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
FAST = settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------- helpers


@st.composite
def lora_cases(draw, dtypes=(torch.float32,)):
    """A LoRALinear with a trained-looking (non-zero) B, an input batch, and the draw's params."""
    in_f = draw(st.integers(1, 48))
    out_f = draw(st.integers(1, 48))
    rank = draw(st.integers(1, min(in_f, out_f)))
    # alpha == rank gives scaling 1, which would hide a forgotten or misplaced scaling
    alpha = draw(st.floats(0.5, 64).filter(lambda a: not math.isclose(a, rank)))
    dtype = draw(st.sampled_from(dtypes))
    rslora = draw(st.booleans())
    bias = draw(st.booleans())
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear(base, rank, alpha, rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(*batch, in_f).to(dtype)
    return layer, x


def reference_update(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """scaling * x A^T B^T in float64, the adapter's contribution to the output."""
    a, b = layer.lora_A.double(), layer.lora_B.double()
    return layer.scaling * (x.double() @ a.T @ b.T)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, scale: float, tol: float):
    """max|actual - expected| <= tol * scale.

    `scale` is the size of the terms summed (|x| @ (|W| + scaling |B||A|)^T), not of the result:
    when W and ΔW nearly cancel, the result is small but the rounding errors are not, and a
    plain relative error would fail for a correct implementation.
    """
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * scale + 1e-30, f"error {err:.3g} > {tol:g} * {scale:.3g}"


def term_scale(layer: LoRALinear, x: torch.Tensor) -> float:
    """Size of the terms summed by layer(x), for `assert_close_scaled`."""
    w = layer.base.weight.double().abs()
    ab = layer.scaling * layer.lora_B.double().abs() @ layer.lora_A.double().abs()
    terms = x.double().abs() @ (w + ab).T
    if layer.base.bias is not None:
        terms = terms + layer.base.bias.double().abs()
    return terms.max().item() + 1e-12 if terms.numel() else 1.0


def tiny_model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(get_preset("tiny")).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, get_preset("tiny").vocab_size, (2, 8), generator=g)


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Give every B non-zero values, as if trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


def snapshot(model: nn.Module):
    """Everything that must survive a refused call: module tree, tensors, requires_grad flags."""
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before) -> None:
    modules, tensors, flags = snapshot(model)
    assert modules == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key
    assert flags == before[2]


# ----------------------------------------------------------------------------- properties


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_fresh_adapter_leaves_output_exactly_unchanged(case):
    layer, x = case
    with torch.no_grad():
        layer.lora_B.zero_()
        assert torch.equal(layer(x), layer.base(x))


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_merged_output_equals_unmerged_output(case):
    layer, x = case
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.merged
    assert merged.dtype == unmerged.dtype == x.dtype
    assert_close_scaled(merged, unmerged, term_scale(layer, x), TOL[x.dtype])


@FAST
@given(lora_cases(dtypes=tuple(DTYPES)))
def test_unmerge_after_merge_restores_base_weight(case):
    layer, _ = case
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    # W + ΔW - ΔW rounds twice (once per fold, each in fp32 then cast to the base dtype)
    tol = 1e-6 if w0.dtype == torch.float32 else TOL[w0.dtype] / 2
    scale = (w0.double().abs() + layer.delta_weight().double().abs()).max().item()
    assert (layer.base.weight.double() - w0.double()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_into_half_precision_rounds_once_from_fp32(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64, dtype=dtype), rank=8, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    w0 = layer.base.weight.detach().clone()
    delta = (layer.lora_B @ layer.lora_A).detach() * layer.scaling  # fp32
    layer.merge()
    # adding a half-precision ΔW in half precision would round twice
    assert torch.equal(layer.base.weight, (w0.float() + delta).to(dtype))


@FAST
@given(lora_cases())
def test_output_minus_base_output_is_x_times_delta_weight_transposed(case):
    layer, x = case
    with torch.no_grad():
        diff = layer(x) - layer.base(x)
        expected = x @ layer.delta_weight().T
    assert_close_scaled(diff, expected, term_scale(layer, x), 1e-5)
    assert_close_scaled(diff, reference_update(layer, x), term_scale(layer, x), 1e-5)


@FAST
@given(lora_cases())
def test_delta_weight_is_scaling_times_b_at_a(case):
    layer, _ = case
    expected_scaling = layer.alpha / (math.sqrt(layer.rank) if layer.rslora else layer.rank)
    assert layer.scaling == pytest.approx(expected_scaling, rel=1e-12)
    delta = layer.delta_weight()
    assert delta.shape == layer.base.weight.shape
    expected = expected_scaling * (layer.lora_B.double() @ layer.lora_A.double())
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6)


def test_scaling_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    base = nn.Linear(16, 16)
    assert LoRALinear(base, rank=4, alpha=16).scaling == 4.0
    assert LoRALinear(nn.Linear(16, 16), rank=4, alpha=16, rslora=True).scaling == 8.0


def test_adapter_shapes_init_and_frozen_base():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 20), rank=3, alpha=6)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (20, 3)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) bound
    assert layer.lora_A.abs().max() > 0
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    text = repr(layer)
    for part in ("in_features=12", "out_features=20", "rank=3", "alpha=6", "scaling=2"):
        assert part in text
    assert "dropout=0" in text and "merged=False" in text


# ----------------------------------------------------------------------------- dropout


def test_dropout_does_not_touch_the_base_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(8, 16)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: only the dropped adapter path is zero


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)


# ----------------------------------------------------------------------------- merge edge cases


def test_double_merge_and_double_unmerge_leave_weights_unchanged():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=5)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    merged_w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base.weight, merged_w) and layer.merged
    layer.unmerge()
    unmerged_w = layer.base.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.base.weight, unmerged_w) and not layer.merged


@pytest.mark.parametrize(("dtype", "fill"), [(torch.float16, 1e3), (torch.float32, 1e38)])
def test_merge_refuses_non_finite_weights_and_changes_nothing(dtype, fill):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8, dtype=dtype), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_A.fill_(fill)
        layer.lora_B.fill_(fill)
    w0 = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite weights"):
        layer.merge()
    assert torch.equal(layer.base.weight, w0) and not layer.merged


def test_merge_lora_is_all_or_nothing():
    model = tiny_model()
    add_lora(model, rank=2, alpha=4)
    randomize_adapters(model)
    last = list(lora_layers(model).values())[-1]
    with torch.no_grad():
        last.lora_A.fill_(1e30)
        last.lora_B.fill_(1e30)
    before = snapshot(model)
    with pytest.raises(ValueError, match="non-finite weights in blocks.0.attn.v_proj"):
        merge_lora(model)
    assert_unchanged(model, before)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_merge_lora_and_unmerge_lora_round_trip_on_a_model():
    model = tiny_model()
    add_lora(model, targets=("q_proj", "v_proj", "up_proj"), rank=2, alpha=5)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        out = model(idx)
        merge_lora(model)
        assert all(layer.merged for layer in lora_layers(model).values())
        torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters_and_input_dtype(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, dtype=dtype), rank=4, alpha=8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
    assert layer.delta_weight().dtype == dtype


def test_meta_device_construction():
    with torch.device("meta"):
        layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    assert layer.lora_A.is_meta and layer.lora_B.is_meta
    assert count_parameters(layer) == ParamCount(trainable=4 * (64 + 32), total=64 * 32 + 32 + 384)


# ----------------------------------------------------------------------------- add_lora


def test_add_lora_default_targets_and_module_order():
    model = tiny_model()
    names = add_lora(model, rank=2, alpha=4)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]
    assert list(lora_layers(model)) == names
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)


def test_add_lora_returns_names_in_module_order_regardless_of_target_order():
    model = ToyTransformer(get_preset("tiny", n_layers=2))
    names = add_lora(model, targets=["down_proj", "k_proj"], rank=1, alpha=3)
    assert names == [
        "blocks.0.attn.k_proj",
        "blocks.0.mlp.down_proj",
        "blocks.1.attn.k_proj",
        "blocks.1.mlp.down_proj",
    ]


def test_add_lora_accepts_a_string_and_qualified_targets():
    model = ToyTransformer(get_preset("tiny", n_layers=2))
    assert add_lora(model, targets="1.attn.o_proj", rank=1, alpha=3) == ["blocks.1.attn.o_proj"]


def test_only_lora_parameters_are_trainable():
    model = tiny_model()
    add_lora(model, rank=2, alpha=4)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_state_dict(model))
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_add_lora_twice_on_different_targets_keeps_all_adapters_trainable():
    model = tiny_model()
    add_lora(model, targets="q_proj", rank=2, alpha=4)
    add_lora(model, targets="up_proj", rank=4, alpha=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_step_changes_only_lora_parameters(optimizer):
    model = tiny_model().train()
    add_lora(model, targets=("q_proj", "v_proj", "down_proj"), rank=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())  # deliberately all of them, frozen ones included
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    idx = tokens()
    for _ in range(2):  # step 1 moves B (A's grad is 0 while B = 0); step 2 moves A too
        opt.zero_grad()
        model(idx).logsumexp(-1).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_count_parameters_on_tiny_model():
    cfg = get_preset("tiny")
    model = ToyTransformer(cfg)
    d, f, n, v, s = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len
    # embeddings + per block (2 LayerNorms, q/k/v/o, up/down) + final LayerNorm; the head is
    # tied to tok_emb so it adds nothing
    base_total = v * d + s * d + n * (4 * d + 4 * d * d + 2 * d * f) + 2 * d
    assert count_parameters(model) == ParamCount(trainable=base_total, total=base_total)
    with_dupes = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_dupes == base_total + v * d  # counting naively would count the tie twice

    rank = 4
    add_lora(model, rank=rank, alpha=8)
    count = count_parameters(model)
    assert count.trainable == n * 2 * rank * (d + d)
    assert count.total == base_total + count.trainable
    assert count.fraction == pytest.approx(count.trainable / count.total)


@pytest.mark.parametrize(("rank", "trainable"), [(1, 4_718_592), (8, 37_748_736)])
def test_gpt3_175b_on_meta_device_matches_lora_paper(rank, trainable):
    with torch.device("meta"):
        model = ToyTransformer(get_preset("gpt3-175b"))
    add_lora(model, rank=rank, alpha=2 * rank)
    assert count_parameters(model).trainable == trainable


def test_gpt2_small_total_parameters_on_meta_device():
    cfg = get_preset("gpt2-small")
    with torch.device("meta"):
        model = ToyTransformer(cfg)
    d, f, n, v, s = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len
    expected = v * d + s * d + n * (4 * d + 4 * d * d + 2 * d * f) + 2 * d
    assert expected == 124_356_864
    assert count_parameters(model).total == expected


# ----------------------------------------------------------------------------- bad inputs


BAD_HPARAMS = [
    ({"rank": 0}, ValueError, r"rank must be an int >= 1, got 0"),
    ({"rank": -1}, ValueError, r"rank must be an int >= 1, got -1"),
    ({"rank": 2.0}, TypeError, r"rank must be an int >= 1, got 2\.0 \(float\)"),
    ({"rank": True}, TypeError, r"got True \(bool\)"),
    ({"rank": 33}, ValueError, r"rank=33 is too large .*min\(in, out\) = 32"),
    ({"alpha": 0}, ValueError, r"alpha must be a finite number > 0, got 0"),
    ({"alpha": -1}, ValueError, r"alpha .* got -1"),
    ({"alpha": float("nan")}, ValueError, r"alpha .* got nan"),
    ({"alpha": float("inf")}, ValueError, r"alpha .* got inf"),
    ({"alpha": "16"}, TypeError, r"alpha must be a real number > 0, got '16' \(str\)"),
    ({"dropout": -0.1}, ValueError, r"dropout must be a number in \[0, 1\), got -0\.1"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ({"rslora": 1}, TypeError, r"rslora must be True or False"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_HPARAMS)
def test_add_lora_rejects_bad_hyperparameters_and_leaves_model_unchanged(kwargs, error, match):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_lora(model, **{"rank": 2, "alpha": 4, **kwargs})
    assert_unchanged(model, before)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_HPARAMS)
def test_lora_linear_rejects_bad_hyperparameters(kwargs, error, match):
    base = nn.Linear(32, 40)
    before = base.weight.detach().clone()
    with pytest.raises(error, match=match):
        LoRALinear(base, **{"rank": 2, "alpha": 4, **kwargs})
    assert base.weight.requires_grad and torch.equal(base.weight, before)


def test_lora_linear_rejects_non_linear_and_lora_bases():
    with pytest.raises(TypeError, match="must be an nn.Linear, got LayerNorm"):
        LoRALinear(nn.LayerNorm(8), rank=1, alpha=2)
    with pytest.raises(TypeError, match="already has LoRA"):
        LoRALinear(LoRALinear(nn.Linear(8, 8), rank=1, alpha=2), rank=1, alpha=2)


def test_rank_too_large_for_one_matched_layer_names_that_layer():
    model = ToyTransformer(get_preset("tiny", d_model=16, d_ff=8))  # up_proj: 16 -> 8
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"rank=9 is too large for blocks\.0\.mlp\.up_proj"):
        add_lora(model, targets=("q_proj", "up_proj"), rank=9, alpha=4)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("targets", "error", "match"),
    [
        (("qproj",), ValueError, r"targets \['qproj'\] match no module.*'q_proj'.*'v_proj'"),
        (("q_proj", "nope"), ValueError, r"\['nope'\] match no module.*blocks\.0\.attn\.q_proj"),
        (("proj",), ValueError, r"match no module"),  # whole name components only
        (("ln_1",), TypeError, r"blocks\.0\.ln_1 is a LayerNorm, not an nn\.Linear"),
        (("mlp",), TypeError, r"blocks\.0\.mlp is a MLP"),
        (("head",), ValueError, r"head\.weight is shared with another module \(tied"),
        ((), ValueError, r"targets is empty"),
        ([3], TypeError, r"every target must be a non-empty str, got 3"),
        (("",), TypeError, r"non-empty str"),
        (5, TypeError, r"targets must be a str or an iterable of str, got 5"),
    ],
)
def test_add_lora_rejects_bad_targets_and_leaves_model_unchanged(targets, error, match):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_lora(model, targets=targets, rank=2, alpha=4)
    assert_unchanged(model, before)


def test_adding_lora_twice_is_refused_and_leaves_model_unchanged():
    model = tiny_model()
    add_lora(model, rank=2, alpha=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj already has LoRA.*remove_lora"):
        add_lora(model, rank=2, alpha=4)
    # the wrapped base inside a LoRALinear is not a target either
    with pytest.raises(ValueError, match="match no module"):
        add_lora(model, targets="base", rank=2, alpha=4)
    assert_unchanged(model, before)


def test_model_level_functions_refuse_a_model_without_lora():
    model = tiny_model()
    for fn in (merge_lora, unmerge_lora):
        with pytest.raises(ValueError, match="no LoRA layers; call add_lora"):
            fn(model)
    assert remove_lora(model) == []
    assert lora_state_dict(model) == {}


# ----------------------------------------------------------------------------- remove_lora


def test_remove_lora_with_merge_keeps_outputs_with_plain_linears():
    model = tiny_model()
    names = add_lora(model, rank=2, alpha=5)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        out = model(idx)
        assert remove_lora(model, merge=True) == names
        assert not lora_layers(model)
        assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
        torch.testing.assert_close(model(idx), out, rtol=1e-5, atol=1e-5)
    assert not any(model.get_submodule(n).weight.requires_grad for n in names)


@pytest.mark.parametrize("merged_first", [False, True])
def test_remove_lora_without_merge_restores_base_output(merged_first):
    model = tiny_model()
    idx = tokens()
    with torch.no_grad():
        base_out = model(idx)
    add_lora(model, rank=2, alpha=5)
    randomize_adapters(model)
    if merged_first:
        merge_lora(model)
    remove_lora(model, merge=False)
    with torch.no_grad():
        if merged_first:  # W + ΔW - ΔW: equal up to fp32 rounding
            torch.testing.assert_close(model(idx), base_out, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(model(idx), base_out)


# ----------------------------------------------------------------------------- adapter files


@pytest.fixture
def saved(tmp_path):
    """A tiny model with trained-looking adapters (rank 4, alpha 8), saved to a file."""
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    randomize_adapters(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    return model, path


def fresh_lora_model(**kwargs) -> ToyTransformer:
    model = tiny_model(seed=0)  # the same seed gives the same base weights
    add_lora(model, **{"rank": 4, "alpha": 8, **kwargs})
    return model


def test_save_then_load_into_fresh_base_reproduces_outputs_exactly(saved):
    model, path = saved
    fresh = fresh_lora_model()
    config = load_adapter(fresh, path)
    assert (
        config["rank"] == 4
        and config["alpha"] == 8.0
        and config["targets"]
        == [
            "q_proj",
            "v_proj",
        ]
    )
    assert config["layers"] == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"]
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(idx), model(idx))


def test_adapter_file_holds_only_adapters_and_config(saved):
    model, path = saved
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(lora_state_dict(model))
    assert meta["lora_lab_format"] == "lora-lab-adapter"
    # The adapter's JSON config is exactly its LoRAConfig's to_dict().
    assert (
        json.loads(meta["lora_lab_config"])
        == LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")).to_dict()
    )


def test_mixed_settings_are_saved_per_layer(tmp_path):
    model = tiny_model()
    add_lora(model, targets="q_proj", rank=2, alpha=4)
    add_lora(model, targets="up_proj", rank=4, alpha=2)
    path = save_adapter(model, tmp_path / "mixed.safetensors")
    fresh = tiny_model()
    add_lora(fresh, targets="q_proj", rank=2, alpha=4)
    add_lora(fresh, targets="up_proj", rank=4, alpha=2)
    config = load_adapter(fresh, path)
    assert config["rank"] is None
    assert config["per_layer"]["blocks.0.mlp.up_proj"]["rank"] == 4
    other = tiny_model()
    add_lora(other, targets=("q_proj", "up_proj"), rank=2, alpha=4)
    with pytest.raises(ValueError, match="rank: file has None, model has 2"):
        load_adapter(other, path)


def rewrite(path, tensors_fn):
    """Re-save `path` with its tensors transformed by tensors_fn, keeping the metadata."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        meta = f.metadata()
    save_file(tensors_fn(tensors), path, metadata=meta)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: {k: v for k, v in t.items() if not k.endswith("v_proj.lora_B")},
            r"missing \['blocks\.0\.attn\.v_proj\.lora_B'\], unexpected \[\]",
        ),
        (
            lambda t: {**t, "blocks.0.attn.k_proj.lora_A": torch.zeros(4, 32)},
            r"missing \[\], unexpected \['blocks\.0\.attn\.k_proj\.lora_A'\]",
        ),
        (
            lambda t: {**t, "blocks.0.attn.q_proj.lora_A": torch.zeros(4, 31)},
            r"q_proj\.lora_A: expected shape \(4, 32\), got \(4, 31\)",
        ),
        (
            lambda t: {**t, "blocks.0.attn.q_proj.lora_B": torch.full((32, 4), float("nan"))},
            r"q_proj\.lora_B contains non-finite values",
        ),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "nan"],
)
def test_load_adapter_rejects_bad_tensors_and_leaves_model_unchanged(saved, edit, match):
    _, path = saved
    rewrite(path, edit)
    model = fresh_lora_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        load_adapter(model, path)
    assert str(path) in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("settings_", "match"),
    [
        ({"rank": 2}, r"rank: file has 4, model has 2"),
        ({"alpha": 16}, r"alpha: file has 8\.0, model has 16\.0"),
        ({"rslora": True}, r"rslora: file has False, model has True"),
        ({"dropout": 0.1}, r"dropout: file has 0\.0, model has 0\.1"),
        ({"targets": ("q_proj", "k_proj")}, r"targets: file has \['q_proj', 'v_proj'\]"),
    ],
)
def test_load_adapter_rejects_config_mismatch_and_leaves_model_unchanged(saved, settings_, match):
    _, path = saved
    model = fresh_lora_model(**settings_)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_load_adapter_rejects_unreadable_files_and_leaves_model_unchanged(saved, damage):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"not a tensor file" * 20, "empty": b""}[
            damage
        ]
    )
    model = fresh_lora_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"is not a readable adapter file \(truncated or corrupt"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_adapter_rejects_files_without_config(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    model = fresh_lora_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no 'lora_lab_config' metadata"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_adapter_into_model_without_lora_says_how_to_add_it(saved):
    _, path = saved
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no LoRA layers; first call add_lora\(.*rank=4, alpha=8"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_adapter_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(fresh_lora_model(), tmp_path / "nope.safetensors")


def test_loading_into_merged_layers_is_refused(saved):
    _, path = saved
    model = fresh_lora_model()
    randomize_adapters(model, seed=5)
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="are merged; call unmerge_lora"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_load_lora_state_dict_is_strict():
    model = fresh_lora_model()
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    state["blocks.0.attn.v_proj.lora_A"] = torch.zeros(4, 32, dtype=torch.float64)
    before = snapshot(model)
    bad = dict(state)
    bad["blocks.0.attn.v_proj.lora_B"] = torch.full((32, 4), float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        load_lora_state_dict(model, bad)
    assert_unchanged(model, before)
    load_lora_state_dict(model, state)  # float64 values are cast to the fp32 parameters
    assert torch.count_nonzero(model.get_submodule("blocks.0.attn.v_proj").lora_A) == 0


def test_save_adapter_refuses_model_without_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_model(), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
@pytest.mark.parametrize("existing", [False, True])
def test_save_adapter_is_atomic(tmp_path, monkeypatch, fail_in, existing):
    model = fresh_lora_model()
    path = tmp_path / "adapter.safetensors"
    if existing:
        path.write_bytes(b"old adapter")

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, fail_in, boom)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, path)
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    if existing:
        assert leftovers == [path.name] and path.read_bytes() == b"old adapter"
    else:
        assert leftovers == []


def test_unmatched_target_error_offers_only_valid_targets():
    # the tied output head is refused as a target, so the error must not offer it
    model = tiny_model()
    with pytest.raises(ValueError, match="match no module") as info:
        add_lora(model, targets=("qproj",), rank=2, alpha=4)
    offered = str(info.value).split("named ")[1]
    assert "'q_proj'" in offered and "'down_proj'" in offered
    assert "'head'" not in offered
