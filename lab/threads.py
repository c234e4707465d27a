"""How many threads torch uses in a kernel: chosen where training starts, bounded on a shared host.

Each student's kernel is one process. torch's default is a thread per core, which is right on a
laptop and wrong on a shared host: on the lab's 2-core machine, two students training at once with
2 threads each took 5.9 times as long as one alone, with 1 thread each no longer than one alone
(benchmarks/results/classroom.md; OpenMP threads spin against each other), and a JupyterHub puts
twenty kernels on one machine. The rule, first match wins:

1. `LORA_LAB_THREADS=N`: exactly N threads (the student's or instructor's choice).
2. `OMP_NUM_THREADS` set: the host chose already and torch follows it; the lab leaves torch alone.
3. A CPU quota on this process (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, on
   its own cgroup or any above it): ceil(quota) threads, never more than the CPUs it may run on.
4. A JupyterHub single-user server (`JUPYTERHUB_USER` or `JUPYTERHUB_API_TOKEN` is set): 1 thread.
5. Otherwise torch's default (a machine of one's own: every core).

An empty variable counts as unset. `describe()` says in one sentence what was chosen and why;
`benchmarks/classroom.py` measures two students at once against one alone.

One rule for the whole lab. Every notebook, the explorer, the dashboard, `lab.train`, the batched
engine and sweeps train with the count this rule gives; no notebook sets its own. Where training
starts, `training_threads()` is called: it applies the rule if nothing has yet, keeps a count the
caller set on purpose after `import lab` (torch.set_num_threads: a test, a Ray task, a script
pinning 1 thread to rebuild a shipped grid bit for bit), and returns the count the run trains with.
`import lab` itself leaves torch's count alone: importing a library changes nothing in the process.

The count does not follow the machine's load. It could pay: on the lab's 2-core VM one thread
trained 2.5-7x faster than two at a load average of 5, and two threads 1.3-1.6x faster than one
at a load of 2.7. But the thread count changes how a matmul's sums are split, so full
fine-tuning's numbers differ in their last bits between 1 and 2 threads (LoRA's did not here), and
a count chosen by the load of the moment would make the same cell give different bits on a
quiet and a busy afternoon. Instead the lab says so: when training starts while the 1-minute load
average is above the machine's CPU count (more runnable threads than cores), one line on stderr,
once per process, says the machine is busy, that runs will take longer than the times the lab
quotes (measured on a quiet machine), and how to ask for one thread. `LORA_LAB_BUSY_NOTICE=0`
silences it where outputs are compared (nbval, storing notebooks).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import torch

from .text import plural

__all__ = [
    "BUSY_ENV_VAR",
    "ENV_VAR",
    "HUB_VARS",
    "MAX_THREADS",
    "CpuQuota",
    "apply",
    "busy_notice",
    "choose_threads",
    "cgroup_cpu_quota",
    "describe",
    "load_average",
    "parse_threads",
    "training_threads",
    "usable_cpus",
]

ENV_VAR = "LORA_LAB_THREADS"
# What a JupyterHub spawner puts into every single-user server's environment, so every kernel's.
HUB_VARS = ("JUPYTERHUB_USER", "JUPYTERHUB_API_TOKEN")
MAX_THREADS = 1024  # far above any machine the lab meets; a larger value is a typo
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller (a combined mount has one of the two comma names).
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_CHANGE = f"set {ENV_VAR} to change it"

BUSY_ENV_VAR = "LORA_LAB_BUSY_NOTICE"  # "0": never print the busy line (output comparisons)

# What apply() chose and left torch at: (chosen count or None, torch's count after, reason).
_applied: tuple[int | None, int, str] | None = None
_busy_said = False  # the busy line is printed once per process
# torch's count when the lab was imported (read, never set): a different count when training
# starts was set on purpose since (torch.set_num_threads) and is kept.
_at_import = torch.get_num_threads()


class CpuQuota(NamedTuple):
    """A cgroup CPU quota: how many CPUs' worth of time (1.5 = one and a half) and which file."""

    cpus: float
    source: str


