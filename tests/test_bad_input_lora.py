"""Bad inputs and faults for LoRA surgery, adapter files, the base model file and atomic saves.

Each case asserts the exception type, key words of its message, and that nothing changed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from needs import interruptible
from safetensors.torch import save_file
from torch import nn

from lab.base import load_base_config, load_base_model, model_from_state, save_base_model
from lab.fileio import atomic_write_bytes
from lab.lora import (
    _check_hparams,
    add_lora,
    check_trainable,
    load_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lab.model import ModelConfig, ToyTransformer, get_preset


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@pytest.fixture
def lora_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_lora(model, ["0", "2"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    return model


# --- hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"alpha": 1e300}, ValueError, "scaling"),
        ({"alpha": 1e5, "rank": 2}, ValueError, "bound"),
        ({"alpha": 1e9, "rank": 4, "rslora": True}, ValueError, "alpha/sqrt(rank)"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"rank": True}, TypeError, "rank"),
        ({"dropout": True}, TypeError, "dropout"),
        ({"rslora": "False"}, TypeError, "rslora"),
        ({"rslora": 0}, TypeError, "rslora"),
        ({"rank": 2.0}, TypeError, "rank"),
        ({"rank": 0}, ValueError, "rank"),
        ({"alpha": float("nan")}, ValueError, "finite"),
        ({"alpha": float("inf")}, ValueError, "finite"),
        ({"alpha": -1}, ValueError, "alpha"),
        ({"alpha": "16"}, TypeError, "alpha"),
        ({"dropout": float("nan")}, ValueError, "dropout"),
        ({"dropout": 1.0}, ValueError, "dropout"),
    ],
)
def test_add_lora_refuses_bad_hparams(kwargs, exc, words):
    model = nn.Sequential(nn.Linear(8, 8))
    before = snapshot(model)
    args = {"rank": 2, "alpha": 4, "dropout": 0.0, "rslora": False, **kwargs}
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        add_lora(model, "0", **args)
    assert same(model, before) and isinstance(model[0], nn.Linear)


def test_numpy_scalars_still_work():
    model = nn.Sequential(nn.Linear(8, 8))
    add_lora(model, "0", rank=np.int64(2), alpha=np.float64(16), dropout=np.float32(0.0))
    assert model[0].rank == 2 and model[0].scaling == 8.0
    _check_hparams(2, np.float64(16), 0.0, np.bool_(True))


# --- targets and models ---------------------------------------------------------------------


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
    before = snapshot(model)
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
    before = snapshot(model)
    with pytest.raises(ValueError, match="2 places"):
        add_lora(model, target)
    assert same(model, before) and model[0] is lin and model[2] is lin


def test_shared_bias_refused():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.bias = a.bias
    model = nn.Sequential(a, b)
    before = snapshot(model)
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
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"reads its \.weight directly"):
        add_lora(model, target)
    assert same(model, before)


def test_rank_larger_than_layer_refused():
    model = nn.Sequential(nn.Linear(8, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match="min"):
        add_lora(model, "0", rank=4)
    assert same(model, before)


# --- merge / unmerge / train ----------------------------------------------------------------


def test_unmerge_after_edit_restores_w(lora_model):
    w0 = lora_model[0].base.weight.detach().clone()
    merge_lora(lora_model)
    with torch.no_grad():
        lora_model[0].lora_B.add_(1.0)
    with pytest.warns(UserWarning, match="changed while the layer was merged"):
        unmerge_lora(lora_model)
    assert torch.allclose(lora_model[0].base.weight, w0, atol=1e-6)


def test_unmerge_without_edit_is_silent(lora_model):
    w0 = lora_model[2].base.weight.detach().clone()
    merge_lora(lora_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unmerge_lora(lora_model)
    assert torch.allclose(lora_model[2].base.weight, w0, atol=1e-6)


def test_check_trainable_refuses_merged(lora_model):
    merge_lora(lora_model)
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match=r"merged.*unmerge_lora\(model\) before training"):
        check_trainable(lora_model)
    assert same(lora_model, before)
    unmerge_lora(lora_model)
    check_trainable(lora_model)


def test_merge_on_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    add_lora(model, "0", rank=2, alpha=4)
    merge_lora(model)
    unmerge_lora(model)
    assert not model[0].merged


# --- load_lora_state_dict: all-or-nothing ---------------------------------------------------


def _state_with(model, key_index, value):
    state = {k: v.clone() + 1 for k, v in lora_state_dict(model).items()}
    key = list(state)[key_index]
    state[key] = value(state[key])
    return state


@pytest.mark.parametrize(
    ("make", "exc", "words"),
    [
        (lambda t: torch.empty(t.shape, device="meta"), ValueError, "meta"),
        (lambda t: t.to(torch.int64), TypeError, "floating point"),
        (lambda t: t.to(torch.int32), TypeError, "floating point"),
        (lambda t: t > 0, TypeError, "floating point"),
        (lambda t: t.to(torch.complex64), TypeError, "floating point"),
        (lambda t: t.to(torch.float64) * 1e300, ValueError, "non-finite"),
        (lambda t: t * float("nan"), ValueError, "non-finite"),
        (lambda t: t.t().contiguous() if t.shape[0] != t.shape[1] else t[:1], ValueError, "shape"),
        (lambda t: t.tolist(), TypeError, "expected a tensor"),
        (lambda t: t.to_sparse(), TypeError, "dense"),
    ],
)
@pytest.mark.parametrize("where", [0, -1])
def test_load_state_dict_all_or_nothing(lora_model, make, exc, words, where):
    state = _state_with(lora_model, where, make)
    before = snapshot(lora_model)
    with pytest.raises(exc, match=words):
        load_lora_state_dict(lora_model, state)
    assert same(lora_model, before)


@pytest.mark.parametrize("bad", [None, [1, 2], "state"])
def test_load_state_dict_not_a_mapping(lora_model, bad):
    before = snapshot(lora_model)
    with pytest.raises(TypeError, match="mapping"):
        load_lora_state_dict(lora_model, bad)
    assert same(lora_model, before)


def test_load_state_dict_mixed_key_types(lora_model):
    state = {**lora_state_dict(lora_model), 3: torch.zeros(1)}
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(lora_model, state)
    assert same(lora_model, before)


# --- adapter files --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_adapter_file_non_float_refused(lora_model, tmp_path, dtype):
    path = save_adapter(lora_model, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, path, metadata=meta)
    before = snapshot(lora_model)
    with pytest.raises(TypeError, match="floating point"):
        load_adapter(lora_model, path)
    assert same(lora_model, before)


def test_adapter_path_is_directory(lora_model, tmp_path):
    before = snapshot(lora_model)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_adapter(lora_model, tmp_path)
    assert same(lora_model, before)


def test_adapter_deeply_nested_config(lora_model, tmp_path):
    path = tmp_path / "deep.safetensors"
    meta = {
        "lora_lab_format": "lora-lab-adapter",
        "lora_lab_version": "2",
        "lora_lab_layers": '["0", "2"]',
    }
    save_file(
        lora_state_dict(lora_model), path, metadata={**meta, "lora_lab_config": "[" * 100_000}
    )
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(lora_model, path)
    assert same(lora_model, before)


def test_save_adapter_onto_directory(lora_model, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        save_adapter(lora_model, tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize("bad", [None, 3, ""])
def test_adapter_bad_path_type(lora_model, bad):
    with pytest.raises(TypeError, match="os.PathLike"):
        load_adapter(lora_model, bad)


# --- atomic writes --------------------------------------------------------------------------


def test_save_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        atomic_write_bytes(tmp_path / "f" / "out.bin", b"data")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_save_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot save"):
            atomic_write_bytes(ro / "out.bin", b"data")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_killed_save_leaves_no_litter(tmp_path):
    target = tmp_path / "out.bin"
    code = (
        "import os, time\n"
        "os.fsync = lambda fd: time.sleep(600)\n"
        "from lab.fileio import atomic_write_bytes\n"
        f"atomic_write_bytes({str(target)!r}, b'x' * 1000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd())
    try:
        for _ in range(600):
            if any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file seen"
    atomic_write_bytes(target, b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert target.read_bytes() == b"done"


# --- the base model file --------------------------------------------------------------------


@pytest.fixture
def tiny_base(tmp_path):
    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    return save_base_model(model, tmp_path / "base.safetensors"), model


def _rewrite(path, change_tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, path, metadata=meta if metadata is None else metadata)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.pop("ln_f.weight"), "missing tensors"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), "unexpected tensors"),
        (lambda t: t.__setitem__("ln_f.weight", torch.zeros(3)), "shape"),
        (lambda t: t.__setitem__("ln_f.weight", t["ln_f.weight"].to(torch.int64)), "dtype"),
        (lambda t: t["ln_f.weight"].fill_(float("nan")), "non-finite"),
    ],
)
def test_base_file_tensor_faults(tiny_base, change, words):
    path, _ = tiny_base
    _rewrite(path, change)
    with pytest.raises(ValueError, match=words) as info:
        load_base_model("cpu", path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({}, "metadata"),
        ({"lora_lab_model_config": "{"}, "not valid JSON"),
        ({"lora_lab_model_config": "[" * 100_000}, "not valid JSON"),
        ({"lora_lab_model_config": "[1]"}, "JSON object"),
        ({"lora_lab_model_config": json.dumps({"d_model": -1})}, "invalid"),
        ({"lora_lab_model_config": json.dumps({"colour": 1})}, "unknown fields"),
    ],
)
def test_base_file_config_faults(tiny_base, metadata, words):
    path, _ = tiny_base
    _rewrite(path, metadata=metadata)
    for load in (load_base_config, lambda p: load_base_model("cpu", p)):
        with pytest.raises(ValueError, match=words) as info:
            load(path)
        assert str(path) in str(info.value)


def test_base_file_truncated(tiny_base):
    path, _ = tiny_base
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_base_model("cpu", path)
    assert str(path) in str(info.value)


def test_base_file_directory_and_missing(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        load_base_model("cpu", tmp_path)
    with pytest.raises(FileNotFoundError, match="no base model"):
        load_base_config(tmp_path / "nope.safetensors")


def test_model_from_state_checks_first(tiny_base):
    _, model = tiny_base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["ln_f.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape"):
        model_from_state(model.config, state)


@pytest.mark.parametrize(
    ("kwargs", "words"), [({"dropout": "0.1"}, "dropout"), ({"bias": "no"}, "bias")]
)
def test_model_config_bad_types(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("idx", [torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), [[1, 2]]])
def test_forward_bad_idx(idx):
    model = ToyTransformer(get_preset("tiny"))
    with pytest.raises(TypeError, match="integer token ids"):
        model(idx)


def test_toy_transformer_bad_config():
    with pytest.raises(TypeError, match="ModelConfig"):
        ToyTransformer({"d_model": 8})


def test_deepcopy_merged_keeps_record(lora_model):
    merge_lora(lora_model)
    other = copy.deepcopy(lora_model)
    unmerge_lora(other)
    assert not other[0].merged


# --- add_lora is all-or-nothing -------------------------------------------------------------


def full_snapshot(model: nn.Module) -> tuple:
    """Every tensor bit for bit, every requires_grad flag and every module's type."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return snapshot(model), flags, [(n, type(m)) for n, m in model.named_modules()]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal calls NaN unequal to itself)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def unchanged(model: nn.Module, before: tuple) -> bool:
    state, flags, kinds = before
    now = model.state_dict()
    now_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return (
        now.keys() == state.keys()
        and all(bitwise_equal(now[k], state[k]) for k in state)
        and now_flags == flags
        and kinds == [(n, type(m)) for n, m in model.named_modules()]
    )


