"""Sweeps on Ray (lab.engine.remote, sweep(executor="ray"), python -m lab sweep --ray).

Every Ray start costs many CPU seconds and leaves daemons (GCS, raylet, agents, workers) that
burn CPU while they live, so the module starts as few as its checks allow, four in all:

- `local_ray`: a RaySession with two CPU workers in this process, shared by the in-process
  tests (its own HOME, temp dir and a marker in its environment, so the tests find and kill
  only its processes). It is handed to sweeps and stops Ray only at its own exit.
- `ray_head`: one real `ray start --head` on 127.0.0.1 (its own ports, temp dir and token, one
  CPU), shared by the CLI tests that connect by address, stopped by its PID after them.
- the local Ray a CLI run starts for itself, twice: the Ctrl-C test and the killed-driver test
  check that this Ray goes away with its driver, so nothing can stand in for it.

Checked: a small grid gives the same numbers through Ray as locally, value for value; a worker
killed mid-task is retried and its points are trained once in the results; a task that fails for
good is reported by point while every other point is kept; Ctrl-C cancels and exits with one
line; bad settings are refused before anything runs. Sweeps are as short as each property
allows (a few steps; a kill test's task only long enough to be killed).

Without Ray installed (requirements-ray.txt) the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from needs import interruptible

from lab.engine.executors import RAY_INSTALL, RaySession, check_reachable
from lab.engine.remote import _check_returned
from lab.sweeps import (
    SweepCache,
    SweepFailed,
    SweepPoint,
    SweepResult,
    base_fingerprint,
    full_point,
    grid,
    plan_chunks,
    sweep,
)

ROOT = Path(__file__).resolve().parents[2]
MARK = "LORA_LAB_RAY_TEST"  # in the environment of every Ray process these tests start
TASK_TITLE = b"ray::_run_item"  # what Ray names a worker process while it runs one of our tasks


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


try:
    import ray  # noqa: F401
except ImportError:
    message = f"Ray is not installed: {RAY_INSTALL}"
    if _ci():  # .ci/run installs it (requirements-dev.txt): its absence is a failure there
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


# -- processes ---------------------------------------------------------------------------------


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def marked_processes(mark: str, title: bytes | None = None) -> list[int]:
    """PIDs of live processes whose environment holds MARK=mark (and whose title starts so)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if f"{MARK}={mark}".encode() not in _environ(int(entry.name)).split(b"\0"):
            continue
        if title is not None:
            try:
                if not (entry / "cmdline").read_bytes().startswith(title):
                    continue
            except OSError:
                continue
        found.append(int(entry.name))
    return found


def wait_gone(mark: str, seconds: float = 30.0) -> list[int]:
    """Wait until no process carries the mark; returns those still there after `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outlives_nothing():
    """`check(mark)`: every process of that killed driver's local Ray must go by itself, within
    three minutes of the call. Checked at the module's end, so that the minute or two Ray's agents
    may take to notice overlaps the module's other tests instead of holding up a worker."""
    pending: list[tuple[str, float]] = []
    yield lambda mark: pending.append((mark, time.monotonic() + 180))
    outlived = {}
    for mark, deadline in pending:
        left = wait_gone(mark, seconds=max(0.0, deadline - time.monotonic()))
        if left:
            outlived[mark[:8]] = left
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_temp(mark), ignore_errors=True)
    assert not outlived, f"a killed driver's local Ray outlived it by three minutes: {outlived}"


# -- the module's local Ray ----------------------------------------------------------------------


