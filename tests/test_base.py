"""The shipped pretrained base: loads, knows its pretraining skills, fails the new tasks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from needs import CtrlCInGetTensor
from safetensors.torch import save_file

import lab
from lab import (
    BASE_MODEL_PATH,
    ToyTransformer,
    add_lora,
    get_preset,
    get_task,
    load_base_model,
    merge_lora,
    quantize_base,
    remove_lora,
    save_base_model,
    train,
)
from lab.base import load_base_config, model_from_state
from lab.quant import dequantize_base
from lab.tasks import FINETUNE_TASKS, PRETRAIN_TASKS


@pytest.fixture(scope="module")
def base():
    return load_base_model(device="cpu")


def test_checkpoint_is_small_and_tied(base):
    assert BASE_MODEL_PATH.stat().st_size < 4 * 2**20
    assert base.head.weight is base.tok_emb.weight
    assert not base.training


@pytest.mark.parametrize("name", PRETRAIN_TASKS)
def test_base_has_learned_each_pretraining_skill(base, name):
    assert get_task(name).evaluate(base)["accuracy"] >= 0.9


@pytest.mark.parametrize("name", FINETUNE_TASKS)
def test_base_cannot_do_the_finetuning_tasks(base, name):
    assert get_task(name).evaluate(base)["accuracy"] <= 0.2


def test_lora_on_q_and_v_learns_a_new_task_from_the_base():
    model = load_base_model(device="cpu")
    add_lora(model, rank=8, alpha=16)
    result = train(model, get_task("rotate"), steps=150, lr=2e-2, batch_size=64, progress=False)
    assert result.heldout["accuracy"] >= 0.8


def test_save_then_load_round_trips_exactly(base, tmp_path):
    path = save_base_model(base, tmp_path / "copy.safetensors", info={"note": "test"})
    again = load_base_model(device="cpu", path=path)
    x = get_task("copy").heldout_inputs[:8]
    assert torch.equal(base(x), again(x))
    assert again.head.weight is again.tok_emb.weight


def test_corrupt_or_missing_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BASE_MODEL_PATH.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable base model file"):
        load_base_model(device="cpu", path=bad)
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        load_base_model(device="cpu", path=tmp_path / "missing.safetensors")


def test_config_is_read_from_the_metadata_alone(base, tmp_path):
    from lab.base import load_base_config

    assert load_base_config() == base.config
    with pytest.raises(FileNotFoundError, match="pretrain_base.py"):
        load_base_config(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable base model file"):
        load_base_config(junk)


# ---------------------------------------------------------------------------------------------
# What save_base_model refuses to write, and crafted base files
# ---------------------------------------------------------------------------------------------


def _tiny_model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(get_preset("tiny"))


def test_a_quantised_model_is_refused_before_writing_and_dequantize_base_saves(tmp_path):
    model = _tiny_model()
    quantize_base(model)
    path = tmp_path / "q.safetensors"
    with pytest.raises(ValueError, match=r"4-bit layers \(blocks\.0\.attn\.q_proj.*dequantize"):
        save_base_model(model, path)
    assert not path.exists()
    dequantize_base(model)
    again = load_base_model("cpu", save_base_model(model, path))
    x = get_task("copy").heldout_inputs[:4]
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("merged", [False, True])
def test_a_model_with_lora_layers_is_refused_before_writing(tmp_path, merged):
    model = _tiny_model()
    add_lora(model, rank=2, alpha=4)
    if merged:
        merge_lora(model)
    path = tmp_path / "l.safetensors"
    with pytest.raises(ValueError, match=r"LoRA layers \(blocks\.0\.attn\.q_proj.*remove_lora"):
        save_base_model(model, path)
    assert not path.exists()
    remove_lora(model)
    assert load_base_model("cpu", save_base_model(model, path)).config == model.config


def test_a_meta_or_non_finite_model_is_refused_before_writing(tmp_path):
    path = tmp_path / "m.safetensors"
    with torch.device("meta"):
        meta = ToyTransformer(get_preset("tiny"))
    with pytest.raises(ValueError, match="meta device"):
        save_base_model(meta, path)
    broken = _tiny_model()
    with torch.no_grad():
        broken.ln_f.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"ln_f\.weight contains non-finite"):
        save_base_model(broken, path)
    with pytest.raises(TypeError, match="JSON values"):
        save_base_model(_tiny_model(), path, info={"when": object()})
    untied = _tiny_model()  # the file stores the tied matrix once: this head would be lost
    untied.head.weight = torch.nn.Parameter(untied.tok_emb.weight.detach() + 1)
    with pytest.raises(ValueError, match="head is not tied to its token embedding"):
        save_base_model(untied, path)
    assert not path.exists()


def _crafted(tmp_path, change_config=None, change_tensors=None, name="crafted.safetensors"):
    """A base file written straight with safetensors, its config or tensors changed."""
    model = _tiny_model()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    config = model.config.to_dict()
    if change_config:
        config.update(change_config)
    if change_tensors:
        change_tensors(tensors)
    path = tmp_path / name
    save_file(tensors, path, metadata={"lora_lab_model_config": json.dumps(config)})
    return path


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"n_layers": 10**6}, r"n_layers=1000000.*it holds 14\): missing tensors \['blocks\.1\."),
        (
            {"d_model": 2**20, "n_heads": 1},
            r"has shape \(32, 32\), but its config needs \(1048576, 1048576\)",
        ),
        ({"vocab_size": 10**9}, r"tok_emb\.weight has shape \(64, 32\).*\(1000000000, 32\)"),
        ({"max_seq_len": 10**9}, r"pos_emb\.weight has shape \(32, 32\)"),
    ],
)
def test_a_crafted_config_is_refused_before_anything_is_built(tmp_path, config, words):
    path = _crafted(tmp_path, change_config=config)
    for read in (load_base_config, lambda p: load_base_model("cpu", p)):
        with pytest.raises(ValueError, match=words) as info:
            read(path)
        assert str(path) in str(info.value)


def test_mixed_dtypes_are_refused_naming_both_and_one_dtype_loads(tmp_path):
    def one_double(t):
        t["blocks.0.attn.q_proj.weight"] = t["blocks.0.attn.q_proj.weight"].double()

    path = _crafted(tmp_path, change_tensors=one_double)
    with pytest.raises(ValueError, match=r"mixes dtypes: 13 float32.*1 float64 \(e\.g\. blocks\.0"):
        load_base_model("cpu", path)

    def all_double(t):
        t.update({k: v.double() for k, v in t.items()})

    model = load_base_model("cpu", _crafted(tmp_path, change_tensors=all_double, name="f64.st"))
    logits = model(get_task("copy").heldout_inputs[:2])  # consistent: the forward works
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.float8_e5m2, "float8_e5m2"),
        (torch.int8, "int8"),
    ],
)
def test_a_float8_or_integer_tensor_is_refused_clearly(tmp_path, dtype, name):
    def cast(t):
        t["ln_f.weight"] = t["ln_f.weight"].to(dtype)

    path = _crafted(tmp_path, change_tensors=cast)
    with pytest.raises(ValueError, match=rf"ln_f\.weight has dtype {name}; .*float32"):
        load_base_model("cpu", path)
    model = _tiny_model()
    state = dict(model.state_dict())
    state["ln_f.weight"] = state["ln_f.weight"].to(dtype)
    with pytest.raises(ValueError, match=rf"ln_f\.weight has dtype torch\.{name}"):
        model_from_state(model.config, state)


def test_a_fifo_or_a_device_is_named_as_such(tmp_path):
    fifo = tmp_path / "base.safetensors"
    os.mkfifo(fifo)  # reading it would block forever
    for read in (load_base_config, lambda p: load_base_model("cpu", p)):
        with pytest.raises(OSError, match=r"is a named pipe \(FIFO\), not an ordinary file"):
            read(fifo)
        with pytest.raises(OSError, match="/dev/zero is a device"):
            read("/dev/zero")


def test_an_unavailable_device_is_named_before_the_file_is_read():
    with pytest.raises(ValueError, match=r"device='cuda:99' is not available"):
        load_base_model("cuda:99")


def test_the_cli_refuses_a_crafted_base_file_at_once_without_a_traceback(tmp_path):
    """A copy of the lab whose shipped base file claims a million layers: `python -m lab sweep`
    names the file and the config, exits with an error, trains nothing."""
    root = Path(lab.__file__).parent
    shutil.copytree(root, tmp_path / "lab", ignore=shutil.ignore_patterns("__pycache__"))
    crafted = _crafted(tmp_path, change_config={"n_layers": 10**6})
    shutil.copy(crafted, tmp_path / "lab" / "data" / "base_model.safetensors")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    cmd = [sys.executable, "-m", "lab", "sweep", "--task", "sort_desc_small", "--ranks", "1"]
    cmd += ["--steps", "3", "--cache", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out[-2000:]
    assert "base_model.safetensors does not match its config (n_layers=1000000" in out, out[-2000:]


def test_a_file_whose_head_differs_from_the_tied_embedding_is_refused(tmp_path):
    def other_head(t):
        t["head.weight"] = t["tok_emb.weight"] + 1  # loading would drop it for the embedding

    path = _crafted(tmp_path, change_tensors=other_head)
    with pytest.raises(ValueError, match="head.weight differs from tok_emb.weight"):
        load_base_model("cpu", path)

    def same_head(t):
        t["head.weight"] = t["tok_emb.weight"].clone()

    load_base_model("cpu", _crafted(tmp_path, change_tensors=same_head, name="same.st"))


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


def test_a_ctrl_c_swallowed_while_the_base_loads_is_a_ctrl_c_not_a_corrupt_file(
    monkeypatch, ctrl_c_raises
):
    """Seen in a CLI run interrupted as it loaded the base: torch turned the KeyboardInterrupt
    into "could not determine the shape of object type 'torch.storage.UntypedStorage'", which
    was reported as a corrupt base model file."""
    import lab.base

    real = lab.base.safe_open
    monkeypatch.setattr(lab.base, "safe_open", lambda *a, **k: CtrlCInGetTensor(real(*a, **k)))
    with pytest.raises(KeyboardInterrupt) as caught:
        load_base_model(device="cpu")
    assert "could not determine the shape" in str(caught.value.__cause__)