def test_pissa_on_a_nan_weight_changes_nothing():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"2\.weight has 1 NaN"):
        add_lora(m, targets=("0", "2"), rank=2, init="pissa")
    assert type(m[0]) is nn.Linear and unchanged(m, before)


@pytest.mark.parametrize("init", ["default", "pissa"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize(
    ("where", "value", "words"),
    [
        ("weight", float("nan"), r"blocks\.0\.attn\.v_proj\.weight has 1 NaN"),
        ("weight", float("inf"), r"blocks\.0\.attn\.v_proj\.weight has 1 inf"),
        ("weight", -float("inf"), r"blocks\.0\.attn\.v_proj\.weight has 1 inf"),
    ],
)
def test_non_finite_target_weight_is_named_and_refused(init, variant, where, value, words):
    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    with torch.no_grad():
        getattr(model.blocks[0].attn.v_proj, where)[2, 3] = value
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=words):
        add_lora(model, targets=("q_proj", "v_proj"), rank=2, init=init, variant=variant)
    assert unchanged(model, before)


def test_non_finite_bias_is_named():
    m = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        m[0].bias[:2] = float("nan")
        m[0].bias[3] = float("inf")
    before = full_snapshot(m)
    with pytest.raises(ValueError, match=r"0\.bias has 2 NaN and 1 inf"):
        add_lora(m, targets="0", rank=2)
    assert unchanged(m, before)


def test_non_finite_4bit_base_is_named():
    from lab.quant import quantize_base

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    quantize_base(model)
    layer = model.blocks[0].attn.q_proj
    name = next(n for n, b in layer.named_buffers() if b.is_floating_point())
    with torch.no_grad():
        getattr(layer, name).view(-1)[0] = float("nan")  # a block scale
    before = full_snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj\.weight has \d+ NaN"):
        add_lora(model, targets="q_proj", rank=2)
    assert unchanged(model, before)


@pytest.mark.parametrize("stop", [ValueError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_build_stopped_half_way_puts_everything_back(monkeypatch, stop, init):
    # The third layer's build fails after PiSSA has rewritten the first two weights.
    import lab.lora as lora_module

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    before = full_snapshot(model)
    real, built = lora_module.build_layer, []

    def failing(base, config):
        if len(built) == 2:
            raise stop
        built.append(real(base, config))
        return built[-1]

    monkeypatch.setattr(lora_module, "build_layer", failing)
    with pytest.raises(type(stop)):
        add_lora(model, targets=("q_proj", "k_proj", "v_proj"), rank=2, init=init)
    assert unchanged(model, before)


def test_a_swap_stopped_half_way_puts_everything_back(monkeypatch):
    import lab.lora as lora_module

    torch.manual_seed(0)
    model = ToyTransformer(get_preset("tiny"))
    before = full_snapshot(model)
    real, calls = lora_module._replace_module, []

    def failing(model_, name, new):
        calls.append(name)
        if len(calls) == 3:  # two layers already swapped in
            raise KeyboardInterrupt
        real(model_, name, new)

    monkeypatch.setattr(lora_module, "_replace_module", failing)
    with pytest.raises(KeyboardInterrupt):
        add_lora(model, targets=("q_proj", "k_proj", "v_proj"), rank=2, init="pissa")
    monkeypatch.setattr(lora_module, "_replace_module", real)
    assert unchanged(model, before)


# A real SIGINT, sent by the process to itself at a known point: while PiSSA decomposes the
# third weight, or while the second new layer is being swapped in. Python's own handler turns
# it into KeyboardInterrupt, exactly as Ctrl-C in a terminal or a notebook's interrupt does.
_CTRL_C = """
import os, signal, sys, torch
import lab, lab.lora
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
    lab.lora._replace_module = interrupt_on_third(lab.lora._replace_module)
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


def run_script(code: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`code` run by this Python in a process of its own, with `args`; its output captured."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=os.getcwd(), preexec_fn=interruptible)  # fmt: skip


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


# --- merge, unmerge and remove never write NaN into W ---------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("action", ["merge_lora", "remove_lora"])
def test_a_diverged_adapter_is_never_merged(variant, action):
    from lab.lora import remove_lora

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
def test_unmerge_refuses_to_write_nan_and_changes_nothing(action):
    # (DoRA's unmerge puts back the W it kept at merge: tests/test_variants.py.)
    from lab.lora import remove_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_lora(model, ["0", "2"], rank=2, alpha=4)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
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


def test_save_adapter_refuses_a_diverged_adapter(lora_model, tmp_path):
    with torch.no_grad():
        lora_model[2].lora_A[0, 0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    with pytest.raises(ValueError, match=r"not saved: 2\.lora_A has 1 inf"):
        save_adapter(lora_model, path)
    assert list(tmp_path.iterdir()) == []


# --- adapter files state every field --------------------------------------------------------


def _file_with_config(model, path, change) -> None:
    """Save model's adapter to path with its stored config changed by change(dict)."""
    from safetensors import safe_open

    save_adapter(model, path)
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["lora_lab_config"])
    change(config)
    meta["lora_lab_config"] = json.dumps(config)
    save_file(tensors, path, metadata=meta)


FIELDS = ("rank", "alpha", "dropout", "targets", "rslora", "variant", "init", "lr_ratio")


@pytest.mark.parametrize("field", FIELDS)
def test_adapter_file_missing_a_field_is_refused_naming_it(lora_model, tmp_path, field):
    path = tmp_path / "a.safetensors"
    _file_with_config(lora_model, path, lambda c: c.pop(field))
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match=f"adapter file {path} has no '{field}'"):
        load_adapter(lora_model, path)
    assert same(lora_model, before)


def test_adapter_file_without_alpha_never_loads_at_the_default_scale(tmp_path):
    # Saved at alpha 8; without its alpha the file must not load into an alpha-16 model (the
    # default) nor claim to hold 16 when refused by an alpha-8 one.
    torch.manual_seed(0)
    saved = ToyTransformer(get_preset("tiny"))
    add_lora(saved, targets=("q_proj", "v_proj"), rank=4, alpha=8)
    path = tmp_path / "noalpha.safetensors"
    _file_with_config(saved, path, lambda c: c.pop("alpha"))
    for alpha in (16, 8):
        model = ToyTransformer(get_preset("tiny"))
        add_lora(model, targets=("q_proj", "v_proj"), rank=4, alpha=alpha)
        with pytest.raises(ValueError, match="has no 'alpha'") as info:
            load_adapter(model, path)
        assert "16.0" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("rank", "2", "rank must be an int"),
        ("rank", 2.0, "rank must be an int"),
        ("rank", True, "rank must be an int"),
        ("rank", 0, "rank must be an int >= 1"),
        ("rank", 10**400, "rank="),
        ("alpha", "4", "alpha must be a number"),
        ("alpha", True, "alpha must be a number"),
        ("alpha", float("nan"), "alpha must be a finite number"),
        ("alpha", float("inf"), "alpha must be a finite number"),
        ("alpha", -0.0, "alpha must be a finite number > 0"),
        ("alpha", None, "alpha must be a number"),
        ("dropout", -0.5, "dropout must be a number in"),
        ("dropout", False, "dropout must be a number"),
        ("targets", "0", "targets must be a list"),
        ("targets", [1], "every target must be a non-empty str"),
        ("targets", [], "targets is empty"),
        ("targets", {"0": 1}, "targets must be a list"),
        ("rslora", "false", "rslora must be true or false"),
        ("rslora", 0, "rslora must be true or false"),
        ("variant", "lorax", "variant='lorax'"),
        ("variant", 3, "variant must be a str"),
        ("init", None, "init must be a str"),
        ("lr_ratio", True, "lr_ratio must be a number"),
        ("lr_ratio", 0, "lr_ratio=0"),
        ("lr_ratio", float("nan"), "lr_ratio=nan"),
        ("ranks", 4, "unknown fields 'ranks'"),
    ],
)
def test_adapter_file_field_of_the_wrong_type_or_value(lora_model, tmp_path, field, value, words):
    path = tmp_path / "bad.safetensors"
    _file_with_config(lora_model, path, lambda c: c.__setitem__(field, value))
    before = snapshot(lora_model)
    with pytest.raises(ValueError, match=f"adapter file {path}.*{re.escape(words)}"):
        load_adapter(lora_model, path)
    assert same(lora_model, before)


