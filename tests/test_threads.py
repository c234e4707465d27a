"""lab.threads: the thread count a kernel gets where training starts, by each branch of the rule."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lab
from lab import threads
from lab.threads import CpuQuota, apply, cgroup_cpu_quota, choose_threads, describe

ROOT = Path(__file__).resolve().parents[1]
NO_CGROUP = {"cgroup_root": "/nonexistent/cgroup", "self_cgroup": "/nonexistent/cgroup-self"}
HUB = {"JUPYTERHUB_USER": "ann", "JUPYTERHUB_API_TOKEN": "secret"}


def cgroup_tree(tmp_path: Path, files: dict[str, str], membership: str = "0::/\n") -> dict:
    """A fake cgroup mount under tmp_path (path -> contents) and its /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(membership)
    return {"cgroup_root": root, "self_cgroup": self_cgroup}


@pytest.fixture
def restore_torch_threads():
    """In-process apply() tests leave torch and the module's record as they found them."""
    before, record = torch.get_num_threads(), threads._applied
    yield
    torch.set_num_threads(before)
    threads._applied = record


# 1. LORA_LAB_THREADS: exactly that many, before every other rule.


@pytest.mark.parametrize("value, n", [("3", 3), ("1", 1), (" 2 ", 2), ("1024", 1024)])
def test_lora_lab_threads_gives_exactly_that_many(value, n):
    env = {"LORA_LAB_THREADS": value, "OMP_NUM_THREADS": "7", **HUB}
    chosen, reason = choose_threads(env, cpus=4096, **NO_CGROUP)
    assert chosen == n
    assert reason.startswith(f"{n:,} thread") and f"LORA_LAB_THREADS={value.strip()}" in reason
    assert "more than" not in reason


def test_lora_lab_threads_beats_a_cgroup_quota(tmp_path):
    tree = cgroup_tree(tmp_path, {"cpu.max": "100000 100000"})
    assert choose_threads({"LORA_LAB_THREADS": "2"}, cpus=4, **tree)[0] == 2
    assert choose_threads({}, cpus=4, **tree)[0] == 1  # the quota, once the variable is gone


def test_lora_lab_threads_above_the_cpus_is_honoured_and_said():
    chosen, reason = choose_threads({"LORA_LAB_THREADS": "8"}, cpus=2, **NO_CGROUP)
    assert chosen == 8 and "more than the 2 CPUs this process may use" in reason


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "+2", "2 threads", "1025", "0x2"])
def test_a_bad_lora_lab_threads_names_the_value_and_what_is_valid(value):
    with pytest.raises(ValueError) as error:
        choose_threads({"LORA_LAB_THREADS": value}, cpus=2, **NO_CGROUP)
    message = str(error.value)
    assert message.startswith(f"LORA_LAB_THREADS={value!r} is not a number of threads")
    assert "a whole number from 1 to 1024" in message and "unset it" in message


def test_an_empty_lora_lab_threads_counts_as_unset():
    assert choose_threads({"LORA_LAB_THREADS": " "}, cpus=2, **NO_CGROUP)[0] is None
    assert choose_threads({"LORA_LAB_THREADS": "", **HUB}, cpus=2, **NO_CGROUP)[0] == 1


# 2. OMP_NUM_THREADS: the host chose; leave torch alone.


def test_omp_num_threads_leaves_torch_alone_even_on_a_hub_with_a_quota(tmp_path):
    tree = cgroup_tree(tmp_path, {"cpu.max": "50000 100000"})
    chosen, reason = choose_threads({"OMP_NUM_THREADS": "4", **HUB}, cpus=8, **tree)
    assert chosen is None
    assert reason.startswith("torch's setting from OMP_NUM_THREADS=4")
    assert reason.endswith("set LORA_LAB_THREADS to change it")
    assert choose_threads({"OMP_NUM_THREADS": "", **HUB}, cpus=8, **NO_CGROUP)[0] == 1


# 3. A cgroup CPU quota: ceil(quota), never more than the usable CPUs.


