"""The chunk size is the fastest one measured, remembered per machine, and costs nothing else."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from lab.base import load_base_config
from lab.config import LoRAConfig
from lab.engine import calibrate
from lab.engine.batched import AdapterSpec
from lab.engine.calibrate import (
    Calibration,
    calibrated_chunk_size,
    candidates,
    choose,
    measure,
    measurement_config_steps,
    situation,
)
from lab.sweeps import SweepPoint, plan_chunks
from lab.tasks import get_task

CONFIG = load_base_config()
TASK = get_task("sort_desc")
SPECS = [AdapterSpec(LoRAConfig(rank=r, alpha=8.0, dropout=p)) for r in (1, 4, 8, 16)
         for p in (0.0, 0.1)]  # fmt: skip
# Seconds per configuration-step for each chunk size: 4 is fastest, alone (1) slowest.
TIMES = {1: 1.0, 2: 0.8, 4: 0.6, 8: 0.7}


class FakeTimer:
    """timer(k) from a table, with an outlier in the first call of each size; counts calls."""

    def __init__(self, times: dict[int, float]) -> None:
        self.times, self.calls = times, []

    def __call__(self, k: int) -> float:
        self.calls.append(k)
        first = self.calls.count(k) == 1
        return self.times[k] * (10.0 if first else 1.0)  # the median of 3 ignores it


def never(k: int) -> float:
    raise AssertionError(f"measured chunk size {k}, but nothing should be measured")


@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on (tests/conftest.py turns it off), remembering in a fresh folder."""
    monkeypatch.setenv(calibrate.ENV_VAR, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(calibrate, "_MEMORY", {})
    return tmp_path / "xdg" / "lora-lab" / "calibration.json"


def chunk(timer, steps=10_000, **kw) -> int:
    """calibrated_chunk_size for SPECS at batch 64 on the CPU, static rule 2, memory cap 8."""
    kw = {"static": 2, "limit": 8, "config": CONFIG, **kw}
    return calibrated_chunk_size(SPECS, TASK, 64, steps, "cpu", timer=timer, **kw)


def test_candidates_are_alone_then_powers_of_two_up_to_the_limit():
    assert candidates(1) == [1]
    assert candidates(8) == [1, 2, 4, 8]
    assert candidates(12) == [1, 2, 4, 8, 12]
    assert measurement_config_steps(8, steps=3, rounds=3) == 3 * 4 * 15


def test_choose_takes_the_fastest_median_and_a_tie_goes_to_alone():
    assert choose({1: 1.0, 2: 0.8, 4: 0.6, 8: 0.7}) == 4
    assert choose({1: 0.5, 2: 0.8, 4: 0.6}) == 1
    assert choose({1: 1.0, 2: 0.99}) == 1  # within the 2% margin: the plain loop
    assert choose({1: 1.0, 2: 0.97, 4: 0.97}) == 2  # equal medians: the smaller chunk


def test_measure_interleaves_rounds_and_picks_the_fastest_median():
    timer = FakeTimer(TIMES)
    found = measure(SPECS, TASK, 64, "cpu", limit=8, timer=timer, rounds=3)
    assert isinstance(found, Calibration)
    assert found.chunk == 4
    assert found.ms_per_config_step == {k: 1e3 * t for k, t in TIMES.items()}
    # Each round times every candidate once, starting one later each round.
    assert timer.calls == [1, 2, 4, 8, 2, 4, 8, 1, 4, 8, 1, 2]
    # The limit is also capped by the group's size.
    three = FakeTimer({**TIMES, 3: 0.9})
    assert measure(SPECS[:3], TASK, 64, "cpu", limit=8, timer=three).chunk == 2
    assert sorted(set(three.calls)) == [1, 2, 3]


def test_the_answer_is_measured_once_then_remembered_in_the_file(calibrating):
    timer = FakeTimer(TIMES)
    assert chunk(timer) == 4
    assert timer.calls  # measured
    data = json.loads(calibrating.read_text())
    assert data["format"] == calibrate.FORMAT
    ((key, entry),) = data["entries"].items()
    assert key == situation(CONFIG, SPECS, 64, "cpu")
    assert entry["chunk"] == 4 and entry["measured_up_to"] == 8
    calibrate._MEMORY.clear()  # a new process: only the file remembers
    assert chunk(never) == 4
    assert chunk(never, limit=2) == 2  # memory allows fewer: never more than fits


def test_the_key_changes_with_what_changes_the_answer():
    key = situation(CONFIG, SPECS, 64, "cpu")
    assert situation(CONFIG, SPECS, 8, "cpu") != key
    assert situation(CONFIG, SPECS[::2], 64, "cpu") != key  # no dropout
    big = [AdapterSpec(LoRAConfig(rank=64, alpha=8.0, targets="all-linear"))]
    assert situation(CONFIG, big, 64, "cpu") != situation(CONFIG, SPECS[:1], 64, "cpu")
    same_size = [AdapterSpec(s.config, lr=1e-3, seed=5) for s in SPECS]
    assert situation(CONFIG, same_size, 64, "cpu") == key  # lr and seed cost nothing


def _entry(**changes) -> str:
    """A calibration file with one entry, as _remember writes it, with `changes` made."""
    entry = {"chunk": 4, "ms_per_config_step": {"1": 1.0, "4": 0.6}, "measured_up_to": 8,
             "seconds": 1.5, "rounds": 3, "steps": 3, **changes}  # fmt: skip
    key = situation(CONFIG, SPECS, 64, "cpu")
    return json.dumps({"format": calibrate.FORMAT, "entries": {key: entry}})


def _make(path, how) -> None:
    """Put the hostile thing `how` (text, bytes, or a function of the path) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(how):
        how(path)
    elif isinstance(how, bytes):
        path.write_bytes(how)
    else:
        path.write_text(how)


CORRUPT = {
    "not json": "{not json",
    "empty": "",
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "nested dicts": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "a list": "[]",
    "another format": json.dumps({"format": "other", "entries": {}}),
    "entries a list": json.dumps({"format": calibrate.FORMAT, "entries": []}),
    "entry a number": json.dumps({"format": calibrate.FORMAT, "entries": {"k": 5}}),
    "chunk 0": json.dumps({"format": calibrate.FORMAT, "entries": {"k": {"chunk": 0}}}),
    "chunk negative": _entry(chunk=-3),
    "measured negative": _entry(chunk=1, measured_up_to=-8),
    "chunk a float": _entry(chunk=4.0),
    "chunk true": _entry(chunk=True),
    "chunk a string": _entry(chunk="4"),
    "chunk huge": _entry(chunk=10**400, measured_up_to=10**400),
    "chunk 1e999": _entry(chunk=1e999),
    "chunk above measured": _entry(chunk=16, measured_up_to=8),
    "measured nan": _entry(measured_up_to=float("nan")),
    "median nan": _entry(ms_per_config_step={"1": float("nan")}),
    "median negative": _entry(ms_per_config_step={"1": -1.0}),
    "medians a string": _entry(ms_per_config_step="fast"),
    "medians keyed by name": _entry(ms_per_config_step={"alone": 1.0}),
    "seconds negative": _entry(seconds=-1),
    "seconds inf": _entry(seconds=float("inf")),
    "rounds 0": _entry(rounds=0),
    "a number of 5,000 digits": '{"format": "x", "n": ' + "9" * 5000 + "}",
    "not utf-8": b"\xff\xfe{\x00",
    "5 MB of spaces": " " * (5 << 20),
    "a folder": lambda p: p.mkdir(),
    "a fifo": lambda p: os.mkfifo(p),
    "a link to /dev/zero": lambda p: p.symlink_to("/dev/zero"),
    "a link to itself": lambda p: p.symlink_to(p.name),
    "a dangling link": lambda p: p.symlink_to(p.parent / "gone.json"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_a_corrupt_file_is_warned_of_once_measured_over_and_rewritten(calibrating, name):
    _make(calibrating, CORRUPT[name])
    timer = FakeTimer(TIMES)
    with pytest.warns(UserWarning, match="ignoring the chunk-size calibration file") as said:
        assert chunk(timer) == 4
        assert chunk(never) == 4  # remembered: no second measurement, no second warning
    assert len(said) == 1, [str(w.message) for w in said]
    assert timer.calls
    if name == "a folder":  # cannot be replaced: the answer stays in this process's memory
        assert calibrating.is_dir()
        return
    assert calibrating.is_file() and not calibrating.is_symlink()
    entries = json.loads(calibrating.read_text())["entries"]
    assert [e["chunk"] for e in entries.values()] == [4]


def test_a_corrupt_file_is_replaced_even_when_nothing_is_measured(calibrating, monkeypatch):
    monkeypatch.setenv(calibrate.ENV_VAR, "1")
    _make(calibrating, CORRUPT["nested 100,000 deep"])
    with pytest.warns(UserWarning, match=r"\(nested too deeply to be a calibration file\)"):
        assert chunk(never, steps=1) == 2  # too short to pay: the static rule
    assert json.loads(calibrating.read_text()) == {"format": calibrate.FORMAT, "entries": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid now: never warned of again
        assert chunk(never, steps=1) == 2


def test_a_valid_file_written_by_hand_is_used(calibrating):
    _make(calibrating, _entry(chunk=2, ms_per_config_step={}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chunk(never) == 2


def test_an_unwritable_cache_folder_never_breaks_and_the_answer_stays_in_memory(
    calibrating, monkeypatch, tmp_path
):
    (tmp_path / "file").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    timer = FakeTimer(TIMES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent: a read-only home is normal on a shared copy
        assert chunk(timer) == 4
        assert chunk(never) == 4  # remembered in this process
    assert (tmp_path / "file").is_file()


def test_no_measurement_when_it_does_not_pay_or_is_turned_off(calibrating, monkeypatch):
    cost = measurement_config_steps(8)
    short = int(cost / (calibrate.PAYS * len(SPECS)))  # the measurement is exactly 5%
    assert chunk(never, steps=short) == 2  # the static rule
    assert not calibrating.exists()
    timer = FakeTimer(TIMES)
    assert chunk(timer, steps=short + 10) == 4 and timer.calls
    monkeypatch.setenv(calibrate.ENV_VAR, "0")
    calibrating.write_text("{not json")  # off: not even read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chunk(never) == 2
    monkeypatch.setenv(calibrate.ENV_VAR, "always")
    calibrating.unlink()
    calibrate._MEMORY.clear()
    timer = FakeTimer(TIMES)
    assert chunk(timer, steps=1) == 4 and timer.calls  # measured however short
    monkeypatch.setenv(calibrate.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"LORA_LAB_CALIBRATE='sometimes': expected 0 .* always"):
        chunk(never)


def test_a_remembered_answer_from_a_smaller_group_is_remeasured_when_it_pays(calibrating):
    assert chunk(FakeTimer({1: 1.0, 2: 0.5}), limit=2) == 2  # measured up to 2: 2 was best
    timer = FakeTimer(TIMES)
    assert chunk(timer) == 4 and max(timer.calls) == 8  # larger chunks might be faster
    assert chunk(never, steps=1) == 4
    short = chunk(never, steps=1, limit=8, static=8)  # does not pay: the remembered answer
    assert short == 4


def test_a_real_measurement_prints_nothing_and_leaves_the_random_state(capsys):
    specs = SPECS[:3]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    found = measure(specs, TASK, 4, "cpu", limit=2, steps=1, rounds=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert found.chunk in (1, 2) and set(found.ms_per_config_step) == {1, 2}
    assert all(t > 0 for t in found.ms_per_config_step.values())
    out = capsys.readouterr()
    assert out.out == ""


def test_plan_chunks_follows_the_remembered_chunk_size(calibrating):
    group = [SweepPoint("sort_desc", r, dropout=0.1, steps=20) for r in (1, 2, 4, 8)]
    specs = [p.spec() for p in group]
    key = situation(CONFIG, specs, 64, "cpu")
    for remembered, sizes in ((1, [1, 1, 1, 1]), (2, [2, 2]), (4, [4])):
        entry = {"chunk": remembered, "measured_up_to": 8, "ms_per_config_step": {}}
        calibrating.parent.mkdir(parents=True, exist_ok=True)
        calibrating.write_text(json.dumps({"format": calibrate.FORMAT, "entries": {key: entry}}))
        assert [len(u) for u in plan_chunks(group, "cpu")] == sizes
