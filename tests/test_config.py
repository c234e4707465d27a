"""Tests for lab/config.py: LoRAConfig and the hyperparameter rules every entry point shares."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from core_kit import assert_unchanged, same, snapshot, tensors_of, tiny_model
from torch import nn

from lab.config import LoRAConfig, check_hparams
from lab.lora import LoRALinear
from lab.surgery import (
    add_lora,
)

# The hyperparameter rule (lab.config.check_hparams), one table: every case is refused with the
# same type and message by the config and by each entry point that builds one, which change
# nothing. Around rank=2, alpha=4 (scaling 2, so a misplaced scaling would show).
BAD_HPARAMS = [
    ({"rank": 0}, ValueError, r"rank must be an int >= 1, got 0"),
    ({"rank": -1}, ValueError, r"rank must be an int >= 1, got -1"),
    ({"rank": 2.0}, TypeError, r"rank must be an int >= 1, got 2\.0 \(float\)"),
    ({"rank": True}, TypeError, r"rank must be an int >= 1, got True \(bool\)"),
    ({"alpha": 0}, ValueError, r"alpha must be a finite number > 0, got 0"),
    ({"alpha": -1}, ValueError, r"alpha must be a finite number > 0, got -1"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be a finite number > 0, got nan"),
    ({"alpha": float("inf")}, ValueError, r"alpha must be a finite number > 0, got inf"),
    ({"alpha": "16"}, TypeError, r"alpha must be a real number > 0, got '16' \(str\)"),
    ({"alpha": True}, TypeError, r"alpha must be a real number > 0, got True \(bool\)"),
    ({"alpha": 1e300}, ValueError, r"alpha=1e\+300 with rank=2 gives scaling alpha/rank"),
    ({"alpha": 1e5, "rank": 2}, ValueError, r"scaling alpha/rank = 5e\+04, outside the bound"),
    ({"alpha": 1e9, "rank": 4, "rslora": True}, ValueError, r"scaling alpha/sqrt\(rank\)"),
    ({"dropout": -0.1}, ValueError, r"dropout must be a number in \[0, 1\), got -0\.1"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a number in \[0, 1\), got 1\.0"),
    ({"dropout": float("nan")}, ValueError, r"dropout must be a number in \[0, 1\), got nan"),
    ({"dropout": True}, TypeError, r"dropout must be a number in \[0, 1\), got True"),
    ({"rslora": 1}, TypeError, r"rslora must be True or False, got 1 \(int\)"),
    ({"rslora": 0}, TypeError, r"rslora must be True or False, got 0 \(int\)"),
    ({"rslora": "False"}, TypeError, r"rslora must be True or False, got 'False' \(str\)"),
]


def _config(kwargs: dict) -> None:
    LoRAConfig(**kwargs)


def _add_lora_on_the_toy(kwargs: dict) -> None:
    model = tiny_model()
    before = snapshot(model)
    try:
        add_lora(model, **kwargs)
    finally:
        assert_unchanged(model, before)


def _add_lora_by_position(kwargs: dict) -> None:
    # targets given positionally, the other settings as keywords (add_lora's older form)
    model = nn.Sequential(nn.Linear(8, 8))
    before = tensors_of(model)
    try:
        add_lora(model, "0", **{"dropout": 0.0, "rslora": False, **kwargs})
    finally:
        assert same(model, before) and isinstance(model[0], nn.Linear)


def _lora_linear(kwargs: dict) -> None:
    base = nn.Linear(32, 40)
    before = base.weight.detach().clone()
    try:
        LoRALinear(base, **kwargs)
    finally:
        assert base.weight.requires_grad and torch.equal(base.weight, before)


@pytest.mark.parametrize(
    "build", [_config, _add_lora_on_the_toy, _add_lora_by_position, _lora_linear]
)
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_HPARAMS)
def test_bad_hyperparameters_are_refused_everywhere_and_change_nothing(build, kwargs, error, match):
    with pytest.raises(error, match=match):
        build({"rank": 2, "alpha": 4, **kwargs})


def test_numpy_scalars_still_work():
    model = nn.Sequential(nn.Linear(8, 8))
    add_lora(model, "0", rank=np.int64(2), alpha=np.float64(16), dropout=np.float32(0.0))
    assert model[0].rank == 2 and model[0].scaling == 8.0
    check_hparams(2, np.float64(16), 0.0, np.bool_(True))


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
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        LoRAConfig(**kwargs)
    assert len(str(info.value)) < 400


def test_config_negative_zero_dropout_is_zero():
    config = LoRAConfig(dropout=-0.0)
    assert math.copysign(1, config.dropout) == 1 and config.to_dict()["dropout"] == 0.0
    assert json.dumps(config.to_dict()) == json.dumps(LoRAConfig(dropout=0.0).to_dict())