@pytest.mark.parametrize(
    "cpu_max, cpus, n",
    [
        ("150000 100000", 8, 2),  # 1.5 CPUs -> 2 threads
        ("50000 100000", 8, 1),  # half a CPU still gets one thread
        ("400000 100000", 2, 2),  # 4 CPUs of quota, but only 2 to run on
        ("100000 100000", 1, 1),
    ],
)
def test_a_cgroup_v2_quota_gives_its_ceiling_capped_by_the_cpus(tmp_path, cpu_max, cpus, n):
    tree = cgroup_tree(tmp_path, {"cpu.max": cpu_max})
    chosen, reason = choose_threads(HUB, cpus=cpus, **tree)  # the quota comes before the hub
    assert chosen == n
    quota = int(cpu_max.split()[0]) / int(cpu_max.split()[1])
    assert f"a CPU quota of {quota:g} CPUs" in reason and str(tree["cgroup_root"]) in reason
    assert reason.startswith(f"{n} thread") and f"on {cpus} usable CPUs" in reason


def test_a_cgroup_v2_max_is_no_quota(tmp_path):
    tree = cgroup_tree(tmp_path, {"cpu.max": "max 100000"})
    assert cgroup_cpu_quota(tree["cgroup_root"], tree["self_cgroup"]) is None
    assert choose_threads({}, cpus=2, **tree)[0] is None
    assert choose_threads(HUB, cpus=2, **tree)[0] == 1


def test_the_tightest_quota_on_the_cgroup_or_above_it_wins(tmp_path):
    """A host's cgroup path (a SystemdSpawner unit) leads below the mount to the quota."""
    service = "user.slice/jupyter-ann.service/cpu.max"
    files = {
        "user.slice/cpu.max": "300000 100000",
        service: "120000 100000",
        "other.slice/cpu.max": "10000 100000",  # not this process's cgroup: not read
    }
    tree = cgroup_tree(tmp_path, files, "0::/user.slice/jupyter-ann.service\n")
    quota = cgroup_cpu_quota(tree["cgroup_root"], tree["self_cgroup"])
    assert quota == CpuQuota(1.2, str(tree["cgroup_root"] / service))
    assert choose_threads({}, cpus=8, **tree)[0] == 2
    # Only the slice above has a quota now: it still bounds the service below it.
    (tree["cgroup_root"] / service).write_text("max 100000\n")
    assert choose_threads({}, cpus=8, **tree)[0] == 3


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_is_read_from_the_cpu_controller(tmp_path, mount):
    files = {f"{mount}/cpu.cfs_quota_us": "250000", f"{mount}/cpu.cfs_period_us": "100000"}
    # Inside a container the mount shows the container's own cgroup, not the host's path.
    tree = cgroup_tree(tmp_path, files, "4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n")
    chosen, reason = choose_threads(HUB, cpus=16, **tree)
    assert chosen == 3 and "a CPU quota of 2.5 CPUs" in reason and "cpu.cfs_quota_us" in reason