def parse_threads(value: str, name: str = ENV_VAR) -> int:
    """A thread count from an environment variable's text; ValueError saying what is valid."""
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text) and 1 <= int(text) <= MAX_THREADS:
        return int(text)
    raise ValueError(
        f"{name}={value!r} is not a number of threads: expected a whole number from 1 to "
        f"{MAX_THREADS} (1 on a shared host, up to the {usable_cpus()} CPUs this process may "
        f"use), or unset it to let the lab choose"
    )


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one, else every CPU."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _self_and_ancestors(base: Path, cgroup: str) -> list[Path]:
    """base/cgroup, then each folder above it up to base itself (the nearest first)."""
    parts = PurePosixPath("/", cgroup).parts[1:]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_quota(folder: Path) -> CpuQuota | None:
    text = _read(folder / "cpu.max")  # "max 100000" (no quota) or "150000 100000"
    fields = text.split() if text else []
    if len(fields) != 2 or not all(re.fullmatch(r"[0-9]+", f) for f in fields):
        return None
    quota, period = (int(f) for f in fields)
    if quota <= 0 or period <= 0:
        return None
    return CpuQuota(quota / period, str(folder / "cpu.max"))


def _v1_quota(folder: Path) -> CpuQuota | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if not quota or not period or not re.fullmatch(r"-?[0-9]+", quota):
        return None
    if not re.fullmatch(r"[0-9]+", period) or int(quota) <= 0 or int(period) <= 0:
        return None  # -1 is "no quota"
    return CpuQuota(int(quota) / int(period), str(folder / "cpu.cfs_quota_us"))


def cgroup_cpu_quota(
    root: str | os.PathLike = CGROUP_ROOT, self_cgroup: str | os.PathLike = SELF_CGROUP
) -> CpuQuota | None:
    """The tightest CPU quota on this process's cgroup or any above it, or None when there is none.

    `root` is where cgroups are mounted and `self_cgroup` the process's membership file
    (/proc/self/cgroup); both are arguments so that tests can hand in fake cgroup trees. Inside
    a container the mount shows the container's own cgroup at `root`, and on a host (a
    systemd-run or SystemdSpawner quota) the process's cgroup path leads to it; both are read.
    """
    root = Path(root)
    v2_paths, v1_paths = ["/"], ["/"]
    for line in (_read(Path(self_cgroup)) or "").splitlines():
        fields = line.split(":", 2)  # "0::/user.slice/x" (v2) or "4:cpu,cpuacct:/docker/x" (v1)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:
            v2_paths.append(path)
        elif "cpu" in controllers.split(","):
            v1_paths.append(path)
    found = []
    for path in v2_paths:
        found += [_v2_quota(folder) for folder in _self_and_ancestors(root, path)]
    for mount in _V1_CPU_MOUNTS:
        if (root / mount).is_dir():
            for path in v1_paths:
                found += [_v1_quota(f) for f in _self_and_ancestors(root / mount, path)]
            break
    quotas = [q for q in found if q is not None]
    return min(quotas, key=lambda q: q.cpus) if quotas else None


def choose_threads(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup_root: str | os.PathLike = CGROUP_ROOT,
    self_cgroup: str | os.PathLike = SELF_CGROUP,
    cpus: int | None = None,
) -> tuple[int | None, str]:
    """The thread count the lab's rule gives (None: leave torch alone) and a reason to read.

    `environ` defaults to os.environ, `cpus` to the CPUs this process may run on; the cgroup
    paths are those of `cgroup_cpu_quota`. Nothing is changed. A bad LORA_LAB_THREADS raises
    ValueError naming the value and what is valid.
    """
    env = os.environ if environ is None else environ
    cpus = usable_cpus() if cpus is None else cpus
    raw = env.get(ENV_VAR, "")
    if raw.strip():
        n = parse_threads(raw)
        more = f", more than the {cpus} CPUs this process may use" if n > cpus else ""
        return n, (
            f"{plural(n, 'thread')}: {ENV_VAR}={raw.strip()} asks for it{more}; unset it to let "
            f"the lab choose"
        )
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.strip():
        return None, (
            f"torch's setting from OMP_NUM_THREADS={omp.strip()} (the host chose, so the lab "
            f"leaves it); {_CHANGE}"
        )
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None:
        n = max(1, min(math.ceil(quota.cpus), cpus))
        return n, (
            f"{plural(n, 'thread')}: a CPU quota of {quota.cpus:g} CPUs ({quota.source}) on "
            f"{cpus} usable CPUs; {_CHANGE}"
        )
    hub = next((v for v in HUB_VARS if env.get(v, "").strip()), None)
    if hub is not None:
        return 1, (
            f"1 thread: a JupyterHub server ({hub} is set), where kernels share the cores; "
            f"{_CHANGE}"
        )
    return None, (
        f"torch's default: no {ENV_VAR}, OMP_NUM_THREADS, CPU quota or JupyterHub found; {_CHANGE}"
    )


