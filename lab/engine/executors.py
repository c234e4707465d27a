"""Where a sweep's units of work run: here, one after another, or as tasks on a Ray cluster.

`lab.sweeps.sweep` plans its units (one point alone, or one batched chunk) and either trains
them in this process or hands them to `RaySession.map`, which submits one Ray task per unit and
yields each unit's outcome as it arrives. The process that called sweep() (the driver) stays the
only writer of the sweep cache: tasks return results, they never write files.

Ray (https://docs.ray.io) schedules tasks by their CPU and GPU needs across machines, starts a
worker process per task slot, and reruns a task whose worker died (`max_retries`). This module
knows nothing about sweeps; it only maps a function over items with Ray:

    with RaySession(address=None, workers=2) as ray_run:   # a local Ray, stopped at the end
        for index, value, error in ray_run.map(fn, items, device="cpu"):
            ...                                             # in completion order

Ray is an optional dependency (requirements-ray.txt); without it, RaySession raises an
ImportError that says how to install it. Usage reporting is switched off before Ray is
imported, and the dashboard is off unless asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..text import plural
from ..training import check_count

__all__ = ["EXECUTORS", "RAY_INSTALL", "RaySession", "check_executor", "import_ray"]

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install -r requirements-ray.txt (Ray, with torch kept at the lab's pin)"
# A task whose worker process died (killed, out of memory, machine lost) is rerun this often.
DEFAULT_RETRIES = 3


def check_executor(executor: object) -> str:
    """The executor's name, or ValueError naming the value and the valid ones."""
    if not isinstance(executor, str) or executor not in EXECUTORS:
        raise ValueError(
            f"executor={executor!r}: expected one of {', '.join(map(repr, EXECUTORS))}"
        )
    return executor


def import_ray():
    """The ray module, with usage reporting off; ImportError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a class
    try:
        import ray
    except ImportError:
        raise ImportError(
            f"executor='ray' needs Ray, which is not installed: {RAY_INSTALL}"
        ) from None
    return ray


@dataclass
class WorkerInfo:
    """Where a task ran: host, process id and device (e.g. 'cpu', 'cuda:0 NVIDIA H100')."""

    host: str
    pid: int
    device: str


def describe_worker(device: str) -> dict:
    """This process's WorkerInfo fields, for a task to return beside its value."""
    name = device
    if device.startswith("cuda") and torch.cuda.is_available():
        name = f"{device} {torch.cuda.get_device_name(torch.device(device))}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "device": name}


def _run_item(fn: Callable, item, device: str, args: tuple, threads: int) -> tuple[object, dict]:
    """A Ray task's body: fn(item, device, *args) with `threads` torch threads, and where it ran.

    The thread count is set, not left to the worker's environment: it decides how a matmul's
    sums are split, so the last bits of a result (full fine-tuning's weight gradients, say).
    """
    torch.set_num_threads(threads)
    if device == "cuda":
        device = "cuda:0"  # Ray shows the task its one GPU as device 0 (CUDA_VISIBLE_DEVICES)
    return fn(item, device, *args), describe_worker(device)


