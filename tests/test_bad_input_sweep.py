"""Bad input and faults for sweeps, their cache and training: refused clearly, nothing lost.

Each case asserts the exception (or warning), key words of its message, and that nothing
changed: no file written, no point trained, no tensor touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import time
import warnings

import pytest
import torch

import lab
import lab.sweeps
from lab.batched import AdapterSpec, BatchedTrainer, train_batched
from lab.config import LoRAConfig
from lab.sweeps import (
    SweepCache,
    SweepCacheError,
    SweepFailed,
    SweepPoint,
    accuracy_table,
    by_rank,
    describe,
    grid,
    load_grid_file,
    sweep,
)
from lab.training import TrainingDiverged
from tests.test_sweep import CountingTrainer, fake_result

TINY = {"task": "sort_desc_small", "rank": 4, "steps": 30, "batch_size": 16}


def make_spec(targets, rank, alpha, dropout=0.0, rslora=False, lr=2e-2, seed=0) -> AdapterSpec:
    """An AdapterSpec from the adapter's numbers (its LoRAConfig) and the optimizer's."""
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora)
    return AdapterSpec(config, lr, seed)


def listing(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


# -- SweepPoint, grid, AdapterSpec: types and ranges -----------------------------------------


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
    "kwargs, error, words",
    [
        ({"seed": -1}, ValueError, ["seed=-1"]),
        ({"lr": True}, TypeError, ["lr=True"]),
        ({"targets": [3]}, TypeError, ["targets", "str"]),
        ({"rslora": "False"}, TypeError, ["rslora"]),
    ],
)
def test_bad_adapter_specs_are_refused(kwargs, error, words):
    with pytest.raises(error) as info:
        make_spec(**({"targets": ("q_proj",), "rank": 4, "alpha": 8.0} | kwargs))
    assert all(w in str(info.value) for w in words), str(info.value)


# -- sweep(): refused before anything trains -------------------------------------------------


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_before_training(tmp_path):
    trainer = CountingTrainer()
    with pytest.raises(ValueError, match="CUDA is not available"):
        sweep([SweepPoint(**TINY)], SweepCache(tmp_path), progress=False, run_fn=trainer,
              device="cuda")  # fmt: skip
    assert trainer.calls == []


def test_points_that_are_not_points_are_refused(tmp_path):
    with pytest.raises(TypeError, match="SweepPoints"):
        sweep([1, 2], SweepCache(tmp_path), progress=False, run_fn=CountingTrainer())
    with pytest.raises(TypeError, match="SweepCache"):
        sweep([SweepPoint(**TINY)], str(tmp_path), progress=False, run_fn=CountingTrainer())
    assert listing(tmp_path) == []


def test_a_huge_batch_is_refused_by_its_memory_estimate_before_training(tmp_path):
    trainer = CountingTrainer()
    point = SweepPoint(**(TINY | {"batch_size": 10**9}))
    with pytest.raises(MemoryError) as info:
        sweep([SweepPoint(**TINY), point], SweepCache(tmp_path), progress=False, run_fn=trainer)
    assert "batch_size=1,000,000,000" in str(info.value) and "TiB" in str(info.value)
    assert trainer.calls == [] and [f for f in listing(tmp_path) if f.endswith(".json")] == []


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


# -- the cache is read defensively ------------------------------------------------------------


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


LOCKS = {  # what is at the point's lock; all of them junk, taken over at once
    "a FIFO": lambda path: os.mkfifo(path),
    "a link to /dev/zero": lambda path: path.symlink_to("/dev/zero"),
    "text": lambda path: path.write_text("junk"),
    "pid 0": lambda path: path.write_text(f"0 {socket.gethostname()}\n"),
    "pid -1": lambda path: path.write_text(f"-1 {socket.gethostname()}\n"),
    "pid 10**30": lambda path: path.write_text(f"{10**30} {socket.gethostname()}\n"),
    "binary": lambda path: path.write_bytes(b"\xff\xfe\x00"),
}


@pytest.mark.parametrize("what", list(LOCKS))
def test_a_junk_lock_is_taken_over_at_once(tmp_path, what):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    lock = tmp_path / f"{point.key}.lock"
    LOCKS[what](lock)
    start = time.monotonic()
    results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert time.monotonic() - start < 10 and results[0].point == point
    assert not os.path.lexists(lock) and cache.get(point) == results[0]


def test_a_folder_in_a_locks_place_is_a_clear_error(tmp_path):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    (tmp_path / f"{point.key}.lock").mkdir()
    with pytest.raises(SweepCacheError, match=r"cannot take over the stale lock .*Is a directory"):
        sweep([point], cache, progress=False, run_fn=CountingTrainer())
    assert not cache.path(point).exists()


def test_a_sweep_waiting_on_another_machines_lock_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lab.sweeps, "WAIT_NOTICE_SECONDS", 0.5)
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    lock = tmp_path / f"{point.key}.lock"
    lock.write_text("4242 another-machine\n")  # never judged stale from here
    remover = threading.Timer(3.0, lock.unlink)  # that sweep's user deletes it, as told
    remover.start()
    try:
        results = sweep([point], cache, progress=False, run_fn=CountingTrainer())
    finally:
        remover.cancel()
    said = capsys.readouterr().out
    assert "waiting for 1 point that another sweep is training" in said
    assert "pid 4242 on another-machine" in said and f"delete {tmp_path}" in said
    assert results[0].point == point and cache.get(point) == results[0]


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_entry_is_retrained(tmp_path):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    cache.put(fake_result(point))
    os.chmod(cache.path(point), 0)
    with pytest.warns(UserWarning, match="ignoring unreadable"):
        assert cache.get(point) is None


def test_a_corrupted_grid_file_is_a_clear_error(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text('{"format": "lora-lab-sweep/1", "results": [')
    with pytest.raises(ValueError) as info:
        load_grid_file(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)
    path.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_grid_file(path)


def test_a_stale_lock_is_taken_over_and_a_live_one_is_respected(tmp_path):
    cache, point = SweepCache(tmp_path), SweepPoint(**TINY)
    lock = tmp_path / f"{point.key}.lock"
    import socket

    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process holds it
    assert cache.claimed(point) and not cache.claim(point)
    lock.write_text(f"{2**22 + 12345} {socket.gethostname()}\n")  # no such process
    assert not cache.claimed(point) and cache.claim(point)
    cache.release(point)
    assert not lock.exists()


# -- training: divergence and bounds ----------------------------------------------------------


def _lora_model():
    model = lab.load_base_model("cpu")
    lab.add_lora(model, rank=4, alpha=16)
    return model


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"weight_decay": math.inf}, ValueError, ["weight_decay=inf", ">= 0"]),
        ({"weight_decay": -0.1}, ValueError, ["weight_decay=-0.1"]),
        ({"weight_decay": "0"}, TypeError, ["weight_decay='0'"]),
        ({"seed": -1}, ValueError, ["seed=-1"]),
        ({"seed": 2**64}, ValueError, ["seed="]),
        ({"lr": True}, TypeError, ["lr=True"]),
        ({"steps": 10**12}, ValueError, ["steps=", "limit"]),
        ({"batch_size": 10**9}, MemoryError, ["batch_size=1,000,000,000", "available"]),
    ],
)
def test_bad_training_settings_are_refused_before_training(kwargs, error, words):
    model = _lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"steps": 3, "lr": 1e-2, "batch_size": 8, "progress": False} | kwargs
    with pytest.raises(error) as info:
        lab.train(model, lab.get_task("sort_desc_small"), **args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_a_merged_model_is_refused():
    model = _lora_model()
    lab.merge_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        lab.train(model, lab.get_task("sort_desc_small"), steps=3, lr=1e-2, progress=False)
    assert "merged" in str(info.value) and "unmerge_lora" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lr": 1e10}, ["diverged at step", "loss nan", "lr=1e+10", "smaller lr"]),
        ({"lr": 1e-2, "weight_decay": 1e30}, ["weight_decay=1e+30", "smaller weight_decay"]),
    ],
)
def test_a_diverging_run_stops_naming_the_setting(kwargs, words):
    with pytest.raises(TrainingDiverged) as info:
        lab.train(_lora_model(), lab.get_task("sort_desc_small"), steps=30, batch_size=16,
                  progress=False, **kwargs)  # fmt: skip
    assert all(w in str(info.value) for w in words), str(info.value)
    assert info.value.step < 30 and all(math.isfinite(x) for x in info.value.losses)


@pytest.mark.parametrize("batched", [True, False])
def test_a_diverged_point_is_cached_as_diverged_and_not_retrained(tmp_path, batched):
    cache = SweepCache(tmp_path)
    bad, good = SweepPoint(**TINY, lr=1e10), SweepPoint(**TINY)
    with pytest.warns(UserWarning, match="diverged"):
        results = sweep([bad, good], cache, progress=False, device="cpu", batched=batched)
    assert results[0].diverged and not results[1].diverged
    assert math.isfinite(results[1].heldout["loss"])
    stored = json.loads(cache.path(bad).read_text())  # strict JSON: no NaN token
    assert stored["diverged"] is True and stored["heldout"]["loss"] is None
    again = cache.get(bad)
    assert again.diverged and math.isnan(again.heldout["loss"])
    trainer = CountingTrainer()
    sweep([bad, good], cache, progress=False, run_fn=trainer)
    assert trainer.calls == []
    assert describe(again).endswith("(diverged)")
    assert by_rank([again]) == {} and math.isnan(accuracy_table([again], [4], [16.0])[0][0])


def test_a_diverged_configuration_does_not_poison_the_others():
    base, task = lab.load_base_model("cpu"), lab.get_task("sort_desc_small")
    good = make_spec(("q_proj", "v_proj"), 4, 16.0, lr=2e-2)
    bad = make_spec(("q_proj", "v_proj"), 4, 16.0, lr=1e10)
    together = train_batched(base, task, [good, bad], 30, 16, "cpu", progress=False)
    alone = train_batched(base, task, [good], 30, 16, "cpu", progress=False)
    assert together.diverged[0] is None and "diverged" in together.diverged[1]
    assert torch.equal(together.losses[0], alone.losses[0])
    assert all(torch.isfinite(p).all() for p in together.models[1].parameters())


def test_the_batched_trainer_validates_weight_decay_and_steps():
    base, task = lab.load_base_model("cpu"), lab.get_task("sort_desc_small")
    spec = make_spec(("q_proj",), 4, 8.0)
    with pytest.raises(ValueError, match="weight_decay=inf"):
        BatchedTrainer(base, task, [spec], 5, 8, "cpu", weight_decay=math.inf)
    with pytest.raises(ValueError, match="limit"):
        BatchedTrainer(base, task, [spec], 10**12, 8, "cpu")
    with pytest.raises(MemoryError, match="batch_size=1,000,000,000"):
        BatchedTrainer(base, task, [spec], 5, 10**9, "cpu")
    assert not any(isinstance(m, lab.LoRALinear) for m in base.modules())


def test_task_helpers_refuse_bad_batch_sizes_and_names():
    task = lab.get_task("sort_desc_small")
    with pytest.raises(ValueError, match="batch_size=0"):
        task.evaluate(lab.load_base_model("cpu"), batch_size=0)
    with pytest.raises(ValueError, match="batch_size=-1"):
        task.batch(-1, torch.Generator())
    with pytest.raises(ValueError, match="unknown task"):
        lab.get_task(None)


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
