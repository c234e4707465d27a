"""Tests for lab/surgery.py: add_lora, merge_lora, unmerge_lora, remove_lora and counts on a model.

Each refusal asserts the exception type, key words of its message, and that nothing changed."""

from __future__ import annotations

import pytest
import torch
from core_kit import (
    assert_unchanged,
    full_snapshot,
    randomize_adapters,
    run_script,
    same,
    snapshot,
    tensors_of,
    tiny_model,
    tokens,
    unchanged,
)
from torch import nn

from lab.adapters import lora_state_dict
from lab.lora import LoRALinear
from lab.model import ToyTransformer, get_preset
from lab.surgery import (
    ParamCount,
    add_lora,
    check_trainable,
    count_parameters,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)


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


def test_unmatched_target_error_offers_only_valid_targets():
    # the tied output head is refused as a target, so the error must not offer it
    model = tiny_model()
    with pytest.raises(ValueError, match="match no module") as info:
        add_lora(model, targets=("qproj",), rank=2, alpha=4)
    offered = str(info.value).split("named ")[1]
    assert "'q_proj'" in offered and "'down_proj'" in offered
    assert "'head'" not in offered


@pytest.mark.parametrize(
    ("targets", "exc", "words"),
    [
        ([], ValueError, "empty"),
        ([""], TypeError, "non-empty str"),
        ([1], TypeError, "non-empty str"),
        (None, TypeError, "targets"),
        ("02", ValueError, "match no module"),  # never split into "0" and "2"
        (("0", 2), TypeError, "non-empty str"),
    ],
)
def test_bad_targets(targets, exc, words):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    before = tensors_of(model)
    with pytest.raises(exc, match=words):
        add_lora(model, targets=targets)
    assert same(model, before) and not any(
        isinstance(m, nn.Module) and hasattr(m, "lora_A") for m in model
    )


@pytest.mark.parametrize(
    "fn", [add_lora, merge_lora, unmerge_lora, lora_state_dict, check_trainable]
)
@pytest.mark.parametrize("model", [None, "model", {"0": 1}])
def test_not_a_module(fn, model):
    with pytest.raises(TypeError, match="nn.Module"):
        fn(model)


@pytest.mark.parametrize("target", ["0", "2"])
def test_reused_linear_refused(target):
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    before = tensors_of(model)
    with pytest.raises(ValueError, match="2 places"):
        add_lora(model, target)
    assert same(model, before) and model[0] is lin and model[2] is lin


def test_shared_bias_refused():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.bias = a.bias
    model = nn.Sequential(a, b)
    before = tensors_of(model)
    with pytest.raises(ValueError, match=r"1\.bias is shared"):
        add_lora(model, "1")
    assert same(model, before) and isinstance(model[1], nn.Linear)


@pytest.mark.parametrize(
    ("module", "target"),
    [
        (nn.MultiheadAttention(8, 2), "out_proj"),
        (nn.TransformerEncoderLayer(8, 2, 16), "linear1"),
        (nn.TransformerDecoderLayer(8, 2, 16), "linear2"),
    ],
)
def test_weight_reading_parent_refused(module, target):
    model = nn.Sequential(module)
    before = tensors_of(model)
    with pytest.raises(ValueError, match=r"reads its \.weight directly"):
        add_lora(model, target)
    assert same(model, before)