class RaySession:
    """A connection to Ray for one sweep: a local Ray started for it, or an existing cluster.

    address None starts a local Ray on 127.0.0.1 with `workers` CPU slots (default: every
    core) and its files under `temp_dir` (default Ray's own, /tmp/ray), and stops it on exit.
    An address ('HOST:PORT' of a `ray start --head`, or 'ray://HOST:PORT') connects to that
    cluster and leaves it running. If this process already called ray.init(), that Ray is
    used as it is and left running. `startup_seconds` says how long connecting took. A
    session may be entered again while entered (handed to several sweeps inside one `with`):
    Ray stops at the outermost exit.

    Each task asks Ray for `threads` CPUs and trains with that many torch threads (a GPU task
    also asks for one GPU). A result equals a local sweep's value for value when the local
    process uses the same thread count (LORA_LAB_THREADS=1 for the default): the thread count
    changes how matmul sums are split, and so the last bits of full fine-tuning's numbers.
    `max_retries`: how often a task whose worker died is rerun.
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        temp_dir: str | os.PathLike | None = None,
        dashboard: bool = False,
        max_retries: int = DEFAULT_RETRIES,
        threads: int = 1,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(
                f"ray address={address!r}: expected 'HOST:PORT' of a running `ray start --head`, "
                "'ray://HOST:PORT', or None for a local Ray started for the run"
            )
        if address is not None:
            split_address(address)  # a port out of range, or no host, is refused here
        if workers is not None:  # None: every core
            check_count("workers", workers)
        if address is not None and workers is not None:
            raise ValueError("workers sets a local Ray's size; a cluster at an address has its own")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r}: expected an int >= 0")
        check_count("threads", threads)  # CPUs per task
        self.threads = threads
        self.address, self.workers, self.temp_dir = address, workers, temp_dir
        self.dashboard, self.max_retries = dashboard, max_retries
        self.ray = import_ray()
        self.owned = False
        self.startup_seconds = 0.0
        self.summary = ""  # what it connected to, once entered
        self.depth = 0  # how many `with` blocks hold it: only the outermost stops Ray

    def __enter__(self) -> RaySession:
        if self.depth:  # entered again (a session handed to sweep() inside its own with)
            self.depth += 1
            return self
        ray = self.ray
        start = time.perf_counter()
        if not ray.is_initialized():
            kwargs: dict = {
                "include_dashboard": self.dashboard,
                "log_to_driver": False,  # workers' own bars and warnings stay in Ray's logs
                "logging_level": logging.WARNING,
            }
            if self.address is None:
                kwargs.update(num_cpus=self.workers or os.cpu_count() or 1,
                              _node_ip_address="127.0.0.1")  # fmt: skip
                if self.temp_dir is not None:
                    kwargs["_temp_dir"] = os.fspath(self.temp_dir)
            else:
                kwargs["address"] = self.address
                check_reachable(self.address)
            # Ray announces that token authentication is on (the default for a local Ray);
            # that is as it should be, so the line is not printed over the sweep's bar.
            quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with _loopback_only(self.address is None):
                    ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
                where = self.address or "a local Ray"
                raise ConnectionError(f"could not start or reach Ray at {where}: {exc}") from None
            finally:
                quiet.setLevel(level)
            self.owned = True
        self.startup_seconds = time.perf_counter() - start
        kind = "a local Ray" if self.address is None else f"the cluster at {self.address}"
        self.summary = f"{kind}, {self.describe()}"
        self.depth = 1
        return self

    def __exit__(self, *exc_info) -> None:
        self.depth -= 1
        if self.depth == 0 and self.owned:  # the outermost exit stops a Ray it started
            self.ray.shutdown()
            self.owned = False

    # -- what the cluster has ----------------------------------------------------------------

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, memory, ...), as Ray counts them."""
        return dict(self.ray.cluster_resources())

    def device_kind(self, device: torch.device | str | None) -> str:
        """'cuda' or 'cpu' for this cluster's tasks; ValueError if the device cannot be had.

        None: a GPU per task when the cluster has GPUs, else CPUs.
        """
        gpus = self.resources().get("GPU", 0)
        kind = (torch.device(device).type if device is not None else None) or (
            "cuda" if gpus else "cpu"
        )
        if kind == "cuda" and not gpus:
            raise ValueError(
                f"device={str(device)!r}: the Ray cluster has no GPUs ({self.describe()}); "
                "use device='cpu' or None"
            )
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device={str(device)!r}: Ray tasks run on 'cpu' or 'cuda'")
        # A task no node can hold would wait for ever: Ray queues it as infeasible.
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        fit = [r for r in nodes if kind == "cpu" or r.get("GPU", 0) >= 1]
        most = max((int(r.get("CPU", 0)) for r in fit), default=0)
        if most < self.threads:
            where = "GPU node" if kind == "cuda" else "node"
            raise ValueError(
                f"threads={self.threads}: each task asks for {self.threads} CPUs and no "
                f"{where} of the Ray cluster has that many (the largest has {most}; "
                f"{self.describe()}); use threads <= {most}"
            )
        return kind

    def slots(self, kind: str) -> int:
        """How many tasks of this kind run at once: one per GPU, or per `threads` CPUs."""
        if kind == "cuda":
            return max(1, int(self.resources().get("GPU", 1)))
        return max(1, int(self.resources().get("CPU", 1)) // self.threads)

    def describe(self) -> str:
        """'2 CPUs on 1 node' or '8 GPUs, 64 CPUs on 2 nodes'."""
        res = self.resources()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        counts = {k: int(res[k]) for k in ("GPU", "CPU") if res.get(k)}
        parts = [plural(n, k) for k, n in counts.items()]
        return f"{', '.join(parts) or 'no CPUs'} on {plural(nodes, 'node')}"

    def call(self, fn: Callable, item, kind: str, args: tuple = ()) -> object:
        """fn(item, device, *args) as one task on a worker, as `map` runs it; its value."""
        task = self.ray.remote(_run_item).options(max_retries=self.max_retries, **self._needs(kind))
        value, _ = self.ray.get(task.remote(fn, item, kind, args, self.threads))
        return value

    def _needs(self, kind: str) -> dict:
        return {"num_cpus": self.threads, "num_gpus": 1 if kind == "cuda" else 0}

    # -- running -----------------------------------------------------------------------------

    def map(
        self,
        fn: Callable,
        items: Sequence,
        kind: str,
        args: tuple = (),
        on_start: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, object, WorkerInfo | None, str | None]]:
        """Run fn(item, device, *args) as one Ray task per item; yield as each one ends.

        Yields (index, value, worker, None) for a task that returned, (index, None, None,
        error) for one that failed for good: an exception in fn (not retried: it would fail
        again) or a worker that died more than max_retries times. `fn` must be importable on
        the workers (a module-level function of an installed package). Closing the iterator
        early (Ctrl-C in the loop that reads it) cancels every task still queued or running.
        `on_start(n)` is called once with the number of tasks submitted.
        """
        ray = self.ray
        remote = ray.remote(_run_item).options(
            max_retries=self.max_retries, retry_exceptions=False, **self._needs(kind)
        )
        fn_ref = ray.put(fn)
        refs = {
            remote.remote(fn_ref, item, kind, args, self.threads): i for i, item in enumerate(items)
        }
        if on_start is not None:
            on_start(len(refs))
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    index = refs.pop(ref)
                    try:
                        value, where = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # fn raised on the worker
                        yield index, None, None, task_error(exc)
                        continue
                    except ray.exceptions.RayError as exc:  # the worker died, every retry
                        tries = f"{self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
                        yield (
                            index,
                            None,
                            None,
                            f"{type(exc).__name__} after {tries}: {_first_line(exc)}",
                        )
                        continue
                    yield index, value, WorkerInfo(**where), None
        finally:
            # What is left when the loop stops early. A Ray this session started is stopped
            # whole at its exit; cancelling its tasks one by one first can race a task that is
            # finishing and abort the driver (Ray 2.60's task manager), so only a cluster's
            # tasks are cancelled here.
            for ref in [] if self.owned else refs:
                with contextlib.suppress(Exception):  # best effort: Ray may be gone already
                    ray.cancel(ref, force=True)


