"""lab/sweep.py: points and keys, the on-disk cache, never retraining, and the summaries."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest

from lab.sweeps import (
    FORMAT,
    FULL_LR,
    LORA_LR,
    SweepCache,
    SweepPoint,
    SweepResult,
    accuracy_table,
    base_fingerprint,
    by_rank,
    default_cache_dir,
    describe,
    dropout_series,
    full_point,
    grid,
    load_grid_file,
    select,
    sweep,
    trainable_counts,
)


def fake_result(point: SweepPoint, accuracy: float = 0.5, train_loss: float | None = None):
    """A SweepResult with made-up numbers (no training)."""
    return SweepResult(
        point=point,
        losses=[2.0, 1.0, 0.5],
        heldout={"loss": 1.0 - accuracy / 2, "accuracy": accuracy, "n": 512},
        train_eval=None if train_loss is None else {"loss": train_loss, "accuracy": 0.9, "n": 256},
        trainable_parameters=(point.rank or 100) * 512,
        total_parameters=415_000,
        memory={"parameters": 10, "gradients": 2, "optimizer": 4, "activations": 30},
        wall_seconds=1.0,
        tokens_per_second=1000.0,
        device="cpu",
        date="2026-01-01T00:00:00+00:00",
    )


class CountingTrainer:
    """A fake run_fn that records which points it was asked to train."""

    def __init__(self) -> None:
        self.calls: list[SweepPoint] = []

    def __call__(self, point, device=None, progress=True):
        self.calls.append(point)
        return fake_result(point, accuracy=(point.rank or 128) / 128)


# -- points and keys ---------------------------------------------------------------------------


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


# -- the cache ---------------------------------------------------------------------------------


def test_cache_round_trip_survives_a_new_instance(tmp_path):
    point = SweepPoint("sort_desc", 4, alpha=8)
    result = fake_result(point, accuracy=0.25, train_loss=0.3)
    cache = SweepCache(tmp_path)
    assert point not in cache and cache.get(point) is None
    cache.put(result)
    assert point in cache
    reopened = SweepCache(tmp_path)  # what a kernel restart sees
    assert reopened.get(point) == result
    assert len(reopened) == 1 and reopened.results(rank=4) == [result]
    assert reopened.results(rank=8) == []


def test_cache_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    cache = SweepCache(tmp_path / "nested" / "dir")
    points = grid("rotate", [1, 2, 4])
    for p in points:
        cache.put(fake_result(p))
    names = sorted(f.name for f in cache.directory.iterdir())
    assert names == sorted(f"{p.key}.json" for p in points)


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "c"))
    assert SweepCache().directory == tmp_path / "c"
    monkeypatch.delenv("LORA_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name != "nt":
        assert default_cache_dir() == tmp_path / "xdg" / "lora-lab" / "sweeps"


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_a_blank_cache_variable_means_the_default_and_a_blank_folder_is_refused(
    monkeypatch, tmp_path, blank
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LORA_LAB_CACHE", blank)
    assert SweepCache().directory == tmp_path / "xdg" / "lora-lab" / "sweeps"
    with pytest.raises(ValueError, match=r"cache folder .* is empty; name a folder, or give None"):
        SweepCache(blank)
    with pytest.raises(TypeError, match=r"cache folder b'x': expected a path"):
        SweepCache(b"x")
    with pytest.raises(ValueError, match="NUL"):
        SweepCache("a\0b")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        '{"format": "other"}',
        json.dumps({"format": FORMAT, "point": {"task": "rotate"}}),
    ],
)
def test_corrupt_cache_file_is_ignored_with_a_warning(tmp_path, content):
    cache = SweepCache(tmp_path)
    good, bad = SweepPoint("rotate", 1), SweepPoint("rotate", 2)
    cache.put(fake_result(good))
    cache.path(bad).write_text(content)
    with pytest.warns(UserWarning, match="ignoring unreadable sweep cache file"):
        assert cache.get(bad) is None
    assert bad not in cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r.point for r in cache.results()] == [good]


def test_a_file_for_another_key_is_skipped_quietly(tmp_path):
    cache = SweepCache(tmp_path)
    # Written under its own key by another format version or base model: stale, not corrupt.
    data = {**fake_result(SweepPoint("rotate", 1)).to_dict(), "key": "0000stale"}
    (tmp_path / "0000stale.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.results() == []
    # Copied or renamed from another point's file: said, and never used as this point's.
    point = SweepPoint("rotate", 2)
    cache.path(point).write_text(json.dumps(fake_result(SweepPoint("rotate", 1)).to_dict()))
    with pytest.warns(UserWarning, match=r"it holds the result of r1 α16"):
        assert cache.get(point) is None


# -- sweeping ----------------------------------------------------------------------------------


def test_sweep_trains_only_points_not_cached(tmp_path):
    cache, trainer = SweepCache(tmp_path), CountingTrainer()
    points = grid("sort_desc", [1, 2], [8, 16])
    first = sweep(points[:2], cache, progress=False, run_fn=trainer)
    assert trainer.calls == points[:2]
    again = sweep(points, SweepCache(tmp_path), progress=False, run_fn=trainer)
    assert trainer.calls == points  # the first two were read from disk, not retrained
    assert again[:2] == first and [r.point for r in again] == points


def test_sweep_reports_each_new_result(tmp_path):
    seen = []
    sweep(
        grid("rotate", [1, 2]), SweepCache(tmp_path), progress=False,
        run_fn=CountingTrainer(), on_result=seen.append,
    )  # fmt: skip
    assert [r.point.rank for r in seen] == [1, 2]


def test_real_tiny_sweep_trains_measures_and_caches(tmp_path):
    # The one real training in the tests: a few steps on the shipped base (small-data task, so
    # the train split is evaluated too).
    point = SweepPoint("sort_desc_small", 2, steps=3, batch_size=8)
    (result,) = sweep([point], SweepCache(tmp_path), progress=False, device="cpu")
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert 0 <= result.heldout["accuracy"] <= 1 and result.heldout["n"] == 512
    assert result.train_eval["n"] == 256
    counts, full = trainable_counts([2])
    assert result.trainable_parameters == counts[0] and result.total_parameters > full
    assert result.memory["gradients"] == 4 * counts[0]  # fp32 gradients of A and B only
    assert result.device == "cpu" and result.wall_seconds > 0
    assert SweepCache(tmp_path).get(point) == result


def test_seed_from_loads_a_grid_file_without_overwriting(tmp_path):
    points = grid("sort_desc", [1, 2])
    bundle = {
        "format": FORMAT,
        "base": base_fingerprint(),
        "results": [fake_result(p, accuracy=0.1).to_dict() for p in points],
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(bundle))
    cache = SweepCache(tmp_path / "cache")
    mine = fake_result(points[0], accuracy=0.9)
    cache.put(mine)
    assert cache.seed_from(path) == 1
    assert cache.get(points[0]) == mine and cache.get(points[1]).heldout["accuracy"] == 0.1
    assert cache.seed_from(path) == 0


def test_seed_from_skips_a_grid_of_another_base_model(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"format": FORMAT, "base": "other", "results": []}))
    with pytest.warns(UserWarning, match="another base model"):
        assert SweepCache(tmp_path / "cache").seed_from(path) == 0


def test_shipped_default_grid_loads_and_covers_the_lesson():
    results = load_grid_file()
    ranks = {r.point.rank for r in select(results, task="sort_desc", alpha=16.0)}
    assert ranks == {1, 2, 4, 8, 16, 32, 64}
    assert select(results, task="sort_desc", rank=None)
    dropouts, train, heldout = dropout_series(select(results, task="sort_desc_small"))
    assert dropouts == [0.0, 0.1, 0.3, 0.5] and len(train) == len(heldout) == 4


# -- summaries ---------------------------------------------------------------------------------


def test_accuracy_table_has_rows_per_rank_and_nan_where_missing():
    results = [
        fake_result(SweepPoint("sort_desc", r, alpha=a), r / 10) for r, a in [(1, 8), (4, 16)]
    ]
    table = accuracy_table(results, [1, 2, 4], [8, 16])
    assert table[0][0] == 0.1 and table[2][1] == 0.4
    assert all(math.isnan(table[i][j]) for i, j in [(0, 1), (1, 0), (1, 1), (2, 0)])


def test_by_rank_sorts_lora_results_and_skips_full():
    points = [SweepPoint("sort_desc", r) for r in (16, 1, 4)] + [full_point("sort_desc")]
    assert list(by_rank(fake_result(p) for p in points)) == [1, 4, 16]


def test_dropout_series_sorts_by_dropout_and_needs_a_train_eval():
    results = [
        fake_result(SweepPoint("sort_desc_small", 8, dropout=0.5), train_loss=0.6),
        fake_result(SweepPoint("sort_desc_small", 8, dropout=0.0), train_loss=0.1),
        fake_result(SweepPoint("sort_desc", 8, dropout=0.2)),  # no train eval: left out
    ]
    dropouts, train, heldout = dropout_series(results)
    assert dropouts == [0.0, 0.5] and train == [0.1, 0.6] and len(heldout) == 2


def test_select_filters_by_fields_and_refuses_unknown_ones():
    results = [fake_result(p) for p in grid("sort_desc", [1, 2], [8, 16])]
    assert len(select(results, rank=2)) == 2
    assert len(select(results, rank=2, alpha=8.0, targets=("v_proj", "q_proj"))) == 1
    with pytest.raises(ValueError, match="unknown SweepPoint fields"):
        select(results, colour="red")


def test_trainable_counts_are_exact():
    counts, full = trainable_counts([1, 8], ("q_proj", "v_proj"))
    layers, d, f, vocab, seq = 2, 128, 512, 64, 32  # the shipped base's shapes
    assert counts == [r * layers * 2 * (d + d) for r in (1, 8)]
    # embeddings (the head is tied), per layer q/k/v/o, up/down and two LayerNorms, final norm
    assert full == vocab * d + seq * d + layers * (4 * d * d + 2 * d * f + 4 * d) + 2 * d


def test_write_grid_file_round_trips_through_load_grid_file(tmp_path):
    from lab.sweeps import SweepPoint, SweepResult, load_grid_file, write_grid_file

    results = [
        SweepResult(
            point=SweepPoint("sort_desc", rank, steps=3, variant=variant),
            losses=[2.123456, 1.0987654],
            heldout={"loss": 0.5, "accuracy": 0.25, "n": 8},
            train_eval=None,
            trainable_parameters=1_000,
            total_parameters=400_000,
            memory=None,
            wall_seconds=0.25,
            tokens_per_second=1.0,
            device="cpu",
            date=f"2026-01-0{rank}",
        )  # fmt: skip
        for rank, variant in ((1, "lora"), (4, "dora"))
    ]
    path = write_grid_file(tmp_path / "sub" / "grid.json", results, "a test grid", steps=3)
    header = json.loads(path.read_text())
    assert header["description"] == "a test grid" and header["steps"] == 3
    assert header["date"] == "2026-01-04" and header["train_seconds"] == 0.5
    lines = path.read_text().splitlines()
    assert sum(line.startswith('{"format":') for line in lines) == 2  # one line per result
    loaded = load_grid_file(path)
    assert [r.point for r in loaded] == [r.point for r in results]
    assert loaded[0].losses == [2.12, 1.1]  # rounded to 3 significant digits
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="no results"):
        write_grid_file(tmp_path / "empty.json", [], "nothing")
    assert not (tmp_path / "empty.json").exists()