def test_check_trainable_refuses_merged(lora_model):
    merge_lora(lora_model)
    before = tensors_of(lora_model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora\(model\) before training"):
        check_trainable(lora_model)
    assert same(lora_model, before)
    unmerge_lora(lora_model)
    check_trainable(lora_model)


@pytest.mark.parametrize("stop", [ValueError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_build_stopped_half_way_puts_everything_back(monkeypatch, stop, init):
    # The third layer's build fails after PiSSA has rewritten the first two weights.
    import lab.surgery as surgery_module

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    before = full_snapshot(model)
    real, built = surgery_module.build_layer, []

    def failing(base, config):
        if len(built) == 2:
            raise stop
        built.append(real(base, config))
        return built[-1]

    monkeypatch.setattr(surgery_module, "build_layer", failing)
    with pytest.raises(type(stop)):
        add_lora(model, targets=("q_proj", "k_proj", "v_proj"), rank=2, init=init)
    assert unchanged(model, before)


def test_a_swap_stopped_half_way_puts_everything_back(monkeypatch):
    import lab.surgery as surgery_module

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    before = full_snapshot(model)
    real, calls = surgery_module._replace_module, []

    def failing(model_, name, new):
        calls.append(name)
        if len(calls) == 3:  # two layers already swapped in
            raise KeyboardInterrupt
        real(model_, name, new)

    monkeypatch.setattr(surgery_module, "_replace_module", failing)
    with pytest.raises(KeyboardInterrupt):
        add_lora(model, targets=("q_proj", "k_proj", "v_proj"), rank=2, init="pissa")
    monkeypatch.setattr(surgery_module, "_replace_module", real)
    assert unchanged(model, before)


# A real SIGINT, sent by the process to itself at a known point: while PiSSA decomposes the
# third weight, or while the second new layer is being swapped in. Python's own handler turns
# it into KeyboardInterrupt, exactly as Ctrl-C in a terminal or a notebook's interrupt does.
_CTRL_C = """
import os, signal, sys, torch
import lab, lab.surgery
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(96, 96) for _ in range(6)])
before = {k: v.clone() for k, v in model.state_dict().items()}
flags = [p.requires_grad for p in model.parameters()]
where, count, sent = sys.argv[1], [0], []
def interrupt_on_third(real):
    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == 3:
            sent.append(count[0])
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    return wrapped
if where == "svd":
    torch.linalg.svd = interrupt_on_third(torch.linalg.svd)
else:
    lab.surgery._replace_module = interrupt_on_third(lab.surgery._replace_module)
try:
    lab.add_lora(model, targets=[str(i) for i in range(6)], rank=4, init="pissa")
except KeyboardInterrupt:
    print("interrupted at call", *sent)
else:
    sys.exit("add_lora finished: the interrupt never came")
assert all(type(m) is nn.Linear for m in model), [type(m).__name__ for m in model]
now = model.state_dict()
assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
assert [p.requires_grad for p in model.parameters()] == flags
print("model as it was")
"""


@pytest.mark.parametrize("where", ["svd", "swap"])
def test_ctrl_c_during_add_lora_leaves_the_model_as_it_was(where):
    done = run_script(_CTRL_C, where, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "interrupted at call 3\n" in done.stdout and "model as it was" in done.stdout


def test_pissa_rank_above_the_layer_is_refused_before_any_svd():
    m = nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 8))
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"rank=4 is too large for 0 .*min\(in, out\) = 3"):
        add_lora(m, targets=("0", "1"), rank=4, init="pissa")
    assert unchanged(m, before)


def test_pissa_on_a_4bit_base_is_refused_before_anything():
    from lab.quant import quantize_base

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    quantize_base(model)
    before = full_snapshot(model)
    with pytest.raises(ValueError, match="full-precision W"):
        add_lora(model, targets=("q_proj", "v_proj"), rank=2, init="pissa")
    assert unchanged(model, before)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("action", ["merge_lora", "remove_lora"])
def test_a_diverged_adapter_is_never_merged(variant, action):
    from lab.surgery import remove_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_lora(model, ["0", "2"], rank=2, alpha=4, variant=variant)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[2].lora_B[1, 0] = float("nan")
    before = full_snapshot(model)
    act = merge_lora if action == "merge_lora" else remove_lora
    with pytest.raises(ValueError, match=r"non-finite weights in 2: lora_B has 1 NaN \(a diverged"):
        act(model)
    assert unchanged(model, before) and not model[0].merged


@pytest.mark.parametrize("action", ["unmerge_lora", "remove_lora"])
def test_unmerge_refuses_to_write_nan_and_changes_nothing(action, lora_model):
    # (DoRA's unmerge puts back the W it kept at merge: tests/variants/test_variants.py.)
    from lab.surgery import remove_lora

    model = lora_model
    merge_lora(model)
    with torch.no_grad():
        model[2].base.weight[3, 1] = float("inf")  # a merged weight edited by hand
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=r"unmerging 2 would write NaN or inf into rows \[3\]"):
        if action == "unmerge_lora":
            unmerge_lora(model)
        else:
            remove_lora(model, merge=False)
    assert unchanged(model, before) and model[0].merged and model[2].merged


@pytest.mark.parametrize("merge", ["False", None, 0, 1])
def test_remove_lora_merge_must_be_a_bool(lora_model, merge):
    from lab.surgery import remove_lora

    before = full_snapshot(lora_model)
    with pytest.raises(TypeError, match=f"merge must be True or False, got {merge!r}"):
        remove_lora(lora_model, merge=merge)  # "False" is truthy: it used to merge
    assert unchanged(lora_model, before)


@pytest.mark.parametrize(
    ("make_w", "words"),
    [
        (lambda: torch.zeros(8, 8), "all-zero weight"),
        (lambda: torch.zeros(8, 8).index_fill_(0, torch.tensor([0]), 0.5), "only 1 nonzero"),
    ],
)
def test_pissa_refuses_directions_that_could_never_train(make_w, words):
    # A zero singular value gives a zero row of A and a zero column of B: zero gradients.
    # (The second weight has one nonzero row: rank 1, its other singular values exactly 0.)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        m[1].weight.copy_(make_w())
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=f"^1: init='pissa'.*{words}"):
        add_lora(m, targets=("0", "1"), rank=2, init="pissa")
    assert unchanged(m, before)


def test_dora_on_a_weight_whose_row_norm_overflows_is_refused():
    # Every entry is finite, but ||row|| = inf in float32: m / ||W|| would be inf / inf.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        m[1].weight[3] = 3e38
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"^1: .*row 3 of W has norm inf"):
        add_lora(m, targets=("0", "1"), rank=2, variant="dora")
    assert unchanged(m, before)
