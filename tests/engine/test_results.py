"""lab.engine.results: a result's JSON, and what is refused as a result (from a trainer or disk)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from fakes import TINY, CountingTrainer, fake_result, listing

from lab.engine.cache import SweepCache
from lab.engine.points import SweepPoint, describe
from lab.sweeps import SweepFailed, sweep


def _with(result, **changes):
    return dataclasses.replace(result, **changes)


BAD_TRAINERS = {  # what a run_fn returns for `point`, given `other` (another point in the sweep)
    "None": lambda point, other: None,
    "a dict": lambda point, other: fake_result(point).to_dict(),
    "a string": lambda point, other: "done",
    "another point's result": lambda point, other: fake_result(other),
    "a result for an unlisted point": lambda point, other: fake_result(SweepPoint(**TINY, seed=9)),
    "NaN losses": lambda point, other: _with(fake_result(point), losses=[1.0, math.nan]),
    "accuracy 7": lambda point, other: _with(
        fake_result(point), heldout={"loss": 1.0, "accuracy": 7.0, "n": 1}
    ),
    "a tensor in extra": lambda point, other: _with(fake_result(point), extra={"w": torch.ones(2)}),
    "a point as a dict": lambda point, other: _with(fake_result(point), point=point.to_dict()),
    "negative count": lambda point, other: _with(fake_result(point), trainable_parameters=-1),
}


def _good(point) -> dict:
    return fake_result(point).to_dict()


JUNK = {
    "null heldout": lambda p: {**_good(p), "heldout": None},
    "null loss": lambda p: {**_good(p), "heldout": {"loss": None, "accuracy": 0.5}},
    "string accuracy": lambda p: {**_good(p), "heldout": {"loss": 1.0, "accuracy": "0.5"}},
    "nan loss": lambda p: {**_good(p), "heldout": {"loss": math.nan, "accuracy": 0.5}},
    "accuracy 7": lambda p: {**_good(p), "heldout": {"loss": 1.0, "accuracy": 7}},
    "missing heldout": lambda p: {k: v for k, v in _good(p).items() if k != "heldout"},
    "missing point": lambda p: {k: v for k, v in _good(p).items() if k != "point"},
    "losses with null": lambda p: {**_good(p), "losses": [1.0, None]},
    "losses a string": lambda p: {**_good(p), "losses": "1,2"},
    "string count": lambda p: {**_good(p), "trainable_parameters": "1024"},
    "string diverged": lambda p: {**_good(p), "diverged": "no"},
    "point fields strings": lambda p: {**_good(p), "point": {**p.to_dict(), "rank": "4"}},
}


@pytest.mark.parametrize("what", list(BAD_TRAINERS))
def test_a_trainer_returning_a_wrong_result_fails_its_point_only(tmp_path, what):
    cache = SweepCache(tmp_path)
    point, other, third = (SweepPoint(**(TINY | {"rank": r})) for r in (4, 2, 1))

    def trainer(p, device=None, progress=True):
        return BAD_TRAINERS[what](p, other) if p == point else fake_result(p)

    with pytest.raises(SweepFailed) as info:
        sweep([other, point, third], cache, progress=False, run_fn=trainer)
    assert list(info.value.failures) == [point]
    message = str(info.value)
    assert describe(point) in message and "2 of 3 trained and kept" in message, message
    assert "the trainer returned" in info.value.failures[point]
    assert [r and r.point for r in info.value.results] == [other, None, third]
    # The others are cached as themselves; nothing is cached for the refused point.
    assert cache.get(point) is None and cache.get(other).point == other
    assert sorted(listing(tmp_path)) == sorted(f"{p.key}.json" for p in (other, third))
    again = CountingTrainer()
    sweep([other, point, third], cache, progress=False, run_fn=again)  # the rerun trains it
    assert again.calls == [point]


@pytest.mark.parametrize("what", sorted(JUNK))
def test_a_malformed_entry_is_retrained_with_a_warning(tmp_path, what):
    cache, point, other = SweepCache(tmp_path), SweepPoint(**TINY), SweepPoint(**TINY, seed=1)
    cache.put(fake_result(other, accuracy=0.25))
    cache.path(point).write_text(json.dumps(JUNK[what](point)))
    trainer = CountingTrainer()
    with pytest.warns(UserWarning, match="ignoring unreadable sweep cache file"):
        results = sweep([point, other], cache, progress=False, run_fn=trainer)
    assert trainer.calls == [point]  # the bad entry is retrained, the good one is kept
    assert results[1].heldout["accuracy"] == 0.25 and cache.get(point) is not None


@pytest.mark.parametrize(
    "content",
    [
        '{"heldout": {"loss": ',  # truncated
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json
        "[1, 2, 3]",
        "not json at all",
        b"\xff\xfe\x00bad",
    ],
    ids=["truncated", "deep", "a list", "text", "binary"],
)
def test_junk_json_files_never_break_the_other_entries(tmp_path, content):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    cache.put(fake_result(point))
    junk = tmp_path / "junk.json"
    junk.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(UserWarning, match="junk.json"):
        found = cache.results()
    assert [r.point for r in found] == [point] and junk.exists()