@dataclasses.dataclass
class LocalRay:
    mark: str  # in the environment of each of its processes
    session: RaySession  # entered: the tests hand it to sweeps as their executor


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """ray.init() in this process: 2 CPU workers on 127.0.0.1, its own HOME and temp dir.

    The session is entered here and handed to sweeps by the tests: a sweep enters it again and
    leaves Ray running; its own exit, at the module's end, stops Ray and every process of it.
    """
    import ray

    home = tmp_path_factory.mktemp("ray-home")
    mark = uuid.uuid4().hex
    saved = {k: os.environ.get(k) for k in ("HOME", MARK)}
    os.environ.update(HOME=str(home), **{MARK: mark})  # Ray's processes inherit both
    temp = ray_temp(mark)
    session = RaySession(workers=2, temp_dir=temp)
    try:
        with session:
            yield LocalRay(mark, session)
            assert ray.is_initialized(), "a sweep stopped the Ray of the session it was handed"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = wait_gone(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
    # The session's own exit stopped the Ray it started, processes and all.
    assert not left, f"Ray processes still running after shutdown: {left}"
    assert not ray.is_initialized(), "Ray still up after the session's own exit"


# -- the module's Ray head --------------------------------------------------------------------


@dataclasses.dataclass
class RayHead:
    address: str  # 127.0.0.1:PORT
    auth: dict[str, str]  # the environment a client needs to be let in (the head's token)


@pytest.fixture(scope="class")
def ray_head(tmp_path_factory):
    """A real `ray start --head` on 127.0.0.1 (own ports, temp dir, token, 1 CPU), stopped by its
    PID when the class of the tests that connect to it by address ends."""
    mark = uuid.uuid4().hex
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path_factory.mktemp("head-home")), MARK: mark,
           "PYTHONPATH": str(ROOT), **auth}  # fmt: skip
    ray_bin = Path(sys.executable).parent / "ray"
    temp = ray_temp(mark)
    log = tmp_path_factory.mktemp("head-log") / "ray-start.log"
    out = log.open("a")  # what `ray start` says, shown if it fails
    names = ("node-manager-port", "object-manager-port", "dashboard-port",
             "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "runtime-env-agent-port",
             "metrics-export-port")  # fmt: skip

    def start() -> tuple[subprocess.Popen, int]:
        port = free_port()
        ports = {f"--{name}": str(free_port()) for name in names}
        # One CPU: one worker per connected driver, which is all the tests need.
        return subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
             "--disable-usage-stats", "--temp-dir", str(temp),
             *[x for kv in ports.items() for x in kv]],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ), port  # fmt: skip

    head, port = start()
    try:
        # Up once its node is registered, which `ray start` marks by writing the cluster's address
        # to <temp dir>/ray_current_cluster (its GCS port answers earlier). Nothing else starts
        # before then: on a busy machine a Ray starting beside it can push the raylet past the
        # 30 s that `ray start` gives it to register. A start that exits (a port taken between
        # choosing it and binding it, or that registration limit) is tried once more.
        deadline = time.monotonic() + 90
        tries = 1
        while not (temp / "ray_current_cluster").exists():
            if head.poll() is not None and tries < 2:
                for pid in wait_gone(mark, 30):  # what the failed start left
                    os.kill(pid, signal.SIGKILL)
                shutil.rmtree(temp, ignore_errors=True)
                head, port = start()
                tries, deadline = tries + 1, time.monotonic() + 90
            out.flush()
            tail = log.read_text(errors="replace")[-3000:]
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"the Ray head was not up within 90 s:\n{tail}"
            time.sleep(0.2)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # and it listens
        yield RayHead(f"127.0.0.1:{port}", auth)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        left = wait_gone(mark, 30)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        out.close()
    assert left == [], f"processes of the Ray head still running after its stop: {left}"


def small_grid(steps: int = 4) -> list[SweepPoint]:
    """Five batched points (alpha != rank, dropout, DoRA) and two that train alone.

    A few steps are enough: any difference in how a point trains shows in its first losses.
    """
    points = grid("rotate", [1, 4], alphas=[4.0, 16.0], steps=steps, batch_size=16)
    points[1] = dataclasses.replace(points[1], dropout=0.1)
    return points + [
        SweepPoint("rotate", 2, alpha=8.0, variant="dora", steps=steps, batch_size=16),
        SweepPoint("rotate", 2, alpha=8.0, quant="nf4", steps=steps, batch_size=16),
        full_point("rotate", steps=steps, batch_size=16),
    ]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count set to n for the block (it changes the last bits of some sums)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MEASURED = ("wall_seconds", "tokens_per_second", "date", "extra")  # clocks and where it ran


