"""lab.sweeps.sweep: never retraining, refusing bad settings before training, keeping results."""

from __future__ import annotations

import math

import pytest
from fakes import TINY, CountingTrainer, listing

from lab.sweeps import (
    SweepCache,
    SweepCacheError,
    SweepPoint,
    grid,
    sweep,
    trainable_counts,
)


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


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"max_configs": 0}, ValueError, ["max_configs=0", "positive"]),
        ({"max_configs": True}, TypeError, ["max_configs=True"]),
        ({"device": "banana"}, ValueError, ["device='banana'", "cpu"]),
        ({"device": 3.5}, TypeError, ["device=3.5"]),
        ({"device": "tpu"}, ValueError, ["device='tpu'", "cpu"]),
    ],
)
def test_bad_sweep_settings_train_nothing(tmp_path, kwargs, error, words):
    trainer = CountingTrainer()
    with pytest.raises(error) as info:
        sweep([SweepPoint(**TINY)], SweepCache(tmp_path / "c"), progress=False, run_fn=trainer,
              **kwargs)  # fmt: skip
    assert all(w in str(info.value) for w in words), str(info.value)
    assert trainer.calls == [] and not (tmp_path / "c").exists()


def test_points_that_are_not_points_are_refused(tmp_path):
    with pytest.raises(TypeError, match="SweepPoints"):
        sweep([1, 2], SweepCache(tmp_path), progress=False, run_fn=CountingTrainer())
    with pytest.raises(TypeError, match="SweepCache"):
        sweep([SweepPoint(**TINY)], str(tmp_path), progress=False, run_fn=CountingTrainer())
    assert listing(tmp_path) == []


def test_a_cache_that_is_a_file_is_refused_before_training(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    trainer = CountingTrainer()
    with pytest.raises(SweepCacheError) as info:
        sweep([SweepPoint(**TINY)], SweepCache(afile), progress=False, run_fn=trainer)
    assert "is a file" in str(info.value) and str(afile) in str(info.value)
    assert trainer.calls == [] and afile.read_text() == "keep me"


def test_a_cache_under_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    trainer = CountingTrainer()
    with pytest.raises(SweepCacheError, match="cannot create sweep cache"):
        sweep([SweepPoint(**TINY)], SweepCache(tmp_path / "afile" / "c"), progress=False,
              run_fn=trainer)  # fmt: skip
    assert trainer.calls == []


def test_a_missing_parent_is_created(tmp_path):
    cache = SweepCache(tmp_path / "a" / "b" / "c")
    sweep([SweepPoint(**TINY)], cache, progress=False, run_fn=CountingTrainer())
    assert len(cache) == 1 and [f for f in listing(cache.directory) if f.startswith(".")] == []


def test_results_whose_write_fails_after_training_are_returned_and_reported(tmp_path, monkeypatch):
    cache = SweepCache(tmp_path)
    points = [SweepPoint(**TINY), SweepPoint(**(TINY | {"rank": 2}))]

    def full_disk(result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "put", full_disk)
    with pytest.warns(UserWarning) as record:
        results = sweep(points, cache, progress=False, run_fn=CountingTrainer())
    text = " ".join(str(w.message) for w in record)
    assert "could not save 2 results" in text and str(tmp_path) in text and "No space" in text
    assert [r.point for r in results] == points and cache.unsaved == points
    assert [f for f in listing(tmp_path) if not f.startswith(".")] == []  # no locks left