def test_a_cgroup_v1_quota_of_minus_one_is_no_quota(tmp_path):
    files = {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    tree = cgroup_tree(tmp_path, files, "1:cpu:/\n")
    assert cgroup_cpu_quota(tree["cgroup_root"], tree["self_cgroup"]) is None
    assert choose_threads(HUB, cpus=2, **tree)[0] == 1


@pytest.mark.parametrize(
    "files",
    [
        {"cpu.max": "lots 100000"},
        {"cpu.max": "100000"},
        {"cpu.max": "0 100000"},
        {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "0"},
        {"cpu/cpu.cfs_quota_us": "200000"},  # no period beside it
    ],
)
def test_unreadable_cgroup_files_are_no_quota(tmp_path, files):
    tree = cgroup_tree(tmp_path, files, "garbage line\n0::/\n1:cpu:/\n")
    assert cgroup_cpu_quota(tree["cgroup_root"], tree["self_cgroup"]) is None


def test_this_machines_cgroups_read_without_error():
    quota = cgroup_cpu_quota()
    assert quota is None or (quota.cpus > 0 and Path(quota.source).is_file())
    assert 1 <= threads.usable_cpus() <= (os.cpu_count() or 1)


# 4. A JupyterHub server: 1 thread. 5. Otherwise torch's default.


@pytest.mark.parametrize("var", ["JUPYTERHUB_USER", "JUPYTERHUB_API_TOKEN"])
def test_a_jupyterhub_server_gets_one_thread(var):
    chosen, reason = choose_threads({var: "x"}, cpus=2, **NO_CGROUP)
    assert chosen == 1
    assert reason == (
        f"1 thread: a JupyterHub server ({var} is set), where kernels share the cores; "
        "set LORA_LAB_THREADS to change it"
    )


def test_a_machine_of_ones_own_keeps_torchs_default():
    chosen, reason = choose_threads({"JUPYTERHUB_USER": ""}, cpus=2, **NO_CGROUP)
    assert chosen is None and reason.startswith("torch's default: no LORA_LAB_THREADS")


def test_choose_threads_reads_os_environ_by_default(monkeypatch):
    for name in ("LORA_LAB_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTERHUB_USER", "bob")
    quota = cgroup_cpu_quota()
    expected = 1 if quota is None else min(math.ceil(quota.cpus), threads.usable_cpus())
    assert choose_threads()[0] == expected
    monkeypatch.setenv("LORA_LAB_THREADS", "nope")
    with pytest.raises(ValueError, match="LORA_LAB_THREADS='nope'"):
        choose_threads()


# apply() and describe()


def test_apply_sets_torch_and_describe_says_why(restore_torch_threads):
    target = 1 if torch.get_num_threads() != 1 else 2
    now, reason = apply({"LORA_LAB_THREADS": str(target)}, **NO_CGROUP)
    assert now == torch.get_num_threads() == target
    assert describe() == reason and reason.startswith(f"{target} thread")
    torch.set_num_threads(3)  # the student changes it afterwards
    assert describe().startswith("3 threads: changed after the lab chose")
    assert f"the lab chose {target} thread" in describe()


def test_apply_leaves_torch_alone_when_the_rule_says_so(restore_torch_threads):
    before = torch.get_num_threads()
    now, reason = apply({"OMP_NUM_THREADS": "9"}, **NO_CGROUP)
    assert now == before == torch.get_num_threads()
    assert describe() == f"{before} thread{'s' if before != 1 else ''}, {reason}"


def test_a_bad_value_raises_before_torch_is_touched(restore_torch_threads):
    apply({"LORA_LAB_THREADS": "1"}, **NO_CGROUP)
    with pytest.raises(ValueError, match="LORA_LAB_THREADS='0'"):
        apply({"LORA_LAB_THREADS": "0"}, **NO_CGROUP)
    assert torch.get_num_threads() == 1
    assert describe().startswith("1 thread: LORA_LAB_THREADS=1")  # the record is kept too


def test_lab_exports_the_module():
    assert "threads" in lab.__all__ and lab.threads is threads


# Training starting in a fresh kernel-like process (`import lab` alone leaves torch alone)


def run_import(
    extra: dict[str, str], code: str = "", torch_alone: bool = False
) -> subprocess.CompletedProcess:
    """A process that imports lab, runs `code` (default: training starts), and prints torch's
    thread count and lab.threads.describe(). With torch_alone, it first prints the count that
    `import torch` alone gives, before lab is imported."""
    env = {k: v for k, v in os.environ.items()}
    for name in ("LORA_LAB_THREADS", "OMP_NUM_THREADS", *threads.HUB_VARS):
        env.pop(name, None)
    env.update(extra)
    code = code or "lab.threads.training_threads()"
    alone = "import torch; print(torch.get_num_threads()); " if torch_alone else ""
    code = (
        f"{alone}import lab, torch; {code}; print(torch.get_num_threads()); "
        "print(lab.threads.describe())"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_training_on_a_jupyterhub_server_uses_one_thread():
    proc = run_import({"JUPYTERHUB_USER": "ann"})
    assert proc.returncode == 0, proc.stderr
    count, sentence = proc.stdout.splitlines()
    quota = cgroup_cpu_quota()
    if quota is None:  # this machine, and any without a CPU quota
        assert int(count) == 1 and "JUPYTERHUB_USER is set" in sentence
    else:  # a quota comes first in the rule
        assert int(count) == min(math.ceil(quota.cpus), threads.usable_cpus())


def test_training_with_lora_lab_threads_uses_that_many():
    proc = run_import({"LORA_LAB_THREADS": "2", "JUPYTERHUB_USER": "ann"})
    assert proc.returncode == 0, proc.stderr
    count, sentence = proc.stdout.splitlines()
    assert count == "2" and sentence.startswith("2 threads: LORA_LAB_THREADS=2 asks for it")


def test_a_bad_lora_lab_threads_is_refused_when_training_starts_and_import_lab_keeps_quiet():
    """`import lab` neither reads the variable nor touches torch; training refuses to start."""
    proc = run_import({"LORA_LAB_THREADS": "lots"}, code="pass")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[1].endswith("(lab.threads.apply() was not called)")
    train = run_import({"LORA_LAB_THREADS": "lots"})
    last = train.stderr.strip().splitlines()[-1]
    assert train.returncode == 1 and last.startswith("ValueError: LORA_LAB_THREADS='lots'")
    assert "is not a number of threads" in last and "a whole number from 1 to 1024" in last


CLI_SWEEP = ["sweep", "--task", "sort_desc_small", "--ranks", "1", "--steps", "2",
             "--batch-size", "8"]  # fmt: skip


@pytest.mark.parametrize("value", ["abc", "0", "-1", "99999999", "1.5", "nan"])
def test_the_cli_refuses_a_bad_lora_lab_threads_in_one_line(
    value, tmp_path, monkeypatch, capsys, restore_torch_threads
):
    """The command line's main() in this process, as a new process starts it: the rule not
    applied yet (the real process is the test below)."""
    import warnings

    import lab.__main__ as cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LORA_LAB_THREADS", value)
    monkeypatch.setattr(threads, "_applied", None)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    code = cli.main([*CLI_SWEEP, "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"error: LORA_LAB_THREADS={value!r} is not a number of threads" in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.json"))


def test_the_cli_process_refuses_a_bad_lora_lab_threads_with_status_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-m", "lab", *CLI_SWEEP, "--cache", str(tmp_path / "cache")],
        cwd=ROOT, env=env | {"LORA_LAB_THREADS": "abc"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: LORA_LAB_THREADS='abc' is not a number of threads" in proc.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("*.json"))


def test_training_elsewhere_keeps_torchs_own_default():
    """Without any variable or quota, training starts with what `import torch` alone gives."""
    proc = run_import({}, torch_alone=True)
    assert proc.returncode == 0, proc.stderr
    alone, count, sentence = proc.stdout.splitlines()
    quota = cgroup_cpu_quota()
    if quota is None:
        assert count == alone
        assert sentence.startswith(f"{count} thread") and "torch's default" in sentence
    else:
        assert int(count) == min(math.ceil(quota.cpus), threads.usable_cpus())
        assert "a CPU quota of" in sentence


# One rule where training starts, and one line when the machine is busy.


@pytest.fixture
def busy_unsaid(monkeypatch):
    """The busy line not said yet in this process, and its switch unset, for the test's span."""
    monkeypatch.setattr(threads, "_busy_said", False)
    monkeypatch.delenv(threads.BUSY_ENV_VAR, raising=False)


@pytest.mark.parametrize("load, cpus", [(0.0, 2), (1.9, 2), (2.0, 2), (15.9, 16)])
def test_a_load_at_or_under_the_cpu_count_is_not_busy(load, cpus):
    assert threads.busy_notice(load=load, cpus=cpus, threads=2) is None


def test_a_busy_machine_is_named_with_its_load_and_what_to_do():
    line = threads.busy_notice(load=5.04, cpus=2, threads=2)
    assert line.startswith("lab: the machine is busy (load average 5.0 on 2 CPUs)")
    assert "take longer than the times the lab quotes" in line and "quiet machine" in line
    assert "torch uses 2 threads" in line and "LORA_LAB_THREADS=1" in line
    one = threads.busy_notice(load=5.04, cpus=2, threads=1)  # already one thread: no advice
    assert "busy" in one and "LORA_LAB_THREADS" not in one
    assert "\n" not in line  # one line


def test_an_unknown_load_is_not_busy(monkeypatch):
    def no_load():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert threads.load_average() is None and threads.busy_notice(cpus=1) is None


def test_training_threads_says_busy_once_per_process(monkeypatch, busy_unsaid):
    import io

    monkeypatch.setattr(threads, "load_average", lambda: 9.0)
    out = io.StringIO()
    assert threads.training_threads(out) == torch.get_num_threads()
    threads.training_threads(out)
    threads.training_threads(out)
    assert len(out.getvalue().splitlines()) == 1 and "busy (load average 9.0" in out.getvalue()


def test_training_threads_is_quiet_on_a_quiet_machine_or_when_switched_off(
    monkeypatch, busy_unsaid
):
    import io

    out = io.StringIO()
    monkeypatch.setattr(threads, "load_average", lambda: 0.1)
    threads.training_threads(out)
    monkeypatch.setattr(threads, "load_average", lambda: 99.0)
    monkeypatch.setenv(threads.BUSY_ENV_VAR, "0")
    threads.training_threads(out)
    assert out.getvalue() == ""


def test_training_threads_keeps_a_count_set_after_import(restore_torch_threads, busy_unsaid):
    torch.set_num_threads(1)  # as a Ray task or a test pinning one thread does
    assert threads.training_threads() == 1 and torch.get_num_threads() == 1


TRAIN_TWICE = """
import os
os.getloadavg = lambda: (64.0, 64.0, 64.0)  # a machine far busier than its cores
import torch, lab
task = lab.get_task("rotate")
for _ in range(2):
    model = lab.load_base_model()
    lab.add_lora(model, rank=1, alpha=2)
    lab.train(model, task, steps=2, lr=1e-2, batch_size=4, progress=False, measure_memory=False)
print(torch.get_num_threads())
"""


TRAIN_ONE_THREAD = """
import os
os.getloadavg = lambda: (64.0, 64.0, 64.0)  # a machine far busier than its cores
import torch
before = torch.get_num_threads()
import lab
model = lab.load_base_model()
lab.add_lora(model, rank=1, alpha=2)
after_import = torch.get_num_threads()
lab.train(model, lab.get_task("rotate"), steps=1, lr=1e-2, batch_size=4, progress=False,
          measure_memory=False)
print(before, after_import, torch.get_num_threads())
"""


@pytest.fixture(scope="module")
def one_thread_run() -> subprocess.CompletedProcess:
    """TRAIN_ONE_THREAD in a new process with LORA_LAB_THREADS=1 and the busy line switched off
    (LORA_LAB_BUSY_NOTICE=0): one process that two tests below read."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env |= {"LORA_LAB_THREADS": "1", threads.BUSY_ENV_VAR: "0"}
    return subprocess.run([sys.executable, "-c", TRAIN_ONE_THREAD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_lab_train_applies_the_thread_rule_that_import_lab_no_longer_does(one_thread_run):
    proc = one_thread_run
    assert proc.returncode == 0, proc.stderr
    before, after_import, training = map(int, proc.stdout.split())
    assert after_import == before  # importing and adding LoRA leave torch alone
    assert training == 1  # lab.train applied LORA_LAB_THREADS=1


def test_lab_train_says_once_per_process_when_the_machine_is_busy():
    env = {k: v for k, v in os.environ.items() if k != threads.BUSY_ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", TRAIN_TWICE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    busy = [line for line in proc.stderr.splitlines() if "the machine is busy" in line]
    assert len(busy) == 1, proc.stderr
    assert busy[0].startswith("lab: the machine is busy (load average 64.0 on ")


def test_lab_train_says_nothing_of_a_busy_machine_when_the_line_is_switched_off(one_thread_run):
    quiet = one_thread_run  # a load average of 64, and LORA_LAB_BUSY_NOTICE=0
    assert quiet.returncode == 0 and "busy" not in quiet.stderr, quiet.stderr


def notebook_sources() -> dict[str, str]:
    """Every notebook's code, by its path under notebooks/ (the exercises included)."""
    import json

    out = {}
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        out[str(path.relative_to(ROOT / "notebooks"))] = code
    return out


def test_no_notebook_sets_its_own_thread_count():
    """One rule for the lab: a notebook that pins torch's threads trains unlike the others."""
    pinned = [name for name, code in notebook_sources().items()
              if "set_num_threads" in code or "LORA_LAB_THREADS" in code]  # fmt: skip
    assert pinned == [], f"notebooks that set torch's thread count themselves: {pinned}"