def same_values(a: SweepResult, b: SweepResult) -> list[str]:
    """The fields (other than clocks and placement) in which two results differ."""
    return [
        f.name
        for f in dataclasses.fields(SweepResult)
        if f.name not in MEASURED and getattr(a, f.name) != getattr(b, f.name)
    ]


# -- the command line --------------------------------------------------------------------------


def ray_temp(mark: str) -> Path:
    """A short temp dir for one test's Ray (its unix sockets' paths are limited in length)."""
    return Path(f"/tmp/lora-lab-ray-{mark[:8]}")


def cli_env(tmp_path: Path, mark: str) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "LORA_LAB_CACHE": str(tmp_path / "cache"),
        "RAY_TMPDIR": str(ray_temp(mark)),  # a local Ray started by the CLI keeps its files here
        MARK: mark,
        "PYTHONPATH": str(ROOT),
    }


# The tests run in this file's order, and a fixture lives until the end of its scope: the CLI
# tests that start no fixture come first, then the class of the two that share the Ray head
# (stopped at the class's end), then the in-process tests on local_ray (stopped at the module's
# end), so that no Ray waits idle through another's tests.


def test_cli_with_an_address_where_no_ray_answers_says_so_in_seconds(tmp_path):
    """Ray itself would wait minutes for a head that is not there; the lab tries the port first."""
    port = free_port()  # free a moment ago: nothing listens there
    mark = uuid.uuid4().hex
    address = f"127.0.0.1:{port}"
    run = subprocess.run([sys.executable, "-m", "lab", "sweep", "--task", "rotate", "--ranks", "1",
                          "--steps", "5", "--ray", address], env=cli_env(tmp_path, mark),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"error: could not reach Ray at {address}: nothing answers on "
                           f"127.0.0.1:{port} (Connection refused)"), line  # fmt: skip
    assert f"`ray start --head --port {port}`" in line, line
    assert not list((tmp_path / "cache").glob("*.json"))
    assert marked_processes(mark) == []  # no Ray was started on the way
    # A Ray Client address takes the same path through the CLI (the error line is this message);
    # its hint names the port the client server listens on.
    client = f"ray://127.0.0.1:{port}"
    with pytest.raises(ConnectionError) as info:
        check_reachable(client)
    said = str(info.value)
    assert said.startswith(f"could not reach Ray at {client}: nothing answers on 127.0.0.1:{port} "
                           "(Connection refused)"), said  # fmt: skip
    assert "client server listens on 10001" in said, said


def test_cli_ctrl_c_cancels_the_ray_tasks_and_exits_with_one_line(tmp_path):
    mark = uuid.uuid4().hex
    # A local Ray with one worker: the points train one after another, so at the first "trained"
    # line the next point's task is running and the others wait in Ray's queue.
    args = ["--task", "rotate", "--ranks", "1", "2", "4", "8", "--steps", "50", "--batch-size",
            "16", "--no-batch", "--ray", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "lab", "sweep", *args],
                            env=cli_env(tmp_path, mark), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=interruptible)  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # one line per finished point (no terminal, no bars)
            lines.append(line)
            if line.startswith("trained "):
                break
        # Its output ended without a trained point: it exited, and says why on stderr.
        assert lines and lines[-1].startswith("trained "), "".join(lines) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = wait_gone(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_temp(mark), ignore_errors=True)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "of 4 finished and kept in" in last, err
    assert "Traceback" not in err, err
    kept = len(list((tmp_path / "cache").glob("*.json")))
    assert 1 <= kept < 4 and last.startswith(f"interrupted: {kept} point")
    assert not list((tmp_path / "cache").glob("*.lock"))
    assert left == [], "the local Ray outlived the interrupted sweep"


