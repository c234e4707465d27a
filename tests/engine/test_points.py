"""lab.engine.points: sweep points (a LoRAConfig and training settings), keys, grids, labels."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from fakes import TINY, listing

import lab
import lab.sweeps
from lab.config import LoRAConfig
from lab.engine.batched import AdapterSpec
from lab.engine.points import FULL_LR, LORA_LR, SweepPoint, describe, full_point, grid

SAME = [  # each pair compares equal, so it must be one cache file
    ({"dropout": -0.0}, {"dropout": 0.0}),
    ({"replay": -0.0}, {}),
    ({"alpha": 16}, {"alpha": 16.0}),
    ({"lr": 1}, {"lr": 1.0}),
    ({"lr_ratio": 1}, {}),
    ({"lr_ratio": 16}, {"lr_ratio": 16.0}),
    ({"rank": np.int64(4)}, {"rank": 4}),
    ({"rank": np.int32(4), "steps": np.int64(600)}, {"rank": 4}),
    ({"batch_size": np.int16(64), "seed": np.uint64(0)}, {}),
    ({"alpha": np.float32(16.0), "dropout": np.float64(0.1)}, {"dropout": 0.1}),
    ({"replay": np.float64(0.05)}, {"replay": 0.05}),
    ({"targets": ("v_proj", "q_proj", "q_proj")}, {}),
    ({"targets": ("v", "q_proj")}, {}),
    ({"targets": "all-linear"}, {"targets": ("up", "down", "o", "v", "k", "q")}),
    ({"lr": None}, {"lr": LORA_LR}),
]


def make_spec(targets, rank, alpha, dropout=0.0, rslora=False, lr=2e-2, seed=0) -> AdapterSpec:
    """An AdapterSpec from the adapter's numbers (its LoRAConfig) and the optimizer's."""
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    return AdapterSpec(config, lr, seed)


def test_point_normalises_targets_numbers_and_learning_rate():
    a = SweepPoint("sort_desc", 8, alpha=16, targets=("v_proj", "q_proj"))
    b = SweepPoint("sort_desc", 8, alpha=16.0, targets=["q_proj", "v_proj"])
    assert a == b and a.key == b.key
    assert a.targets == ("q_proj", "v_proj") and a.lr == LORA_LR
    assert full_point("sort_desc").lr == FULL_LR


def test_full_fine_tuning_ignores_adapter_settings():
    assert SweepPoint("rotate", None, alpha=3, dropout=0.5) == full_point("rotate")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "copy"}, "task='copy'"),
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"alpha": -1}, "alpha must be a finite number > 0, got -1"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"targets": ("q", "x")}, "targets="),
        ({"steps": 0}, "steps=0"),
    ],
)
def test_bad_points_are_refused_with_the_value(kwargs, message):
    args = {"task": "sort_desc", "rank": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        SweepPoint(**args)


def test_keys_are_stable_and_distinct_across_every_field():
    base = SweepPoint("sort_desc", 8)
    variants = [
        SweepPoint("rotate", 8),
        SweepPoint("sort_desc", 4),
        SweepPoint("sort_desc", 8, alpha=8),
        SweepPoint("sort_desc", 8, dropout=0.1),
        SweepPoint("sort_desc", 8, targets=("q_proj",)),
        SweepPoint("sort_desc", 8, rslora=True),
        SweepPoint("sort_desc", 8, steps=601),
        SweepPoint("sort_desc", 8, lr=1e-3),
        SweepPoint("sort_desc", 8, batch_size=32),
        SweepPoint("sort_desc", 8, seed=1),
        full_point("sort_desc"),
    ]
    keys = {p.key for p in [base, *variants]}
    assert len(keys) == len(variants) + 1
    assert base.key == SweepPoint("sort_desc", 8).key  # same settings, same key


@pytest.mark.parametrize("one, other", SAME)
def test_points_that_compare_equal_share_one_key(one, other):
    a, b = (
        SweepPoint("sort_desc", **{"rank": 4, **one}),
        SweepPoint("sort_desc", **{"rank": 4, **other}),
    )
    assert a == b and hash(a) == hash(b)
    assert a.key == b.key and a.to_dict() == b.to_dict()
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()  # plain JSON types only


def test_points_equal_exactly_when_their_keys_are():
    values = {
        "rank": [1, 2], "alpha": [8, 16.0], "dropout": [0.0, -0.0, 0.1], "rslora": [False, True],
        "targets": [("q_proj", "v_proj"), ("v", "q"), ("q",)], "lr": [None, 0.02, 1e-3],
        "variant": ["lora", "dora"], "init": ["default", "pissa"], "lr_ratio": [1, 16],
        "replay": [0.0, 0.05], "steps": [600, 601], "seed": [0, 1], "batch_size": [64, 32],
    }  # fmt: skip
    points = [
        full_point("sort_desc"),
        full_point("sort_desc", replay=0.05),
        full_point("sort_desc", lr=FULL_LR),
        SweepPoint("rotate", 4),
        SweepPoint("sort_desc", 4, quant="nf4"),
        SweepPoint("sort_desc", 4, quant="int4"),
    ]
    points += [SweepPoint("sort_desc", **{"rank": 4, k: v}) for k, vs in values.items()
               for v in vs]  # fmt: skip
    for a in points:
        for b in points:
            assert (a == b) == (a.key == b.key), (a, b)
    assert len({p.key for p in points}) == len(set(points)) == 20


def test_grid_is_the_cartesian_product_without_duplicates():
    points = grid("sort_desc", [1, 2, 2], [8, 16], [0.0, 0.1], steps=50)
    assert len(points) == 2 * 2 * 2
    assert {(p.rank, p.alpha, p.dropout) for p in points} == {
        (r, a, d) for r in (1, 2) for a in (8.0, 16.0) for d in (0.0, 0.1)
    }
    assert all(p.steps == 50 and p.targets == ("q_proj", "v_proj") for p in points)


def test_describe_labels_points_briefly():
    assert describe(SweepPoint("sort_desc", 8, dropout=0.1)) == "r8 α16 p0.1"
    assert describe(SweepPoint("sort_desc", 4, targets=("q_proj",), rslora=True)) == (
        "r4 α16 q rsLoRA"
    )
    assert describe(full_point("sort_desc")) == "full fine-tuning"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"rslora": "False"}, TypeError, ["rslora", "'False'", "True or False"]),
        ({"rslora": 1}, TypeError, ["rslora=1"]),
        ({"alpha": True}, TypeError, ["alpha", "True"]),
        ({"alpha": "16"}, TypeError, ["alpha", "'16'"]),
        ({"alpha": math.inf}, ValueError, ["alpha", "finite"]),
        ({"lr": True}, TypeError, ["lr=True"]),
        ({"lr": "0.02"}, TypeError, ["lr='0.02'"]),
        ({"lr": math.nan}, ValueError, ["lr=nan", "finite"]),
        ({"rank": "8"}, TypeError, ["rank", "'8'"]),
        ({"rank": True}, TypeError, ["rank", "True"]),
        ({"rank": 2.0}, TypeError, ["rank", "2.0"]),
        ({"dropout": math.nan}, ValueError, ["dropout", "nan"]),
        ({"dropout": "0.1"}, TypeError, ["dropout", "'0.1'"]),
        ({"steps": "600"}, TypeError, ["steps='600'", "int"]),
        ({"steps": 10**12}, ValueError, ["steps=1,000,000,000,000", "limit"]),
        ({"steps": True}, TypeError, ["steps=True"]),
        ({"batch_size": 0}, ValueError, ["batch_size=0", "positive"]),
        ({"batch_size": 64.0}, TypeError, ["batch_size=64.0"]),
        ({"seed": -1}, ValueError, ["seed=-1", "2**63"]),
        ({"seed": 2**63}, ValueError, ["seed=", "2**63"]),
        ({"seed": 1.5}, TypeError, ["seed=1.5"]),
        ({"seed": "0"}, TypeError, ["seed='0'"]),
        ({"seed": None}, TypeError, ["seed=None"]),
        ({"targets": ("x_proj",)}, ValueError, ["x_proj", "q_proj", "down"]),
        ({"targets": ()}, ValueError, ["targets=()", "q_proj"]),
        ({"targets": [1]}, TypeError, ["targets", "str", "1"]),
        ({"targets": None}, TypeError, ["targets=None"]),
        ({"task": ["sort_desc"]}, ValueError, ["task=['sort_desc']", "rotate"]),
        ({"task": "copy"}, ValueError, ["task='copy'", "sort_desc"]),
    ],
)
def test_bad_point_fields_are_refused(kwargs, error, words):
    before = listing(os.environ["LORA_LAB_CACHE"])
    with pytest.raises(error) as info:
        SweepPoint(**(TINY | kwargs))
    assert all(w in str(info.value) for w in words), str(info.value)
    assert listing(os.environ["LORA_LAB_CACHE"]) == before


def test_full_fine_tuning_refuses_a_string_rslora_and_a_bad_seed_too():
    with pytest.raises(TypeError, match="rslora"):
        SweepPoint("rotate", None, rslora="False")
    with pytest.raises(ValueError, match="seed=-3"):
        SweepPoint("rotate", None, seed=-3)


def test_a_bare_string_target_is_one_name_and_short_names_map_to_layers():
    assert SweepPoint(**TINY, targets="q_proj").targets == ("q_proj",)
    assert SweepPoint(**TINY, targets="q").targets == ("q_proj",)
    assert SweepPoint(**TINY, targets=("v", "q")).key == SweepPoint(**TINY).key
    assert grid("rotate", [2], targets="down")[0].targets == ("down_proj",)
    assert make_spec("q_proj", 4, 8.0).targets == ("q_proj",)


@pytest.mark.parametrize(
    "data, error, words",
    [
        ({**SweepPoint(**TINY).to_dict(), "targets": "q_proj"}, TypeError, ["targets", "list"]),
        ({**SweepPoint(**TINY).to_dict(), "alpha": "16"}, TypeError, ["alpha", "'16'"]),
        ({**SweepPoint(**TINY).to_dict(), "steps": "30"}, TypeError, ["steps='30'"]),
        ({**SweepPoint(**TINY).to_dict(), "rslora": "false"}, TypeError, ["rslora"]),
        (["sort_desc_small", 4], TypeError, ["dict"]),
    ],
)
def test_numbers_as_strings_from_json_are_not_accepted(data, error, words):
    with pytest.raises(error) as info:
        SweepPoint.from_dict(data)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"ranks": 8}, TypeError, ["ranks=8", "list"]),
        ({"ranks": []}, ValueError, ["ranks is empty", "no points"]),
        ({"ranks": [0]}, ValueError, ["rank", "0"]),
        ({"ranks": [4], "alphas": []}, ValueError, ["alphas is empty"]),
        ({"ranks": [4], "dropouts": 0.1}, TypeError, ["dropouts=0.1"]),
        ({"ranks": [4], "seed": -1}, ValueError, ["seed=-1"]),
        ({"ranks": [4], "targets": "qv"}, ValueError, ["'qv'", "q_proj"]),
    ],
)
def test_bad_grids_are_refused(kwargs, error, words):
    with pytest.raises(error) as info:
        grid("sort_desc_small", **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "example"),
    [
        ("ranks", "48", "ranks=[4, 8]"),
        ("alphas", 16, "alphas=[16.0]"),
        ("dropouts", 0.1, "[0.0, 0.1]"),
    ],
)
def test_grid_refuses_a_bare_value_with_an_example_of_numbers(field, value, example):
    with pytest.raises(TypeError, match="expected a list of numbers") as info:
        lab.grid("sort_desc_small", **{"ranks": [4], field: value})
    assert example in str(info.value)


# -- one vocabulary: a point holds its LoRAConfig ----------------------------------------------


def test_a_point_holds_a_lora_config_instead_of_copying_its_fields():
    import dataclasses

    point = SweepPoint("rotate", 4, 8.0, 0.1, ("v", "q"), True, variant="dora", lr_ratio=16)
    names = [f.name for f in dataclasses.fields(SweepPoint)]
    assert isinstance(point.lora, LoRAConfig) and "lora" in names
    assert not set(names) & {f.name for f in dataclasses.fields(LoRAConfig)}
    assert point.lora == LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj"),
                                    rslora=True, variant="dora", lr_ratio=16.0)  # fmt: skip
    assert (point.rank, point.alpha, point.targets, point.variant) == (
        4,
        8.0,
        ("q_proj", "v_proj"),
        "dora",
    )
    # Built from a config, or by keyword, it is the same point (and the same cache file).
    same = SweepPoint("rotate", lora=point.lora)
    assert same == point and hash(same) == hash(point) and same.key == point.key
    eight = SweepPoint("rotate", 8, 8.0, 0.1, ("q", "v"), True, variant="dora", lr_ratio=16)
    assert dataclasses.replace(point, rank=8) == eight
    assert dataclasses.replace(point, rank=None) == full_point("rotate", lr=point.lr)
    assert SweepPoint.from_dict(point.to_dict()) == point
    # repr and to_dict read as they always did: flat, in the constructor's order
    assert repr(SweepPoint("rotate", 4)) == (
        "SweepPoint(task='rotate', rank=4, alpha=16.0, dropout=0.0, targets=('q_proj', 'v_proj'), "
        "rslora=False, steps=600, lr=0.02, batch_size=64, seed=0, variant='lora', init='default', "
        "lr_ratio=1.0, quant=None, replay=0.0)"
    )
    assert list(SweepPoint("rotate", 4).to_dict()) == [
        "task", "rank", "alpha", "dropout", "targets", "rslora", "steps", "lr", "batch_size", "seed"
    ]  # fmt: skip
    full = full_point("rotate")
    assert full.lora is None and (full.rank, full.alpha, full.targets) == (None, 0.0, ())
    with pytest.raises(TypeError, match="needs a rank"):
        SweepPoint("rotate")
    with pytest.raises(TypeError, match="lab.LoRAConfig"):
        SweepPoint("rotate", lora={"rank": 4})


def test_the_shipped_grids_points_keep_their_keys_and_json():
    from pathlib import Path

    folder = Path(lab.sweeps.__file__).parent / "data"
    n = 0
    for path in sorted(folder.glob("*_grid.json")):
        for row in json.loads(path.read_text())["results"]:
            point = SweepPoint.from_dict(row["point"])
            assert point.key == row["key"], f"{path.name}: {describe(point)}"
            assert json.dumps(point.to_dict()) == json.dumps(row["point"])
            n += 1
    assert n >= 100  # the four shipped grids hold 133 points


def test_a_point_carries_every_field_of_its_config():
    # A field added to LoRAConfig (a flavour's own setting) must join the point's settings, its
    # JSON and its key (left out at its default, as variant and init are): else two points
    # that train differently would share one cache file.
    import dataclasses

    from lab.engine.points import ADAPTER_FIELDS, POINT_FIELDS

    config_fields = tuple(f.name for f in dataclasses.fields(LoRAConfig))
    assert config_fields == ADAPTER_FIELDS and set(config_fields) <= set(POINT_FIELDS)


REWRITES_W = [name for name, record in lab.config.INITS.items() if record.changes_base]


def test_pissa_and_milora_are_the_inits_that_rewrite_w():
    assert {"pissa", "milora"} <= set(REWRITES_W)


@pytest.mark.parametrize("init", REWRITES_W)
def test_an_init_that_rewrites_w_is_refused_on_a_4bit_base_by_name(init):
    """PiSSA and MiLoRA start from W's own singular directions: a 4-bit W cannot give them."""
    with pytest.raises(ValueError, match=rf"init='{init}' with quant='nf4'.*full-precision W"):
        SweepPoint("sort_desc", 4, init=init, quant="nf4")
