"""The command line under bad input and faults: one clear line, no traceback.

Most checks call the command line's main(argv) in this process, with the environment a new
process would get (LORA_LAB_CACHE under tmp_path), and read what it printed: a new process costs
seconds of imports and changes nothing about a message. Each way main() ends is also run once as
a real `python -m lab` process, for its exit status: a usage error (2), a bad device and a bad lab
variable (2), a cache that cannot be written (1), a finished sweep (0) and Ctrl-C (130). Crafted
files the command reads (a named pipe, a symlink to /dev/zero, a calibration file nested too
deeply) and two sweeps at once are real processes too. Faults that need the kernel (a read-only
bind mount, a full tmpfs) are skipped with a reason when this user cannot mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from needs import interruptible, swallowed_ctrl_c

import lab.__main__ as cli
from lab.sweeps import SweepCache, SweepPoint, SweepResult, sweep

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--task", "sort_desc_small", "--ranks", "1", "--steps", "3", "--batch-size", "8"]


def run_lab(args, cache, timeout=300, env=None, **kwargs):
    """`python -m lab *args` as a real process, its sweep cache at `cache`."""
    environment = {**os.environ, "LORA_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lab", *args],
        capture_output=True, text=True, timeout=timeout, env=environment, **{"cwd": ROOT, **kwargs},
    )  # fmt: skip


@pytest.fixture
def main_here(monkeypatch, capfd):
    """main(args) in this process, set up as run_lab sets up a new one: returns what a finished
    process gives (returncode, stdout, stderr). Environment, folder and the warning printer
    main() installs are put back after the test."""

    def run(args, cache, env=None, cwd=None):
        monkeypatch.setenv("LORA_LAB_CACHE", str(cache))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capfd.readouterr()  # only what this call prints
        try:
            code = cli.main(args)
        except SystemExit as exc:  # argparse's usage error
            code = exc.code
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def assert_one_clear_line(proc, rc, words):
    err = proc.stderr.strip()
    assert proc.returncode == rc, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in proc.stdout + proc.stderr
    last = err.splitlines()[-1]
    assert all(w in last for w in words), last


BAD_ARGUMENTS = [
    (["--ranks", "0"], ["--ranks", "rank 0", "out of range"]),
    (["--ranks", "-1"], ["--ranks", "rank -1"]),
    (["--ranks", "abc"], ["--ranks", "'abc'", "whole number"]),
    (["--batch-size", "1e9"], ["--batch-size", "'1e9'", "whole number"]),
    (["--steps", "1000000000000"], ["--steps", "out of range", "1,000,000"]),
    (["--steps", "1e12"], ["--steps", "'1e12'"]),
    (["--seed", "-1"], ["--seed", "seed -1"]),
    (["--seed", "99999999999999999999"], ["--seed", "out of range"]),
    (["--targets", "x"], ["--targets", "'x'", "q_proj", "down"]),
    (["--task", "nope"], ["--task", "invalid choice"]),
    (["--dropouts", "1"], ["--dropouts", "out of range"]),
    (["--alphas", "nan"], ["--alphas", "out of range"]),
    (["--max-configs", "0"], ["--max-configs", "out of range"]),
    (["--workers", "2"], ["--workers", "add --ray"]),
    (["--ray", "10.0.0.5:6379", "--workers", "2"], ["--workers", "10.0.0.5:6379 has its own"]),
    (["--ray", "127.0.0.1:99999"], ["--ray '127.0.0.1:99999'", "1 to 65535"]),
    (["--ray", ":6379"], ["--ray ':6379'", "HOST:PORT"]),
    (["--ray", "ray://h:-1"], ["--ray 'ray://h:-1'", "HOST:PORT"]),
    (["--ray", " "], ["--ray ' '", "--ray alone for a local Ray"]),
    (["--cache", "~no-such-user-here/x"], ["--cache", "'~no-such-user-here'", "no home"]),
]


@pytest.mark.parametrize("extra, words", BAD_ARGUMENTS)
def test_bad_arguments_are_usage_errors(main_here, tmp_path, extra, words):
    proc = main_here(["sweep", *SMALL, *extra], tmp_path / "c")
    assert_one_clear_line(proc, 2, words)
    assert "usage:" in proc.stderr and not (tmp_path / "c").exists()


def test_a_usage_error_ends_a_real_process_with_status_2(tmp_path):
    extra, words = BAD_ARGUMENTS[0]
    proc = run_lab(["sweep", *SMALL, *extra], tmp_path / "c")
    assert_one_clear_line(proc, 2, words)
    assert "usage:" in proc.stderr and not (tmp_path / "c").exists()


BAD_DEVICES = [
    ("banana", ["device='banana'", "not a device", "cpu"]),
    ("tpu", ["device='tpu'", "cpu"]),
    ("cpu:5", ["device='cpu:5'", "there is one cpu"]),
    ("", ["device=''", "not a device"]),
    pytest.param(
        "cuda",
        ["CUDA is not available"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
    ),
]


@pytest.mark.parametrize("device, words", BAD_DEVICES)
def test_a_bad_device_is_one_line(main_here, tmp_path, device, words):
    proc = main_here(["sweep", *SMALL, "--device", device], tmp_path / "c")
    assert_one_clear_line(proc, 2, ["error:", *words])
    assert not (tmp_path / "c").exists()


def test_a_bad_device_ends_a_real_process_with_status_2(tmp_path):
    device, words = BAD_DEVICES[0]
    proc = run_lab(["sweep", *SMALL, "--device", device], tmp_path / "c")
    assert_one_clear_line(proc, 2, ["error:", *words])
    assert not (tmp_path / "c").exists()


def test_a_cache_that_is_a_file_is_one_line_and_status_1_of_a_real_process(tmp_path):
    (tmp_path / "afile").write_text("keep")
    proc = run_lab(["sweep", *SMALL], tmp_path / "afile")
    assert_one_clear_line(proc, 1, ["error:", "is a file", "LORA_LAB_CACHE"])
    assert (tmp_path / "afile").read_text() == "keep"


def test_a_cache_under_a_file_is_one_line(main_here, tmp_path):
    (tmp_path / "afile").write_text("keep")
    proc = main_here(["sweep", *SMALL, "--cache", str(tmp_path / "afile" / "sub")], tmp_path / "x")
    assert_one_clear_line(proc, 1, ["error:", "cannot create sweep cache", "Not a directory"])


def test_a_batch_too_big_for_memory_is_refused_before_training(main_here, tmp_path):
    proc = main_here(["sweep", *SMALL[:-2], "--batch-size", "1000000000"], tmp_path / "c")
    assert_one_clear_line(proc, 1, ["out of memory", "batch_size=1,000,000,000", "available"])
    assert not list((tmp_path / "c").glob("*.json"))


def test_an_empty_cache_variable_means_the_default_folder(main_here, tmp_path):
    proc = main_here(["sweep", *SMALL], "", env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "xdg" / "lora-lab" / "sweeps").glob("*.json"))) == 1


def test_a_nested_calibration_file_warns_once_and_the_batched_sweep_runs(tmp_path):
    calibration = tmp_path / "xdg" / "lora-lab" / "calibration.json"
    calibration.parent.mkdir(parents=True)
    calibration.write_text("[" * 100_000 + "]" * 100_000)  # json's parser: RecursionError
    args = ["sweep", *SMALL[:2], "--ranks", "1", "2", "--steps", "3", "--batch-size", "16"]
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "LORA_LAB_CALIBRATE": "always"}
    proc = run_lab(args, tmp_path / "c", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if "calibration file" in line]
    assert len(said) == 1 and "nested too deeply" in said[0], proc.stderr
    entries = json.loads(calibration.read_text())["entries"]  # rewritten with the measurement
    assert [(e["measured_up_to"], e["chunk"] in (1, 2)) for e in entries.values()] == [(2, True)]
    assert len(list((tmp_path / "c").glob("*.json"))) == 2


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_cache_option_is_a_usage_error_and_writes_nothing_here(main_here, tmp_path, value):
    here = tmp_path / "cwd"
    here.mkdir()
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = main_here(["sweep", *SMALL, "--cache", value], tmp_path / "c", env=env, cwd=here)
    assert_one_clear_line(proc, 2, ["--cache", repr(value), "not a folder name", "default"])
    assert "usage:" in proc.stderr
    assert os.listdir(here) == [] and not (tmp_path / "xdg").exists()


BAD_VARIABLES = [
    ({"LORA_LAB_CALIBRATE": "sometimes"}, ["LORA_LAB_CALIBRATE='sometimes'", "always"]),
    ({"LORA_LAB_CACHE": "~no-such-user-here/c"}, ["$LORA_LAB_CACHE", "no home folder"]),
    ({"LORA_LAB_LOCK_WAIT": "-1"}, ["$LORA_LAB_LOCK_WAIT='-1'", "seconds"]),
]


@pytest.mark.parametrize("env, words", BAD_VARIABLES)
def test_a_bad_lab_variable_is_one_line_before_anything_runs(main_here, tmp_path, env, words):
    proc = main_here(["sweep", *SMALL, "--no-batch"], tmp_path / "c", env=env, cwd=tmp_path)
    assert_one_clear_line(proc, 2, ["error:", *words])
    assert sorted(os.listdir(tmp_path)) == []


def test_a_bad_lab_variable_ends_a_real_process_with_status_2(tmp_path):
    env, words = BAD_VARIABLES[0]
    proc = run_lab(["sweep", *SMALL, "--no-batch"], tmp_path / "c", env=env, cwd=tmp_path)
    assert_one_clear_line(proc, 2, ["error:", *words])
    assert sorted(os.listdir(tmp_path)) == []


def test_crafted_cache_entries_are_retrained_by_the_cli_with_one_warning_each(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    point = SweepPoint("sort_desc_small", 1, steps=3, batch_size=8)  # what SMALL trains
    os.mkfifo(cache / f"{point.key}.json")  # reading it would block for ever
    (cache / "junk.json").symlink_to("/dev/zero")  # reading it would never end
    (cache / f"{point.key}.lock").write_text(f"0 {socket.gethostname()}\n")  # pid 0: junk
    proc = run_lab(["sweep", *SMALL], cache, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if "ignoring unreadable" in line]
    assert len(said) == 1 and "named pipe (FIFO)" in said[0], proc.stderr  # junk.json: unread
    assert "1 point on sort_desc_small, 1 to train" in proc.stdout
    assert SweepCache(cache).get(point) is not None
    assert (cache / "junk.json").is_symlink() and not (cache / f"{point.key}.lock").exists()


def test_a_small_sweep_speaks_singular_and_prints_no_progress_codes(main_here, tmp_path):
    proc = main_here(["sweep", *SMALL, "--targets", "q", "v"], tmp_path / "c")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "1 point on sort_desc_small" in out and "1 points" not in out
    assert "\r" not in out and "\x1b" not in out and "it/s" not in out
    assert "trained r1 α16 (1/1)" in proc.stdout
    again = main_here(["sweep", *SMALL, "--targets", "q_proj", "v_proj"], tmp_path / "c")
    assert "1 point on sort_desc_small, 0 to train" in again.stdout  # short names, same point


def test_a_diverging_point_is_reported_and_cached_as_diverged(main_here, tmp_path):
    cache = tmp_path / "c"
    assert main_here(["sweep", *SMALL], cache).returncode == 0  # fine: a baseline
    point = SweepPoint("sort_desc_small", 1, lr=1e10, steps=5, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (result,) = sweep([point], SweepCache(cache), progress=False, device="cpu")
    assert result.diverged
    stored = [json.loads(p.read_text()) for p in cache.glob("*.json")]
    assert sorted(s["diverged"] for s in stored) == [False, True]


def test_a_ctrl_c_that_torch_turned_into_another_error_still_exits_130(
    main_here, tmp_path, monkeypatch, ctrl_c_raises
):
    """Seen in the Ctrl-C test below: the interrupt landed while the base model loaded, torch
    swallowed it and raised its own error, and the sweep ended as "not a readable base model
    file" with exit 2 instead of "interrupted:" and 130."""

    def interrupted_sweep(*args, **kwargs):
        swallowed_ctrl_c()

    monkeypatch.setattr(cli, "sweep", interrupted_sweep)
    proc = main_here(["sweep", "--task", "rotate", "--ranks", "1", "--steps", "1"], tmp_path)
    assert proc.returncode == 130, (proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "run the same command again" in last, last


def test_ctrl_c_keeps_finished_points_and_exits_130(main_here, tmp_path):
    cache = tmp_path / "c"
    # Four points one after another: the interrupt lands while the three after the first train.
    args = ["sweep", "--task", "sort_desc_small", "--ranks", "1", "2", "4", "8", "--steps",
            "120", "--batch-size", "16", "--no-batch"]  # fmt: skip
    env = {**os.environ, "LORA_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "lab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=interruptible)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(cache.glob("*.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted:")
    assert "run the same command again" in err
    files = list(cache.glob("*.json"))
    assert files and all(SweepResult.from_dict(json.loads(f.read_text())) for f in files)
    assert not list(cache.glob("*.lock")) and not list(cache.glob(".*.tmp"))
    again = main_here(args, cache)  # the same command again, here: it trains the rest
    assert f", {4 - len(files)} to train" in again.stdout and again.returncode == 0


def test_two_sweeps_into_one_cache_train_each_point_once(tmp_path):
    cache = tmp_path / "c"
    args = ["sweep", "--task", "sort_desc_small", "--ranks", "1", "2", "4", "--steps", "100",
            "--batch-size", "16", "--no-batch"]  # fmt: skip
    env = {**os.environ, "LORA_LAB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "lab", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [line for out, _ in outs for line in out.splitlines() if line.startswith("trained")]
    assert len(trained) == 3, outs  # each point by one of them
    assert len(list(cache.glob("*.json"))) == 3 and not list(cache.glob("*.lock"))


@contextlib.contextmanager
def mounted(*commands):
    """Run mount commands (skip if they fail); umount the last target afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    target = commands[-1][-1]
    done = False
    try:
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                pytest.skip(f"cannot mount here: {result.stderr.strip()[:100]}")
            done = True
        yield Path(target)
    finally:
        if done:
            subprocess.run(["umount", target], capture_output=True)


def test_a_read_only_cache_is_refused_before_training(main_here, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    with mounted(["mount", "--bind", str(src), str(dst)],
                 ["mount", "-o", "remount,ro,bind", str(dst)]):  # fmt: skip
        proc = main_here(["sweep", *SMALL], dst)
        assert_one_clear_line(proc, 1, ["error:", "cannot write to sweep cache", "Read-only"])
    assert os.listdir(src) == []


def test_a_full_disk_is_refused_before_training(main_here, tmp_path):
    dst = tmp_path / "tiny"
    dst.mkdir()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(dst)]):
        with contextlib.suppress(OSError), open(dst / "filler", "wb") as f:
            for _ in range(64):  # fill the disk
                f.write(b"\0" * 4096)
                f.flush()
        proc = main_here(["sweep", *SMALL], dst)
        assert_one_clear_line(proc, 1, ["error:", "disk is full", str(dst)])
        assert os.listdir(dst) == ["filler"]