def apply(
    environ: Mapping[str, str] | None = None,
    *,
    cgroup_root: str | os.PathLike = CGROUP_ROOT,
    self_cgroup: str | os.PathLike = SELF_CGROUP,
    cpus: int | None = None,
) -> tuple[int, str]:
    """Set torch's intra-op threads by the rule (`choose_threads`); returns (threads now, reason).

    `training_threads()` calls it when training first starts. A bad LORA_LAB_THREADS raises
    before torch is touched.
    """
    global _applied
    n, reason = choose_threads(environ, cgroup_root=cgroup_root, self_cgroup=self_cgroup, cpus=cpus)
    if n is not None:
        torch.set_num_threads(n)
    _applied = (n, torch.get_num_threads(), reason)
    return _applied[1], reason


def describe() -> str:
    """One sentence: how many threads torch uses in this kernel now, and why."""
    now = torch.get_num_threads()
    if _applied is None:
        return (
            f"{plural(now, 'thread')}: the lab has not chosen (lab.threads.apply() was not called)"
        )
    chosen, after, reason = _applied
    if now != after:
        return (
            f"{plural(now, 'thread')}: changed after the lab chose (torch.set_num_threads); the "
            f"lab chose {plural(after, 'thread')} ({reason})"
        )
    return reason if chosen is not None else f"{plural(now, 'thread')}, {reason}"


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, all processes), None if unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return None


def busy_notice(
    load: float | None = None, cpus: int | None = None, threads: int | None = None
) -> str | None:
    """The line that says the machine is busy, or None when it is not (or the load is unknown).

    Busy: the 1-minute load average `load` (default: now) is above `cpus`, the machine's CPU
    count (default os.cpu_count()): more threads want to run than there are cores, so every
    training step waits its turn. `threads` (default: torch's count now) adds how to ask for one.
    """
    load = load_average() if load is None else load
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if load is None or not load > cpus:
        return None
    threads = torch.get_num_threads() if threads is None else threads
    line = (
        f"lab: the machine is busy (load average {load:.1f} on {cpus} CPUs): training will take "
        f"longer than the times the lab quotes, which were measured on a quiet machine"
    )
    if threads > 1:
        line += (
            f"; torch uses {plural(threads, 'thread')}, and on a busy machine 1 thread is often "
            f"faster ({ENV_VAR}=1 before starting Jupyter, or torch.set_num_threads(1))"
        )
    return line


def training_threads(stream=None) -> int:
    """Where training starts: the lab's thread rule applied, and the busy line said once.

    Applies the rule (`apply`) the first time, unless torch's count was changed on purpose since
    `import lab` (torch.set_num_threads), which is kept (a bad LORA_LAB_THREADS is refused either
    way); prints `busy_notice()` to `stream` (default sys.stderr) the first
    time training starts on a busy machine in this process, unless LORA_LAB_BUSY_NOTICE=0.
    Returns the number of threads the run trains with.
    """
    global _busy_said
    if _applied is None and torch.get_num_threads() == _at_import:
        apply()
    elif _applied is None:
        choose_threads()  # the count set on purpose is kept; a bad variable is still refused
    threads = torch.get_num_threads()
    if not _busy_said and os.environ.get(BUSY_ENV_VAR, "").strip() != "0":
        line = busy_notice(threads=threads)
        if line is not None:
            _busy_said = True
            print(line, file=sys.stderr if stream is None else stream, flush=True)
    return threads