@contextlib.contextmanager
def _loopback_only(local: bool) -> Iterator[None]:
    """While a local Ray starts: every one of its servers listens on 127.0.0.1 only.

    Ray binds its gRPC servers (GCS, raylet, object manager, the driver's and each worker's)
    to 127.0.0.1 only when the node's address is 127.0.0.1, and its runtime-env agent and
    autoscaler metrics server to the node's address. But ray.init() turns a node address of
    127.0.0.1 into the machine's own address (so that other machines could join), unless Ray
    clusters are off, as Ray has them on Windows and macOS (ray_constants.ENABLE_RAY_CLUSTER,
    read when the address is resolved). A Ray started for one sweep is never joined, so they
    are off while it starts: with Ray 2.60 all seven of its listening sockets are then on
    127.0.0.1 (tests/engine/test_remote.py lists them). A cluster's address is left alone.
    """
    try:
        constants = importlib.import_module("ray._private.ray_constants")
    except ImportError:  # another Ray's layout: its own binding, which the test would show
        constants = None
    if not local or not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def split_address(address: str) -> tuple[str, str, str] | None:
    """(scheme, host, port) of 'HOST:PORT' or 'SCHEME://HOST:PORT'; None for other forms.

    ValueError when the port part is there but no port (1 to 65535) or no host is.
    """
    rest = address.strip()
    scheme = ""
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
    host, sep, port = rest.rpartition(":")
    if not sep or (not scheme and "]" in port):  # 'auto', a bare host, '[::1]'
        return None
    host = host.strip("[]")  # [::1]:6379
    if not (port.isdigit() and 1 <= int(port) <= 65535) or not host:
        raise ValueError(
            f"ray address={address!r}: expected HOST:PORT with a port from 1 to 65535 "
            "(e.g. 10.0.0.5:6379 of `ray start --head --port 6379`)"
        )
    return scheme, host, port


def check_reachable(address: str, seconds: float = 5.0) -> None:
    """ConnectionError in seconds if nothing answers at a 'HOST:PORT' or 'ray://HOST:PORT'.

    Ray itself waits minutes for a head that is not there; other forms ('auto') are left to
    Ray. Only a TCP connection is tried: whether it is a Ray head, Ray finds out.
    """
    parts = split_address(address)
    if parts is None:
        return
    scheme, host, port = parts
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        why = f"no answer in {seconds:g} s" if isinstance(exc, TimeoutError) else exc.strerror
        start = "`ray start --head`: its client server listens on 10001" if scheme == "ray" \
            else f"`ray start --head --port {port}`"  # fmt: skip
        raise ConnectionError(
            f"could not reach Ray at {address}: nothing answers on {host}:{port} "
            f"({why or type(exc).__name__}); start the head there first ({start}) or check "
            "the address"
        ) from None


def task_error(exc: BaseException) -> str:
    """'Type: first line' of what a task raised (the worker's own exception, not Ray's wrapper)."""
    cause = getattr(exc, "cause", None)
    cause = exc if cause is None else cause
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
