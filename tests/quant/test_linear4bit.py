"""Tests for lab/quant/linear4bit.py: the 4-bit layer equals a dense one, refuses others' codes."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lab
from lab.quant import (
    SCHEMES,
    Linear4bit,
    dequantize_scales,
    quantize_scales,
)


def _layer(scheme="nf4", double_quant=True, bias=True, in_f=40, out_f=24) -> Linear4bit:
    torch.manual_seed(5)
    return Linear4bit.from_linear(nn.Linear(in_f, out_f, bias=bias), scheme, 64, double_quant)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_equals_linear_with_the_dequantised_weight(scheme, double_quant):
    layer = _layer(scheme, double_quant)
    x = torch.randn(3, 5, 40)
    assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))
    w = layer.dequantize()
    assert w.shape == (24, 40) and w.dtype == torch.float32


def test_input_gradient_equals_the_dense_layers_and_buffers_get_none():
    layer = _layer()
    x = torch.randn(4, 40, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 24)
    layer(x).backward(g)
    F.linear(x_dense, layer.dequantize(), layer.bias).backward(g)
    assert torch.allclose(x.grad, x_dense.grad, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(b.grad is None and not b.requires_grad for b in layer.buffers())
    assert layer.bias.grad is None


def test_the_backward_keeps_no_dense_weight_alive():
    layer = _layer(in_f=64, out_f=48)
    dense_size = 64 * 48
    x = torch.randn(2, 64, requires_grad=True)

    def saved_float_sizes(fn) -> list[int]:
        sizes: list[int] = []

        def pack(t):
            if t.is_floating_point():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sizes

    assert max(saved_float_sizes(lambda: layer(x)), default=0) < dense_size
    # the check can fail: a dense F.linear saves the full weight for the input's gradient
    dense = layer.dequantize()
    assert dense_size in saved_float_sizes(lambda: F.linear(x, dense))


def test_state_dict_round_trip_into_a_fresh_layer():
    layer = _layer("fp4", True)
    fresh = Linear4bit(40, 24, bias=True, scheme="fp4", block_size=64, double_quant=True)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(6, 40)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {
        "packed_weight",
        "absmax_codes",
        "absmax_scale",
        "absmax_offset",
        "bias",
        "_extra_state",  # the format: scheme, block size, double quant, shape
    }


def test_to_a_dtype_changes_the_compute_dtype_not_the_4bit_storage():
    layer = _layer()
    before = layer.storage_bytes()
    y32 = layer(torch.ones(2, 40))
    layer = layer.to(torch.float64)
    assert layer.compute_dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert layer.packed_weight.dtype == torch.uint8 and layer.absmax_codes.dtype == torch.uint8
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert layer.storage_bytes() == before
    assert layer.dequantize().dtype == torch.float64
    y64 = layer(torch.ones(2, 40, dtype=torch.float64))
    assert y64.dtype == torch.float64 and torch.allclose(y64, y32.double(), atol=1e-5)
    layer.half()  # half-precision scales would change the format: they stay fp32
    assert layer.absmax_scale.dtype == torch.float32 and layer.compute_dtype == torch.float16


def test_bf16_input_and_cpu_autocast_work():
    layer = _layer()
    x = torch.randn(3, 40, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(torch.randn(3, 40))
    assert z.dtype == torch.bfloat16
    ref = F.linear(torch.zeros(1, 40), layer.dequantize(), layer.bias)
    assert torch.allclose(layer(torch.zeros(1, 40, dtype=torch.bfloat16)).float(), ref, atol=2e-2)


def test_deepcopy_reproduces_outputs():
    layer = _layer("int4")
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 40)
    assert torch.equal(twin(x), layer(x)) and twin.packed_weight is not layer.packed_weight


def test_changing_the_codes_between_forward_and_backward_is_caught():
    layer = _layer()
    y = layer(torch.randn(2, 40, requires_grad=True))
    with torch.no_grad():
        layer.packed_weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_there_is_no_weight_to_read_or_write():
    layer = _layer()
    with pytest.raises(AttributeError, match="dequantize"):
        _ = layer.weight
    with pytest.raises(AttributeError, match="from_linear"):
        layer.weight = nn.Parameter(torch.zeros(24, 40))
    assert not hasattr(layer, "weight")
    assert "weight" not in dict(layer.named_parameters())


def test_extra_repr_names_the_format():
    text = repr(_layer("int4", False, bias=False))
    for word in ("in_features=40", "out_features=24", "int4", "block_size=64", "False"):
        assert word in text


def test_from_linear_refuses_a_non_linear_and_bad_settings():
    with pytest.raises(TypeError, match="nn.Linear.*Conv1d"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))
    linear = nn.Linear(8, 8)
    before = linear.weight.detach().clone()
    with pytest.raises(ValueError, match=r"fp8.*nf4"):
        Linear4bit.from_linear(linear, scheme="fp8")
    with pytest.raises(TypeError, match="double_quant"):
        Linear4bit.from_linear(linear, double_quant=1)
    assert torch.equal(linear.weight, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward():
    layer = _layer().cuda()
    x = torch.randn(4, 40, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device.type == "cuda"
    y.float().sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"scheme": "int4"}, ["nf4 codes", "decodes int4", "scheme='nf4'"]),
        ({"scheme": "fp4"}, ["nf4 codes", "decodes fp4"]),
        ({"block_size": 32}, ["block_size 64", "block_size 32"]),
        ({"double_quant": False}, ["with double", "without double"]),
        ({"shape": (40, 24)}, ["(24, 40) weight", "(40, 24) weight"]),
    ],
)
def test_a_layer_refuses_another_formats_codes_and_keeps_its_own(settings, words):
    source = _layer("nf4", True)
    settings = {"scheme": "nf4", "block_size": 64, "double_quant": True, **settings}
    out_f, in_f = settings.pop("shape", (24, 40))
    torch.manual_seed(9)
    target = Linear4bit.from_linear(nn.Linear(in_f, out_f), **settings)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(source.state_dict())
    assert all(word in str(info.value) for word in words), str(info.value)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda sd: sd.__setitem__("_extra_state", torch.tensor([7, 64, 1, 24, 40])), "format"),
        (lambda sd: sd.__setitem__("_extra_state", {"scheme": "nf4"}), "format record"),
        (lambda sd: sd["absmax_scale"].fill_(float("nan")), "absmax_scale is not finite"),
        (lambda sd: sd.pop("_extra_state"), "_extra_state"),
    ],
)
def test_a_crafted_state_dict_is_refused(change, words):
    source, target = _layer("nf4", True), _layer("nf4", True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = {k: v.clone() for k, v in source.state_dict().items()}
    change(state)
    with pytest.raises(RuntimeError, match=words):
        target.load_state_dict(state)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_codes_without_their_format_are_refused_even_when_not_strict():
    source, target = _layer("nf4", True), _layer("nf4", True)
    state = {k: v.clone() for k, v in source.state_dict().items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="4-bit codes but no _extra_state"):
        target.load_state_dict(state, strict=False)
    target.load_state_dict({"bias": source.bias.detach()}, strict=False)  # no codes: fine
    assert torch.equal(target.bias, source.bias)


def test_a_negative_absmax_in_a_state_dict_is_refused():
    source, target = _layer("int4", False), _layer("int4", False)
    state = source.state_dict()
    state["absmax"] = -state["absmax"]
    with pytest.raises(RuntimeError, match="negative block scales"):
        target.load_state_dict(state)


def test_layer_refuses_an_integer_dtype_and_a_wrong_input_width():
    layer = _layer()
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        layer.dequantize(torch.int64)
    with pytest.raises(ValueError, match=r"inputs \(\.\.\., 40\), got shape \(3, 41\)"):
        layer(torch.randn(3, 41))
    codes, scale, offset = quantize_scales(torch.rand(300))
    with pytest.raises(ValueError, match="scale of shape"):
        dequantize_scales(codes, scale[:1], offset)


def test_a_meta_layer_and_model_run_forward_for_shapes():
    layer = _layer().to("meta")
    out = layer(torch.zeros(3, 40, device="meta"))
    assert out.is_meta and out.shape == (3, 24)
    with torch.device("meta"):
        model = lab.ToyTransformer(lab.get_preset("tiny"))
    model.blocks[0].attn.q_proj = Linear4bit(32, 32, bias=False, device="meta")
    assert model(torch.zeros(2, 5, dtype=torch.long, device="meta")).shape == (2, 5, 64)
