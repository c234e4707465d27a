"""Tests for lab/adapters.py: lora_state_dict, load_lora_state_dict and adapter files.

Each refusal asserts the exception type, key words of its message, and that nothing changed."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from core_kit import (
    assert_unchanged,
    randomize_adapters,
    run_script,
    same,
    snapshot,
    tensors_of,
    tiny_model,
    tokens,
)
from needs import CtrlCInGetTensor
from safetensors import safe_open
from safetensors.torch import save_file

from lab.adapters import load_adapter, load_lora_state_dict, lora_state_dict, save_adapter
from lab.config import LoRAConfig
from lab.model import ToyTransformer, get_preset
from lab.surgery import (
    add_lora,
    merge_lora,
)


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
    before = tensors_of(lora_model)
    with pytest.raises(exc, match=words):
        load_lora_state_dict(lora_model, state)
    assert same(lora_model, before)


@pytest.mark.parametrize("bad", [None, [1, 2], "state"])
def test_load_state_dict_not_a_mapping(lora_model, bad):
    before = tensors_of(lora_model)
    with pytest.raises(TypeError, match="mapping"):
        load_lora_state_dict(lora_model, bad)
    assert same(lora_model, before)


def test_load_state_dict_mixed_key_types(lora_model):
    state = {**lora_state_dict(lora_model), 3: torch.zeros(1)}
    before = tensors_of(lora_model)
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state_dict(lora_model, state)
    assert same(lora_model, before)


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
    before = tensors_of(lora_model)
    with pytest.raises(TypeError, match="floating point"):
        load_adapter(lora_model, path)
    assert same(lora_model, before)


def test_adapter_path_is_directory(lora_model, tmp_path):
    before = tensors_of(lora_model)
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
    before = tensors_of(lora_model)
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


def test_save_adapter_refuses_a_diverged_adapter(lora_model, tmp_path):
    with torch.no_grad():
        lora_model[2].lora_A[0, 0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    with pytest.raises(ValueError, match=r"not saved: 2\.lora_A has 1 inf"):
        save_adapter(lora_model, path)
    assert list(tmp_path.iterdir()) == []


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
    before = tensors_of(lora_model)
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
    before = tensors_of(lora_model)
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
        before = tensors_of(lora_model)
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


def test_a_ctrl_c_swallowed_while_an_adapter_loads_is_a_ctrl_c_not_a_corrupt_file(
    saved, monkeypatch, ctrl_c_raises
):
    import lab.adapters

    _, path = saved
    fresh = fresh_lora_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    real = lab.adapters.safe_open
    monkeypatch.setattr(lab.adapters, "safe_open", lambda *a, **k: CtrlCInGetTensor(real(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        load_adapter(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # untouched