def test_adapter_file_config_that_is_not_a_dict(lora_model, tmp_path):
    from safetensors import safe_open

    path = save_adapter(lora_model, tmp_path / "list.safetensors")
    with safe_open(path, "pt") as f:
        meta = {**f.metadata(), "lora_lab_config": "[4, 8]"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="must be a dict of LoRAConfig fields, got list"):
        load_adapter(lora_model, path)


# A FIFO and /dev/zero are named for what they are, and nothing blocks on them: both are tried
# in a child process with a deadline, by load_adapter and by the doctor.
_SPECIAL_PATHS = """
import os, sys, torch, lab
from torch import nn
fifo = os.path.join(sys.argv[1], "adapter.fifo")
os.mkfifo(fifo)
model = nn.Sequential(nn.Linear(8, 8))
lab.add_lora(model, targets="0", rank=2)
for path, kind in ((fifo, "named pipe"), ("/dev/zero", "a device")):
    try:
        lab.load_adapter(model, path)
    except OSError as exc:
        assert kind in str(exc) and path in str(exc), exc
    else:
        sys.exit(f"load_adapter accepted {path}")
    (finding,) = lab.doctor(model, path)[-1:]
    assert finding.code == "adapter-file-unreadable" and kind in finding.detail, finding
    print("named", kind)
"""


