"""The flavour registry is the one seam: what a flavour's module registers is what the batched
engine, the doctor, the explorer and the CLI use, and nothing else decides for it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import lab
from lab.config import INITS, VARIANTS, Init, LoRAConfig, Variant
from lab.engine.batched import AdapterSpec, batchable, train_batched
from lab.lora import LoRALinear
from lab.variants.registry import (
    PLAIN,
    BatchedForm,
    adapter_at_start,
    batched_form,
    choices_help,
    display_name,
    flavour_label,
)


class DoubledLoRA(LoRALinear):
    """A throwaway flavour: twice LoRA's update, W + 2 (alpha/r) B A."""

    variant_name = "doubled"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pretrained = self.base(x)
        return pretrained + 2 * (super().forward(x) - pretrained)


def _register(monkeypatch, batched) -> None:
    record = Variant("doubled", DoubledLoRA, "Doubled (a test flavour): W + 2 (alpha/r) B A",
                     batched=batched)  # fmt: skip
    monkeypatch.setitem(VARIANTS, "doubled", record)


def _points(steps: int = 4) -> list:
    """A plain LoRA point and the throwaway flavour's, otherwise the same."""
    common = {"steps": steps, "batch_size": 8, "lr": 2e-2}
    return [
        lab.SweepPoint("sort_desc_small", 2, 4.0, **common),
        lab.SweepPoint("sort_desc_small", 2, 4.0, variant="doubled", **common),
    ]


@pytest.mark.parametrize("batched", [None, True], ids=["no-batched-form", "batched-true"])
def test_a_flavour_the_batched_engine_has_no_form_for_trains_alone_and_says_so(
    monkeypatch, tmp_path, capsys, batched
):
    """Registered without a batched form, or with batched=True for a layer of its own (a
    boolean is believed only for a layer that computes as LoRALinear): the sweep trains it one
    run at a time, says so in one line, and its result is its own, never plain LoRA's."""
    _register(monkeypatch, batched)
    config = LoRAConfig(rank=2, alpha=4.0, variant="doubled")
    assert batched_form(config) is None and not batchable(config)
    with pytest.raises(ValueError, match="cannot be trained batched exactly"):
        AdapterSpec(config)
    plain, doubled = _points()
    results = {r.point: r for r in lab.sweep([plain, doubled], lab.SweepCache(tmp_path / "a"),
                                             progress=False, device="cpu")}  # fmt: skip
    said = [line for line in capsys.readouterr().out.splitlines() if "one by one" in line]
    assert len(said) == 1 and "Doubled" in said[0], said  # the flavour by its display name
    alone = lab.sweep([doubled], lab.SweepCache(tmp_path / "b"), progress=False, device="cpu",
                      batched=False)[0]  # fmt: skip
    assert results[doubled].losses == alone.losses
    assert results[doubled].losses != results[plain].losses  # not trained as plain LoRA


def test_a_flavour_with_a_batched_form_trains_batched_exactly_as_alone(monkeypatch):
    """DoRA registers a BatchedForm (a stacked magnitude, its own output): batched == alone."""
    config = LoRAConfig(rank=2, alpha=4.0, variant="dora")
    assert batched_form(config) is VARIANTS["dora"].batched
    assert batched_form(LoRAConfig()) is PLAIN  # plain LoRA's batched=True is believed
    spec = AdapterSpec(config, lr=2e-2, seed=3)
    task = lab.get_task("sort_desc_small")
    base = lab.load_base_model("cpu")
    run = train_batched(base, task, [spec, AdapterSpec(LoRAConfig(rank=2, alpha=4.0))], 3, 8,
                        "cpu", progress=False)  # fmt: skip
    model = copy.deepcopy(base)
    spec.add_to(model)
    alone = lab.train(model, task, steps=3, lr=2e-2, batch_size=8, seed=3, progress=False,
                      measure_memory=False, device="cpu")  # fmt: skip
    torch.testing.assert_close(run.losses[0], torch.tensor(alone.losses), rtol=1e-5, atol=0)


def test_an_init_that_changes_w_otherwise_than_it_says_is_refused_by_the_batched_engine(
    monkeypatch,
):
    """An init marked batched whose change to W is not W - s B0 A0 stops the batched run with
    an error naming it, instead of training configurations on the wrong base."""

    def shifts_w(layer):
        with torch.no_grad():
            layer.base.weight.add_(0.01)

    monkeypatch.setitem(INITS, "shift", Init("shift", shifts_w, "Shift (a test init)",
                                             batched=True))  # fmt: skip
    spec = AdapterSpec(LoRAConfig(rank=2, alpha=4.0, init="shift"))
    with pytest.raises(ValueError, match="init='shift' is registered as batched, but it changed W"):
        train_batched(lab.load_base_model("cpu"), lab.get_task("sort_desc_small"), [spec], 2, 8,
                      "cpu", progress=False)  # fmt: skip


def test_names_and_help_come_from_the_records(monkeypatch):
    _register(monkeypatch, None)
    assert display_name(VARIANTS["dora"]) == "DoRA" and display_name(INITS["pissa"]) == "PiSSA"
    assert display_name(VARIANTS["doubled"]) == "Doubled"  # the summary's first words
    assert flavour_label("lora", "default") == "LoRA"
    assert flavour_label("dora", "pissa") == "DoRA PiSSA"
    text = choices_help(VARIANTS)
    assert "dora: DoRA (Liu et al. 2024)" in text and "doubled: Doubled (a test flavour)" in text


def test_the_doctor_asks_the_init_whether_an_adapter_is_at_its_start():
    torch.manual_seed(0)
    for init in ("default", "pissa"):
        layer = LoRALinear(torch.nn.Linear(8, 6), config=LoRAConfig(rank=2, alpha=4.0, init=init))
        assert adapter_at_start(layer) is True
        with torch.no_grad():
            layer.lora_B.add_(0.1)
        assert adapter_at_start(layer) is False


def test_a_batched_form_that_names_a_tensor_its_layer_lacks_is_refused(monkeypatch):
    """A typo in `frozen` would otherwise train that flavour's A as plain LoRA's."""
    record = VARIANTS["lora-fa"]
    monkeypatch.setitem(VARIANTS, "lora-fa", dataclasses.replace(
        record, batched=BatchedForm(frozen=("lora_a",))))  # fmt: skip
    spec = AdapterSpec(LoRAConfig(rank=2, alpha=4.0, variant="lora-fa"))
    with pytest.raises(ValueError, match=r"its batched form names \['lora_a'\]"):
        train_batched(lab.load_base_model("cpu"), lab.get_task("sort_desc_small"), [spec], 2, 8,
                      "cpu", progress=False)  # fmt: skip


def test_the_cli_help_names_every_registered_flavour_and_its_source(capsys):
    from lab.__main__ import main

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for registry in (VARIANTS, INITS):
        for name, record in registry.items():
            assert f"{name}: {record.summary.partition(':')[0]}" in text, name
