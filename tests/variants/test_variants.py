"""The shared properties, run over every registered LoRA flavour (PEFT's TEST_CASES style).

The table is built from the registries (lab.config.VARIANTS x INITS), plus the settings that
are not flavours of their own (rsLoRA, LoRA+, a 4-bit base), so a newly registered variant is
tested here without editing this file. Every case uses alpha != rank, so a scaling bug shows.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flavour_cases import _peft_pair, base_model, make
from torch import nn

import lab
from lab.config import INITS, VARIANTS, LoRAConfig
from lab.frozen import is_quantized
from lab.step import make_optimizer, training_step
from lab.surgery import lora_layers, parameter_groups


def _cases() -> list[tuple[str, dict, str | None]]:
    cases = []
    for v in VARIANTS:
        for i in INITS:
            cases.append((f"{v}-{i}", {"variant": v, "init": i}, None))
    cases += [
        ("rslora", {"rslora": True}, None),
        ("lora+", {"lr_ratio": 16.0}, None),
        ("dora-lora+", {"variant": "dora", "lr_ratio": 4.0}, None),
        ("dropout", {"dropout": 0.2}, None),
        ("dora-dropout", {"variant": "dora", "dropout": 0.2}, None),
    ]
    for v in VARIANTS:  # every flavour on a 4-bit base; PiSSA needs full precision
        cases.append((f"{v}-nf4", {"variant": v}, "nf4"))
    cases.append(("lora-int4-single-quant", {}, "int4"))
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def tokens(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 60, (n, 12), generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module) -> None:
    """Adapters as training might leave them: B nonzero, DoRA's magnitude moved."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name, p in layer.adapter_parameters().items():
                if name == "magnitude":
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything that is not an adapter tensor: base weights, packed codes, scales."""
    adapters = set(lab.lora_state_dict(model))
    return {k: v.clone() for k, v in model.state_dict().items() if k not in adapters}


@pytest.mark.parametrize(("name", "fields", "quant"), CASES, ids=IDS)
def test_a_fresh_adapter_leaves_the_outputs_unchanged(name, fields, quant):
    reference = base_model(quant)
    x = tokens()
    with torch.no_grad():
        before = reference(x)
    model, config = make(fields, quant)
    with torch.no_grad():
        after = model(x)
    if INITS[config.init].changes_base:
        # PiSSA: base + adapter together compute W; the base alone no longer does.
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        changed = [
            n for n, layer in lora_layers(model).items()
            if not torch.allclose(layer.base_weight(), reference.get_submodule(n).weight)
        ]  # fmt: skip
        assert changed == list(lora_layers(model)), "PiSSA left some base weight as it was"
    else:
        assert torch.equal(after, before), (after - before).abs().max()


@pytest.mark.parametrize(("name", "fields", "quant"), CASES, ids=IDS)
def test_merged_equals_unmerged_and_unmerge_restores(name, fields, quant):
    model, _ = make(fields, quant)
    perturb(model)
    x = tokens()
    weights = {n: layer.base_weight().clone() for n, layer in lora_layers(model).items()}
    frozen = frozen_state(model)
    with torch.no_grad():
        unmerged = model(x)
    with pytest.warns(UserWarning, match="4-bit") if quant else _no_warning():
        lab.merge_lora(model)
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    lab.unmerge_lora(model)
    for n, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_weight(), weights[n], rtol=1e-6, atol=1e-6)
        assert is_quantized(layer.base) == bool(quant)
    if quant:  # the 4-bit base comes back bit for bit
        after = frozen_state(model)
        assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.mark.parametrize(("name", "fields", "quant"), CASES, ids=IDS)
def test_only_adapter_parameters_change_after_a_step(name, fields, quant):
    model, _ = make(fields, quant)
    model.train()
    frozen = frozen_state(model)
    adapters = {k: v.clone() for k, v in lab.lora_state_dict(model).items()}
    x = tokens(8)
    optimizer = make_optimizer(model, lr=1e-2)
    loss = training_step(model, x, x, optimizer)
    assert torch.isfinite(loss)
    after = frozen_state(model)
    assert all(torch.equal(after[k], frozen[k]) for k in frozen), "a frozen tensor changed"
    moved = {k for k, v in lab.lora_state_dict(model).items() if not torch.equal(v, adapters[k])}
    # B starts at zero, so A gets no gradient on the first step; B (and m) always move.
    assert {k for k in moved if k.endswith("lora_B")} == {
        k for k in adapters if k.endswith("lora_B")
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Every adapter tensor a layer hands out as a Parameter trains; one it hands out detached
    # (LoRA-FA's A) is saved with the adapter but kept at its start by design.
    meant = {
        f"{name}.{key}"
        for name, layer in lora_layers(model).items()
        for key, p in layer.adapter_parameters().items()
        if isinstance(p, nn.Parameter)
    }
    assert trainable == meant and meant <= set(adapters)


@pytest.mark.parametrize(("name", "fields", "quant"), CASES, ids=IDS)
def test_save_then_load_reproduces_the_outputs(name, fields, quant, tmp_path):
    model, config = make(fields, quant)
    perturb(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    path = lab.save_adapter(model, tmp_path / f"{name}.safetensors")
    fresh = base_model(quant)
    torch.manual_seed(99)  # another A initialisation: the file must overwrite it
    lab.add_lora(fresh, config)
    info = lab.load_adapter(fresh, path)
    assert info["variant"] == config.variant and info["init"] == config.init
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "fields", "quant"), CASES, ids=IDS)
def test_bad_input_is_refused_and_the_model_is_unchanged(name, fields, quant, tmp_path):
    model, config = make(fields, quant)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="rank=64 is too large"):
        lab.add_lora(model, config.replace(rank=64, targets=("k_proj",)))
    with pytest.raises(ValueError, match="already has LoRA"):
        lab.add_lora(model, config)
    with pytest.raises(TypeError, match="either a LoRAConfig or its fields"):
        lab.add_lora(model, config, rank=2)
    # An adapter file of another flavour does not load into this one.
    other_variant = next((v for v in VARIANTS if v != config.variant), None)
    if other_variant is not None and not (quant and INITS[config.init].changes_base):
        other = base_model(quant)
        lab.add_lora(other, config.replace(variant=other_variant))
        path = lab.save_adapter(other, tmp_path / "other.safetensors")
        with pytest.raises(ValueError, match="variant: file has"):
            lab.load_adapter(model, path)
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("variant", "qlora", ["variant='qlora'", "'lora'", "'dora'"]),
        ("init", "svd", ["init='svd'", "'pissa'"]),
        ("lr_ratio", 0.0, ["lr_ratio=0.0", "LoRA+"]),
        ("lr_ratio", float("nan"), ["lr_ratio=nan"]),
        ("lr_ratio", True, ["lr_ratio", "number"]),
        ("rank", 0, ["rank must be an int >= 1"]),
        ("alpha", -1, ["alpha must be"]),
    ],
)
def test_lora_config_refuses_bad_fields(field, value, words):
    with pytest.raises((TypeError, ValueError)) as info:
        LoRAConfig(**{field: value})
    assert all(w in str(info.value) for w in words), str(info.value)


def test_lora_config_round_trips_through_its_dict():
    config = LoRAConfig(rank=4, alpha=10, targets="q_proj", variant="dora", lr_ratio=16)
    assert config.targets == ("q_proj",) and config.alpha == 10.0
    assert LoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields 'ranks'"):
        LoRAConfig.from_dict({**config.to_dict(), "ranks": 4})
    # A stored config states every field: none is filled with its default.
    for field in config.to_dict():
        partial = {k: v for k, v in config.to_dict().items() if k != field}
        with pytest.raises(ValueError, match=f"has no '{field}'"):
            LoRAConfig.from_dict(partial)


def test_lora_plus_trains_b_at_lambda_times_a():
    model, _ = make({"lr_ratio": 16.0}, None)
    groups = parameter_groups(model)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for layer in lora_layers(model).values():
        assert scale[id(layer.lora_A)] == 1.0 and scale[id(layer.lora_B)] == 16.0
    optimizer = make_optimizer(model, lr=1e-3)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == [1e-3, 16e-3]


def test_merge_on_a_4bit_base_says_which_merge_it_does_and_requantize_is_lossy():
    model, _ = make({}, "nf4")
    perturb(model)
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
    exact = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="full-precision copies"):
        lab.merge_lora(exact)
    with pytest.warns(UserWarning, match="lossy"):
        lab.merge_lora(model, requantize=True)
    assert all(is_quantized(layer.base) for layer in lora_layers(model).values())
    with torch.no_grad():
        exact_err = (exact(x) - unmerged).abs().max().item()
        lossy_err = (model(x) - unmerged).abs().max().item()
    assert exact_err < 1e-4 < lossy_err, (exact_err, lossy_err)
    with pytest.raises(ValueError, match="requantize=True is for a quantised base"):
        plain, _ = make({}, None)
        lab.merge_lora(plain, requantize=True)


def test_batched_engine_trains_lora_plus_rslora_pissa_and_dora_as_alone(monkeypatch):
    import importlib

    from lab.sweeps import SweepPoint, run_group, run_point

    # Losses and held-out accuracy are compared; the measurements taken after training
    # (forgetting on the pretraining skills, the first step's memory) are not, and cost more than
    # the training: left out of both runs (tests/engine/test_batched.py compares them).
    run_module = importlib.import_module("lab.engine.run")
    monkeypatch.setattr(run_module, "forgetting", lambda model: None)
    monkeypatch.setattr(run_module, "_first_step_memory", lambda point, base, device: None)

    points = [
        SweepPoint("sort_desc", 4, steps=6, lr=2e-3, lr_ratio=4.0),
        SweepPoint("sort_desc", 2, steps=6, lr=2e-3, rslora=True),
        SweepPoint("sort_desc", 4, steps=6, lr=2e-3, init="pissa"),
        SweepPoint("sort_desc", 2, steps=6, lr=2e-3, init="pissa", dropout=0.1, alpha=4.0),
        SweepPoint("sort_desc", 4, steps=6, lr=2e-3),
        SweepPoint("sort_desc", 4, steps=6, lr=2e-3, variant="dora"),
        SweepPoint("sort_desc", 2, steps=6, lr=2e-3, variant="dora", dropout=0.2, lr_ratio=4.0),
        SweepPoint("sort_desc", 4, steps=6, lr=2e-3, variant="dora", init="pissa"),
    ]
    assert all(p.batchable for p in points)
    together = {r.point: r for r in run_group(points, device="cpu", progress=False)}
    assert all("batched" in r.extra for r in together.values())
    for point in points:
        alone = run_point(point, device="cpu", progress=False)
        torch.testing.assert_close(
            torch.tensor(together[point].losses), torch.tensor(alone.losses), rtol=1e-5, atol=0
        )
        assert together[point].heldout["accuracy"] == pytest.approx(
            alone.heldout["accuracy"], abs=2 / alone.heldout["n"]
        )


def test_dora_batches_and_run_group_refuses_a_4bit_base_point():
    from lab.engine.batched import AdapterSpec
    from lab.sweeps import SweepPoint, run_group

    assert AdapterSpec(LoRAConfig(variant="dora")).config.variant == "dora"  # DoRA batches
    with pytest.raises(ValueError, match="no exact batched form"):
        run_group([SweepPoint("sort_desc", 4, steps=2, quant="nf4")], device="cpu")


# --- the same weights through PEFT ----------------------------------------------------------
# (Wrap and the pairs: tests/variants/flavour_cases.py)


def test_lora_plus_groups_match_peft_create_loraplus_optimizer():
    pytest.importorskip("peft", reason="PEFT is benchmark-only: benchmarks/requirements.txt")
    from peft.optimizers import create_loraplus_optimizer

    for variant, use_dora in (("lora", False), ("dora", True)):
        ours, theirs, _ = _peft_pair({"variant": variant, "lr_ratio": 16.0}, {"use_dora": use_dora})
        optimizer = create_loraplus_optimizer(
            theirs, optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0
        )
        peft_lr = {}
        names = {id(p): n for n, p in theirs.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                kind = next(k for k in ("lora_A", "lora_B", "lora_magnitude") if k in name)
                peft_lr[kind] = group["lr"]
        ours_opt = make_optimizer(ours, lr=1e-3)
        ours_lr = {}
        names = {id(p): n for n, p in ours.named_parameters()}
        for group in ours_opt.param_groups:
            for p in group["params"]:
                kind = names[id(p)].rpartition(".")[2].replace("magnitude", "lora_magnitude")
                ours_lr[kind] = group["lr"]
        assert ours_lr == pytest.approx(peft_lr), (variant, ours_lr, peft_lr)


def test_remove_lora_on_a_4bit_base_says_the_weights_become_full_precision():
    model, _ = make({}, "nf4")
    perturb(model)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="full-precision linears"):
        names = lab.remove_lora(model)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"variant": "qlora"}, ["variant='qlora'", "expected one of"]),
        ({"lr_ratio": -1}, ["lr_ratio=-1"]),
        ({"ranks": 4}, ["unknown fields", "ranks"]),
        ({"rank": "4"}, ["rank must be an int"]),
    ],
)
def test_an_adapter_file_with_a_bad_config_is_refused_through_the_constructor(
    change, words, tmp_path
):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, config = make({}, None)
    path = lab.save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        meta = dict(f.metadata())
    meta["lora_lab_config"] = json.dumps({**config.to_dict(), **change})
    save_file(tensors, path, metadata=meta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        lab.load_adapter(model, path)
    message = str(info.value)
    assert f"adapter file {path}" in message
    assert all(w in message for w in words), message
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
