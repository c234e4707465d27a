"""lab.engine.cache: the on-disk cache (one file per point), its folder, and grid files."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
from fakes import TINY, CountingTrainer, fake_result
from needs import run_unprivileged

from lab.engine.cache import SweepCache, SweepCacheError, default_cache_dir, load_grid_file
from lab.engine.points import FORMAT, SweepPoint, base_fingerprint, grid
from lab.engine.results import SweepResult
from lab.engine.summaries import dropout_series, select
from lab.sweeps import sweep


def _good(point) -> dict:
    return fake_result(point).to_dict()


def _other_point(p) -> dict:
    return fake_result(SweepPoint(**TINY, seed=3)).to_dict()


CRAFTED = {  # what is put at the point's cache file; each is retrained, nothing hangs
    "a FIFO": lambda path, p: os.mkfifo(path),
    "a link to /dev/zero": lambda path, p: path.symlink_to("/dev/zero"),
    "a link to /dev/urandom": lambda path, p: path.symlink_to("/dev/urandom"),
    "another point's result": lambda path, p: path.write_text(json.dumps(_other_point(p))),
    "a million losses": lambda path, p: path.write_text(
        json.dumps({**_good(p), "losses": [1.0] * 1_000_000})
    ),
    "negative seconds": lambda path, p: path.write_text(
        json.dumps({**_good(p), "wall_seconds": -5})
    ),
    "more trainable than total": lambda path, p: path.write_text(
        json.dumps({**_good(p), "trainable_parameters": 10**12})
    ),
    "memory junk": lambda path, p: path.write_text(
        json.dumps({**_good(p), "memory": {"parameters": "x"}})
    ),
    "NaN literal": lambda path, p: path.write_text(
        json.dumps(_good(p)).replace('"losses": [2.0', '"losses": [NaN')
    ),
    "Infinity literal": lambda path, p: path.write_text(
        json.dumps({**_good(p), "tokens_per_second": math.inf})
    ),
    "a 5,000-digit count": lambda path, p: path.write_text(
        json.dumps(_good(p)).replace(
            '"total_parameters": 415000', '"total_parameters": ' + "9" * 5000
        )
    ),
    "over 64 MiB": lambda path, p: path.write_bytes(b" " * ((64 << 20) + 1)),
    "a held-out count of -1": lambda path, p: path.write_text(
        json.dumps({**_good(p), "heldout": {"loss": 1.0, "accuracy": 0.5, "n": -1}})
    ),
    "a held-out count of 0.5": lambda path, p: path.write_text(
        json.dumps({**_good(p), "heldout": {"loss": 1.0, "accuracy": 0.5, "n": 0.5}})
    ),
    "a negative held-out loss": lambda path, p: path.write_text(
        json.dumps({**_good(p), "heldout": {"loss": -1.0, "accuracy": 0.5, "n": 64}})
    ),
}


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


def test_write_grid_file_round_trips_through_load_grid_file(tmp_path):
    from lab.sweeps import SweepPoint, load_grid_file, write_grid_file

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


@pytest.mark.parametrize("what", list(CRAFTED))
def test_a_crafted_cache_entry_is_retrained_with_a_warning(tmp_path, what):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    CRAFTED[what](cache.path(point), point)
    trainer = CountingTrainer()
    with pytest.warns(UserWarning, match=r"ignoring unreadable sweep cache file .*: \w"):
        results = sweep([point], cache, progress=False, run_fn=trainer)
    assert trainer.calls == [point] and results[0].point == point
    assert cache.path(point).is_file() and not cache.path(point).is_symlink()
    assert SweepCache(tmp_path).get(point) == results[0]  # replaced by the valid result


@pytest.mark.parametrize("what", ["a link loop", "a dangling link"])
def test_a_broken_link_as_an_entry_is_retrained_and_replaced(tmp_path, what):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    path = cache.path(point)
    path.symlink_to(path.name if what == "a link loop" else tmp_path / "gone.json")
    results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert cache.get(point) == results[0] and not path.is_symlink()


@pytest.mark.parametrize("what", ["a link loop", "a dangling link"])
def test_a_cache_folder_that_is_a_broken_link_is_refused(tmp_path, what):
    folder = tmp_path / "c"
    folder.symlink_to("c" if what == "a link loop" else tmp_path / "gone" / "x")
    with pytest.raises(SweepCacheError, match=r"is a symlink to .* does not exist or loops"):
        sweep([SweepPoint(**TINY)], SweepCache(folder), progress=False, run_fn=CountingTrainer())


@pytest.mark.parametrize("what", ["a FIFO", "/dev/zero", "a folder"])
def test_a_grid_file_that_is_not_a_file_is_a_clear_error(tmp_path, what):
    path = tmp_path / "grid.json"
    if what == "a FIFO":
        os.mkfifo(path)
    elif what == "a folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"grid\.json: cannot read the grid file \(is a"):
        load_grid_file(path)


def test_a_directory_named_like_an_entry_is_skipped(tmp_path):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    cache.path(point).mkdir()
    trainer = CountingTrainer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cache.results() == []
        with pytest.raises(OSError):  # the result cannot replace a directory: kept, reported
            cache.put(fake_result(point))
    with pytest.warns(UserWarning, match="could not save 1 result "):
        results = sweep([point], cache, progress=False, run_fn=trainer)
    assert trainer.calls == [point] and results[0].point == point


READ_AS_ANOTHER = """
import json, sys, warnings
from lab.engine.cache import SweepCache
from lab.engine.points import SweepPoint
point = SweepPoint(**json.loads(sys.argv[2]))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(SweepCache(sys.argv[1]).get(point) is None, [str(w.message) for w in caught])
"""


def test_an_unreadable_entry_is_retrained(open_tmp):
    # Read as an account without privileges: root reads a file of mode 0 whatever its mode.
    cache, point = SweepCache(open_tmp / "cache"), SweepPoint(**TINY)
    cache.put(fake_result(point))
    (open_tmp / "cache").chmod(0o755)
    os.chmod(cache.path(point), 0)
    run = run_unprivileged(READ_AS_ANOTHER, str(cache.directory), json.dumps(TINY), home=open_tmp)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True [") and "ignoring unreadable" in run.stdout, run.stdout


def test_a_corrupted_grid_file_is_a_clear_error(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text('{"format": "lora-lab-sweep/1", "results": [')
    with pytest.raises(ValueError) as info:
        load_grid_file(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)
    path.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_grid_file(path)