class TestOnARayHead:
    """The CLI tests that connect to the Ray head by address: it lives as long as this class."""

    def test_a_driver_killed_outright_keeps_what_finished_and_its_rerun_trains_only_the_rest(
        self, tmp_path, ray_head, outlives_nothing
    ):
        """SIGKILL, unlike Ctrl-C, runs no clean-up: Ray notices its driver is gone and stops.

        The killed run starts its own local Ray (one worker: points one after another); the rerun
        connects to the module's Ray head instead of starting a second one. Which points are cached
        does not depend on where they train, and the rerun's check is that it trains only the rest.
        """
        mark = uuid.uuid4().hex
        args = ["sweep", "--task", "rotate", "--ranks", "1", "2", "4", "--steps", "50",
                "--batch-size", "16", "--no-batch", "--ray"]  # fmt: skip
        env = cli_env(tmp_path, mark)
        cache = tmp_path / "cache"
        proc = subprocess.Popen([sys.executable, "-m", "lab", *args, "--workers", "1"], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)  # fmt: skip
        try:
            for line in proc.stdout:
                if line.startswith("trained "):
                    break
            proc.kill()
            proc.wait(timeout=30)
            kept = len(list(cache.glob("*.json")))
            assert 1 <= kept <= 3
            run = subprocess.run([sys.executable, "-m", "lab", *args, ray_head.address],
                                 env=env | ray_head.auth, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
            assert run.returncode == 0, run.stdout + run.stderr
            assert run.stdout.startswith(f"3 points on rotate, {3 - kept} to train"), run.stdout
            assert run.stdout.count("trained ") == 3 - kept  # the finished points are not retrained
            assert len(list(cache.glob("*.json"))) == 3 and not list(cache.glob("*.lock"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            # The killed driver's Ray, which no clean-up of ours stops: its raylet and workers go
            # at once; its agents (ray::DashboardAgent, ray::RuntimeEnvAgent) were seen to linger
            # 60 to 120 s before they noticed, in one kill of three. Checked at the module's end.
            outlives_nothing(mark)

    def test_cli_connects_to_a_ray_head_by_address(self, tmp_path, ray_head):
        """The module's `ray start --head`, reached by its address with its token."""
        mark = uuid.uuid4().hex
        env = cli_env(tmp_path, mark) | ray_head.auth
        args = ["--task", "rotate", "--ranks", "1", "2", "--steps", "4", "--batch-size", "16",
                "--ray", ray_head.address]  # fmt: skip
        # A wrong token, at the same time (Ray takes its time to give up on a refused client).
        bad = subprocess.Popen([sys.executable, "-m", "lab", "sweep", *args],
                               env=env | {"RAY_AUTH_TOKEN": "0" * 64,
                                          "LORA_LAB_CACHE": str(tmp_path / "other")},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)  # fmt: skip
        try:
            run = subprocess.run([sys.executable, "-m", "lab", "sweep", *args], env=env,
                                 capture_output=True, text=True, timeout=300,
                                 cwd=tmp_path)  # fmt: skip
            _, bad_err = bad.communicate(timeout=300)
        finally:
            if bad.poll() is None:
                bad.kill()
                bad.wait()
        assert run.returncode == 0, run.stdout + run.stderr
        assert (
            f"Ray: the cluster at {ray_head.address}, 1 CPU on 1 node, connected in" in run.stdout
        )
        assert "batched: 2 points in 1 run" in run.stdout
        # The same numbers as a local sweep of the same points.
        points = grid("rotate", [1, 2], steps=4, batch_size=16)
        cached = SweepCache(tmp_path / "cache").results()
        with torch_threads(1):
            local = sweep(points, SweepCache(tmp_path / "local"), progress=False, device="cpu")
        by_point = {r.point: r for r in cached}
        assert set(by_point) == set(points)
        for r in local:
            assert same_values(r, by_point[r.point]) == []
        # The wrong token is refused with one error line, no traceback.
        assert bad.returncode == 1 and "Traceback" not in bad_err, bad_err
        assert f"error: could not start or reach Ray at {ray_head.address}" in bad_err


# -- the same numbers as a local sweep ---------------------------------------------------------


def test_ray_sweep_gives_the_local_sweeps_numbers_value_for_value(local_ray, tmp_path):
    points = small_grid()
    units = plan_chunks(points, "cpu")
    assert sorted(map(len, units)) == [1, 1, 5]  # one batched chunk and two points alone
    with torch_threads(1):  # as each Ray task trains (RaySession's threads)
        local = sweep(points, SweepCache(tmp_path / "local"), progress=False, device="cpu")
    arrived = []
    remote = sweep(points, SweepCache(tmp_path / "ray"), progress=False, device="cpu",
                   executor="ray", on_result=arrived.append)  # fmt: skip
    assert [r.point for r in remote] == points
    assert sorted(r.point.key for r in arrived) == sorted(p.key for p in points)  # each once
    for a, b in zip(local, remote, strict=True):
        assert same_values(a, b) == [], a.point
        assert b.extra["worker"]["device"] == "cpu"
        assert b.extra["worker"]["host"] == socket.gethostname()
    assert b.losses and b.heldout["loss"] == local[-1].heldout["loss"]
    # The driver wrote the cache: one file per point, the same names as the local sweep's.
    names = sorted(p.name for p in (tmp_path / "ray").glob("*.json"))
    assert names == sorted(p.name for p in (tmp_path / "local").glob("*.json"))
    assert not list((tmp_path / "ray").glob("*.lock"))
    # Cached now: a second Ray sweep submits nothing and returns the same results.
    again = sweep(points, SweepCache(tmp_path / "ray"), progress=False, executor="ray",
                  run_fn=_never_called)  # fmt: skip
    assert [r.losses for r in again] == [r.losses for r in remote]


def _never_called(point, device=None, progress=True):
    raise AssertionError(f"{point} was trained again")


def test_a_session_handed_to_several_sweeps_stops_ray_only_at_its_own_exit(local_ray, tmp_path):
    """The module's session, handed to two sweeps: each enters it again, and neither stops its
    Ray nor times the start-up again. Its own exit stops Ray: local_ray checks that at the end."""
    import ray

    session = local_ray.session
    started = session.startup_seconds
    for name in ("a", "b"):
        sweep([SweepPoint("rotate", 1, steps=2, batch_size=8)], SweepCache(tmp_path / name),
              progress=False, executor=session)  # fmt: skip
        assert ray.is_initialized(), f"sweep {name} stopped a Ray it did not start"
        assert session.startup_seconds == started, "the start-up was timed again"
        assert session.depth == 1, "the sweep did not leave the session as it found it"
    assert len(list(tmp_path.glob("[ab]/*.json"))) == 2  # both sweeps trained and cached


# -- what listens where -----------------------------------------------------------------------


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6} (hex, each 32-bit word in the host's byte order)."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(words)
    v6 = ipaddress.IPv6Address(words)
    return v6.ipv4_mapped or v6  # ::ffff:127.0.0.1 is 127.0.0.1 reached through IPv6


def listening_sockets(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process, address, port) of each listening TCP socket the processes `pids` hold open."""
    listening = {}  # socket inode -> (address, port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].split(":")
                listening[fields[9]] = (_proc_address(address), int(port, 16))
    found = []
    for pid in pids:
        try:
            # The command line (Ray's processes retitle themselves: 'ray::IDLE', ...).
            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone meanwhile
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                inode = target.removeprefix("socket:[").removesuffix("]")
                if target.startswith("socket:[") and inode in listening:
                    address, port = listening[inode]
                    found.append((name.strip()[:120], str(address), port))
    return sorted(set(found))


def test_a_local_ray_listens_on_127_0_0_1_only(local_ray):
    import ray

    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker is up and serving
    found = listening_sockets([os.getpid(), *marked_processes(local_ray.mark)])
    # GCS, raylet (node manager and object manager), the runtime-env agent (while it runs),
    # the autoscaler's metrics, this driver's and each worker's gRPC server.
    for part in ("gcs_server", "raylet", "ray::IDLE"):
        assert any(part in name for name, _, _ in found), (part, found)
    assert len(found) >= 6, found
    exposed = [s for s in found if not ipaddress.ip_address(s[1]).is_loopback]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"


# -- faults ------------------------------------------------------------------------------------


def test_worker_killed_mid_task_is_retried_and_nothing_is_lost_or_duplicated(local_ray, tmp_path):
    # 2 points batched in one task of a few seconds: long enough to be caught in the middle.
    points = grid("rotate", [1, 4], alphas=[8.0], steps=60, batch_size=16)
    assert [len(u) for u in plan_chunks(points, "cpu")] == [2]
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:  # the first worker seen running our task, half a second into it
        seen: dict[int, float] = {}
        while not stop.is_set() and not killed:
            for pid in marked_processes(local_ray.mark, TASK_TITLE):
                if time.monotonic() - seen.setdefault(pid, time.monotonic()) > 0.5:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    arrived = []
    try:
        remote = sweep(points, SweepCache(tmp_path / "ray"), progress=False, device="cpu",
                       executor="ray", on_result=arrived.append)  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was seen running the task, so none was killed"
    assert sorted(r.point.key for r in arrived) == sorted(p.key for p in points)
    assert len(list((tmp_path / "ray").glob("*.json"))) == len(points)
    with torch_threads(1):
        local = sweep(points, SweepCache(tmp_path / "local"), progress=False, device="cpu")
    for a, b in zip(local, remote, strict=True):
        assert same_values(a, b) == [], a.point  # retrained from the start: the same numbers


def fail_on_rank_2(point, device=None, progress=True):
    """A trainer that raises for rank 2 and trains the others (shipped to the workers)."""
    from lab.sweeps import run_point

    if point.rank == 2:
        raise ValueError(f"rank {point.rank} is refused by this test")
    return run_point(point, device=device, progress=False)


def die_on_rank_4(point, device=None, progress=True):
    """A trainer whose worker process dies for rank 4, every time (shipped to the workers)."""
    from lab.sweeps import run_point

    if point.rank == 4:
        os._exit(3)
    return run_point(point, device=device, progress=False)


@pytest.mark.parametrize(
    "trainer, failed_rank, error",
    [(fail_on_rank_2, 2, "ValueError: rank 2 is refused"), (die_on_rank_4, 4, "after 1 retry")],
)
def test_task_failing_for_good_is_reported_by_point_and_the_rest_kept(
    local_ray, tmp_path, trainer, failed_rank, error
):
    from ray import cloudpickle  # Ray's own copy

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    points = grid("rotate", [1, 2, 4], alphas=[8.0], steps=2, batch_size=16)
    cache = SweepCache(tmp_path)
    with pytest.raises(SweepFailed) as info:
        sweep(points, cache, progress=False, device="cpu", run_fn=trainer,
              executor=RaySession(max_retries=1))  # fmt: skip
    (bad,) = [p for p in points if p.rank == failed_rank]
    assert list(info.value.failures) == [bad]
    assert error in info.value.failures[bad]
    assert "1 point failed" in str(info.value) and "2 of 3 trained and kept" in str(info.value)
    assert [r is None for r in info.value.results] == [p is bad for p in points]
    assert {r.point for r in cache.results()} == set(points) - {bad}
    assert not list(Path(tmp_path).glob("*.lock"))  # the failed point's claim is released


def planning_fails(items, device):
    """A chunk-size task that fails on the worker (shipped to the workers)."""
    raise OSError("this worker cannot read its calibration")


def test_a_failing_chunk_size_task_falls_back_to_the_cpu_rule_and_trains_everything(
    local_ray, tmp_path, monkeypatch, capsys
):
    from ray import cloudpickle

    import lab.engine.remote

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(lab.engine.remote, "_remote_chunk_size", planning_fails)
    points = grid("rotate", [1, 2, 4], alphas=[8.0], steps=2, batch_size=64)
    cache = SweepCache(tmp_path)
    with torch_threads(1):
        results = sweep(points, cache, progress=False, device="cpu", executor="ray")
    said = capsys.readouterr()
    assert (
        "could not ask a worker for the chunk size (OSError: this worker cannot read its "
        "calibration); training 2 per task" in said.out + said.err
    )  # 128 rows // batch 64
    assert [r.point for r in results] == points and len(cache) == 3
    with torch_threads(1):
        local = sweep(points, SweepCache(tmp_path / "local"), progress=False, device="cpu",
                      max_configs=2)  # fmt: skip
    for a, b in zip(results, local, strict=True):
        assert same_values(a, b) == [], a.point


def test_a_result_from_another_base_or_an_invalid_one_is_refused():
    point = SweepPoint("rotate", 4, steps=3)
    good = SweepResult(point, [1.0], {"loss": 1.0, "accuracy": 0.5, "n": 8}, None, 1, 2, None,
                       1.0, 1.0, "cpu", "")  # fmt: skip
    where = type("Where", (), {"host": "node-7"})()
    ours = base_fingerprint()
    returned = {"base": ours, "results": [good.to_dict()]}
    assert _check_returned(returned, [point], ours, where) is None
    other = _check_returned({"base": "abc", "results": [good.to_dict()]}, [point], ours, where)
    assert "node-7 has another base model (abc" in other
    broken = good.to_dict() | {"heldout": {"loss": float("nan"), "accuracy": 0.5, "n": 8}}
    assert "invalid result" in _check_returned({"base": ours, "results": [broken]}, [point],
                                               ours, where)  # fmt: skip
    stray = SweepPoint("rotate", 8, steps=3)
    assert "other points" in _check_returned({"base": ours, "results": [good.to_dict()]},
                                             [stray], ours, where)  # fmt: skip
    assert "not a dict" in _check_returned([good], [point], ours, where)


# -- settings the cluster cannot meet: refused before anything starts --------------------------


def test_cuda_on_a_cluster_without_gpus_is_refused(local_ray, tmp_path):
    with pytest.raises(ValueError, match=r"device='cuda': the Ray cluster has no GPUs \(2 CPUs"):
        sweep([SweepPoint("rotate", 1, steps=2)], SweepCache(tmp_path), progress=False,
              device="cuda", executor="ray")  # fmt: skip
    assert not list(tmp_path.glob("*.json"))


def test_tasks_larger_than_every_node_are_refused_instead_of_waiting_for_ever(local_ray, tmp_path):
    message = r"threads=3: each task asks for 3 CPUs and no node .* \(the largest has 2; 2 CPUs"
    with pytest.raises(ValueError, match=message):
        sweep([SweepPoint("rotate", 1, steps=2)], SweepCache(tmp_path), progress=False,
              device="cpu", executor=RaySession(threads=3))  # fmt: skip
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.lock"))


def test_plan_chunks_follows_a_given_rule_for_a_device_elsewhere():
    points = grid("rotate", [1, 2, 4, 8], steps=5, batch_size=16)
    units = plan_chunks(points, "cuda", size=lambda group: 3)  # as for a remote GPU
    assert [len(u) for u in units] == [3, 1]  # no local GPU was asked: there is none here


def test_ray_benchmark_reports_both_sides_and_the_start_up_apart(local_ray, tmp_path):
    from benchmarks.ray_sweep import bench_ray_sweep, markdown, write_results

    # Two points (each costs its evaluations on both sides): the report, not the grid, is checked.
    points = grid("rotate", [1, 2], alphas=[8.0], steps=2, batch_size=8)
    with torch_threads(1):  # as the Ray tasks train: then every point is bit-identical
        report = bench_ray_sweep(points=points)
    assert report["points"] == 2 and sum(report["units"]) == 2
    assert report["local_s"] > 0 and report["ray_s"] > 0
    assert report["speedup"] == pytest.approx(report["local_s"] / report["ray_s"])
    assert report["ray"]["slots"] == 2 and report["ray"]["device"] == "cpu"
    assert report["identical_points"] == 2 and report["local_torch_threads"] == 1
    text = markdown(report)
    assert "# A 2-point sweep" in text and "Ray start-up, apart" in text
    paths = write_results(report, tmp_path, "ray_sweep-quick")
    assert [p.name for p in paths] == ["ray_sweep-quick.json", "ray_sweep-quick.md"]