def test_fifo_and_device_adapter_paths_are_named_and_never_block(tmp_path):
    done = run_script(_SPECIAL_PATHS, str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "named named pipe" in done.stdout and "named a device" in done.stdout


# --- LoRAConfig's edges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rank": 10**400}, "rank=1000"),
        ({"alpha": 10**400}, "alpha=1000"),
        ({"lr_ratio": 10**400}, "lr_ratio=1000"),
        ({"alpha": 1e-320}, "rounded away"),
        ({"rank": 2**63}, "rounded away"),
        ({"rank": 10**400, "rslora": True}, "alpha/sqrt(rank)"),
        ({"dropout": 10**400}, "dropout must be a number in [0, 1)"),
    ],
)
def test_config_extremes_refused_with_short_messages(kwargs, words):
    from lab.config import LoRAConfig

    with pytest.raises(ValueError, match=re.escape(words)) as info:
        LoRAConfig(**kwargs)
    assert len(str(info.value)) < 400


def test_config_negative_zero_dropout_is_zero():
    from lab.config import LoRAConfig

    config = LoRAConfig(dropout=-0.0)
    assert math.copysign(1, config.dropout) == 1 and config.to_dict()["dropout"] == 0.0
    assert json.dumps(config.to_dict()) == json.dumps(LoRAConfig(dropout=0.0).to_dict())


# --- found by hunting -----------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["False", None, 0, 1])
def test_remove_lora_merge_must_be_a_bool(lora_model, merge):
    from lab.lora import remove_lora

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


def test_save_adapter_never_replaces_a_fifo_or_a_device_link(lora_model, tmp_path):
    fifo = tmp_path / "adapter.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a named pipe"), (link, "a device")):
        with pytest.raises(OSError, match=f"cannot save {path}: it is {kind}"):
            save_adapter(lora_model, path)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.fifo", "zero.safetensors"]


def test_adapter_symlink_loop_and_device_link_are_named(lora_model, tmp_path):
    from lab.diagnosis import doctor

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    for path, words in ((loop, "symbolic links"), (link, "is a device")):
        before = snapshot(lora_model)
        with pytest.raises(OSError, match=words):
            load_adapter(lora_model, path)
        assert same(lora_model, before)
        (finding,) = [f for f in doctor(lora_model, path) if f.code == "adapter-file-unreadable"]
        assert words in finding.detail and finding.detail.count(str(path)) == 1


def test_adapter_file_without_its_layer_list(lora_model, tmp_path):
    from safetensors import safe_open

    path = save_adapter(lora_model, tmp_path / "a.safetensors")
    with safe_open(path, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "lora_lab_layers"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError, match="has no 'lora_lab_layers' metadata"):
        load_adapter(lora_model, path)


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
